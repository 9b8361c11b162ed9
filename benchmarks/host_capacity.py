"""Host capacity: how close the whole job gets to decoding alone, and where the host's CPU goes.

    python -m benchmarks.host_capacity --format opus|flac|wav --recording-minutes M \\
        --coverage C --hours H --json PATH [--repeats 3] [--what-if actor-cpus=0] \\
        [--what-if normalize=off] [--profile] [--write-probe] [--decode-probe]
    python -m benchmarks.host_capacity --resummarise PATH   # recompute a result's summary

The corpus (WenetSpeech-like, cached under ``--corpus-dir``): ``H`` hours of 16 kHz mono
recordings of ``M`` minutes in ``--format`` (Ogg Opus, FLAC PCM_16 or WAV PCM_16), each cut
back to back into contiguous segments of 0.6-9 s (gamma shape 2, ~2.6 s mean);
``--unique-recordings`` distinct signals are synthesised and encoded
(:func:`hubert_ray.core.signal.synth_signal`; Opus encodes at ~20x realtime) and the other
recordings are hard links of them under their own names (decoding cost is real, encoding is
not repeated). The manifest lists a fraction ``C`` of each recording's segments
(``--coverage``), spread evenly through it (segment ``j`` is listed when ``floor((j+1)C) >
floor(jC)``).

Measured side by side in one run, alternating (``--repeats`` rounds; in each round the raw
decode, then the job and each ``--what-if`` variant, their order turning round by round):

* ``raw``: soundfile decoding every recording file whole (``sf.read(path, dtype="float32")``)
  in this one process: x-realtime per core (wall) and per CPU second, of the recordings' audio.
* ``job``: the job's ``run`` (``hubert_ray.backend.extract.run``, or wherever the backend has
  it; the simulated device passed as the backend takes it: :func:`run_pipeline`) with the
  job's defaults on local Ray (one simulated GPU, ``--x-realtime`` 1e6: the host alone sets
  the pace), x-realtime of the listed segments' audio: ``whole`` (wall of ``run``: start-up,
  manifest conversion, the summary pass included) and ``steady``
  (benchmarks/simulated_device.py's definition: the audio of every model call after the
  actor's first, over the span from its first to its last finished call). ``per core`` =
  x-realtime / the CPUs Ray schedules on (``ray.cluster_resources()["CPU"]``); ``ratio`` = job
  per core / raw per core. On a shared machine other users' processes take wall time from
  both sides unequally (one raw process against several job processes), so the same ratio is
  also given in CPU time (``ratio_cpu``: raw CPU s per audio hour / the job's), which does not
  depend on the load.
* ``--what-if``: the job with one change made from here (no product code changes):
  ``actor-cpus=0`` (the model stage's ``stage_args`` patched in the driver to reserve no Ray CPU
  for the GPU actor), ``normalize=off`` (the ``--normalize off`` option).

While each job runs, a sampler process reads ``/proc/<pid>/stat``, ``/proc/<pid>/schedstat``
and each thread's ``/proc/<pid>/task/<tid>/stat`` of every process descended from this one
every ``--interval`` seconds and attributes each CPU-time delta to the process's role, from
its title (Ray sets ``ray::<TaskOrActor>``: ``/proc/<pid>/cmdline``): decode tasks, the model
actor (and its ``__init__``), write tasks, manifest and summary tasks, idle and starting
workers, the driver (Ray Data's executor), Ray's own actors and daemons (raylet, gcs_server,
agents). Reported per role, for the whole run and the steady window: CPU seconds per audio
hour; the processes holding each role on average (task slots in use) with their CPU and
run-queue wait per second held; what the rest of the machine (other users) used meanwhile.

``--profile`` adds one more job run in which every Ray worker process (Ray's
``worker_process_setup_hook``) and the driver run :class:`ThreadCpuProfiler`: a sampling
profiler whose samples are weighted by each Python thread's own CPU time (so idle threads
count nothing, unlike py-spy's samples here: ``py-spy record`` per worker cost ~200 CPU s per
half-hour run on 2 cores and counted waiting threads as busy). Its stacks split each role's CPU
into fine stages by the functions on them (:data:`FINE_RULES`): decode (soundfile/libopus/
libFLAC), cut, normalise, the decode stage's Arrow output, transfers/serialisation (Ray's
serialisation, Ray Data's block handling and batching, the worker's task loop), the model
actor's host work, write (Parquet), Ray/other; what it cannot see (threads without Python:
Ray's C++ core-worker threads, torch's intra-op pool) is ``unsampled``. The profiled run is
reported apart; its shares of each role's /proc CPU (less the profiler's own) split the timed
runs' roles in :func:`report_table`.

``--write-probe`` times :func:`hubert_ray.dataset.output.write_part` on one core on zero
features (the simulated device's) and random float16 ones, and Parquet options and layouts
on the random ones. ``--decode-probe`` times ways of decoding one recording on one core
(soundfile on the path, in windows, through the job's file objects, the job's reader and
decode stage with and without normalisation). ``--repeats 0`` runs the probes alone.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

SR = 16_000
SEG_MIN_S, SEG_MAX_S, SEG_MEAN_S = 0.6, 9.0, 2.65  # gamma mean before clipping: ~2.6 s after
FORMATS = {"opus": "opus", "flac": "flac", "wav": "wav16"}  # -> synth.write_audio's fmt
EXT = {"opus": "opus", "flac": "flac", "wav": "wav"}


# -- corpus ---------------------------------------------------------------------------------------
def segment_times(duration_s: float, seed: int) -> list[tuple[float, float]]:
    """Contiguous segments covering ``[0, duration_s)``: gamma(2) durations with mean
    :data:`SEG_MEAN_S` clipped to [0.6, 9] s; a last piece under 0.6 s is left out."""
    rng = np.random.default_rng(seed)
    out, t = [], 0.0
    while True:
        if duration_s - t < SEG_MIN_S:
            break
        d = float(np.clip(rng.gamma(2.0, SEG_MEAN_S / 2.0), SEG_MIN_S, SEG_MAX_S))
        end = min(t + d, duration_s)
        out.append((round(t, 4), round(end, 4)))
        t = end
    return out


def make_audio(root: str, fmt: str, minutes: float, count: int, unique: int) -> list[str]:
    """``count`` recording files under ``root/audio`` (cached: kept between runs)."""
    from hubert_ray.core.signal import synth_signal
    from hubert_ray.testing.synth import write_audio

    audio = os.path.join(root, "audio")
    os.makedirs(audio, exist_ok=True)
    unique = max(1, min(unique, count))
    sources = []
    for u in range(unique):
        path = os.path.join(audio, f"u{u:03d}.{EXT[fmt]}")
        if not os.path.exists(path):
            t0 = time.perf_counter()
            x = synth_signal(minutes * 60, SR, 1, seed=1000 + u)
            tmp = path + ".tmp." + EXT[fmt]
            write_audio(tmp, x, SR, FORMATS[fmt])
            os.replace(tmp, path)
            print(f"# generated {path} in {time.perf_counter() - t0:.1f} s", flush=True)
        sources.append(path)
    paths = []
    for i in range(count):
        path = os.path.join(audio, f"rec{i:05d}.{EXT[fmt]}")
        if not os.path.exists(path):
            try:
                os.link(sources[i % unique], path)
            except OSError:
                shutil.copyfile(sources[i % unique], path)
        paths.append(path)
    return paths


def write_manifest(path: str, files: list[str], minutes: float, coverage: float) -> dict:
    """A JSONL manifest of ``coverage`` of each recording's segments; returns its counts."""
    listed = segments = 0
    listed_s = 0.0
    with open(path, "w") as f:
        for i, audio in enumerate(files):
            rid = f"rec{i:05d}"
            segs = []
            for j, (a, b) in enumerate(segment_times(minutes * 60, seed=i)):
                segments += 1
                if math.floor((j + 1) * coverage + 1e-9) > math.floor(j * coverage + 1e-9):
                    segs.append({"id": f"{rid}-{j:05d}", "start_s": a, "end_s": b})
                    listed_s += b - a
            listed += len(segs)
            f.write(json.dumps({"id": rid, "audio": audio, "segments": segs}) + "\n")
    return {
        "recordings": len(files),
        "segments_in_recordings": segments,
        "segments_listed": listed,
        "listed_audio_s": round(listed_s, 2),
        "mean_listed_segment_s": round(listed_s / max(1, listed), 3),
    }


# -- side by side: raw decode, the job ------------------------------------------------------------
def load() -> dict:
    """``uptime``'s load averages and the whole host's busy share since the last call."""
    return {"loadavg": [round(v, 2) for v in os.getloadavg()], "uptime": _uptime()}


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def host_jiffies() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def raw_decode(files: list[str], seconds_each: float) -> dict:
    """soundfile decoding every file whole, in this process (one core)."""
    import soundfile as sf

    busy0, total0 = host_jiffies()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    frames = 0
    for path in files:
        x, _ = sf.read(path, dtype="float32")
        frames += x.shape[0]
        del x
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    busy1, total1 = host_jiffies()
    audio = frames / SR
    return {
        "audio_s": round(audio, 1),
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "x_realtime_per_core": round(audio / wall, 1),
        "x_realtime_per_cpu_second": round(audio / cpu, 1),
        "host_busy_share": round((busy1 - busy0) / max(1, total1 - total0), 3),
        "load": load(),
    }


def run_pipeline(cfg, x_realtime: float) -> dict:
    """The job with a simulated device of ``x_realtime``, through whichever interface the
    backend has: ``run`` in ``hubert_ray.backend.extract`` (``hubert_ray.backend.pipeline``,
    also tried, is where it was before the backend was split); the device as
    ``simulate={...}`` (SimulatedDevice's arguments) or as a device object (``simulate=`` /
    ``device=`` a SimulatedDevice, as ``hubert_ray.backend.extract.run`` takes it today)."""
    import importlib
    import inspect

    run = None
    for name in ("hubert_ray.backend.pipeline", "hubert_ray.backend.extract", "hubert_ray.backend"):
        try:
            run = getattr(importlib.import_module(name), "run", None)
        except ImportError:
            continue
        if run is not None:
            break
    if run is None:
        raise RuntimeError("no hubert_ray.backend run() found")
    params = inspect.signature(run).parameters
    for name in ("simulate", "device", "simulated", "simulated_device"):
        if name not in params:
            continue
        note = str(params[name].annotation)
        if "dict" in note:
            return run(cfg, overwrite=True, **{name: {"x_realtime": x_realtime}})
        from hubert_ray.model.device import SimulatedDevice

        return run(cfg, overwrite=True, **{name: SimulatedDevice(x_realtime=x_realtime)})
    raise RuntimeError(f"run{inspect.signature(run)}: no simulated device argument")


def steady(reports: list[dict]) -> dict:
    """benchmarks/simulated_device.py's steady state: audio of every call after each actor's
    first, over the span from its first to its last finished call (monotonic clock)."""
    out = {"x_realtime": None, "window": None, "audio_s": 0.0, "calls": 0}
    rates, windows = [], []
    for report in reports:
        calls = (report.get("simulated") or {}).get("calls") or []
        out["calls"] += len(calls)
        if len(calls) >= 2:
            audio = sum(samples for _, samples in calls[1:]) / SR
            span = calls[-1][0] - calls[0][0]
            rates.append(audio / span)
            windows.append((calls[0][0], calls[-1][0]))
            out["audio_s"] += audio
    if rates:
        out["x_realtime"] = round(sum(rates), 1)
        out["window"] = (min(a for a, _ in windows), max(b for _, b in windows))
        out["span_s"] = round(out["window"][1] - out["window"][0], 3)
    out["audio_s"] = round(out["audio_s"], 1)
    return out


WHAT_IFS = {
    "actor-cpus=0": "the GPU model actor reserves no Ray CPU (Ray Data's default for a GPU "
    "map UDF without num_cpus is 1): the model stage's map_batches args get num_cpus=0",
    "normalize=off": "no per-segment normalisation on the host (--normalize off: what moving "
    "it to the device would save on the host)",
}


def _patch_actor_cpus(cpus: float):
    """``stage_args`` of the model stage with ``num_cpus`` set (the driver builds the dataset:
    patching it here is enough); returns an undo function."""
    import importlib

    undo = []
    for name in (
        "hubert_ray.backend.placement",
        "hubert_ray.backend.dataset",
        "hubert_ray.backend.pipeline",
    ):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        orig = getattr(mod, "stage_args", None)
        if orig is None:
            continue

        def patched(stage, *a, _orig=orig, **k):
            args = _orig(stage, *a, **k)
            if stage == "model" and args.get("num_gpus"):
                args["num_cpus"] = cpus
            return args

        mod.stage_args = patched
        undo.append((mod, orig))
    if not undo:
        raise RuntimeError("what-if actor-cpus: no stage_args found in hubert_ray.backend")
    return lambda: [setattr(m, "stage_args", o) for m, o in undo]


def job_run(
    manifest: str,
    model: str,
    work: str,
    x_realtime: float,
    interval: float,
    profile_dir=None,
    what_if: str | None = None,
) -> dict:
    import ray

    from hubert_ray.core.config import ExtractConfig
    from hubert_ray.dataset import output

    out_dir = os.path.join(work, "out")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    path = os.environ.get("PYTHONPATH", "")
    if ROOT not in path.split(os.pathsep):  # Ray's workers import benchmarks (the hook)
        os.environ["PYTHONPATH"] = os.pathsep.join([p for p in (ROOT, path) if p])
    extra = {}
    if profile_dir:
        os.environ[PROFILE_ENV] = profile_dir
        extra["runtime_env"] = {"worker_process_setup_hook": f"{__spec__.name}.worker_hook"}
        worker_hook()  # the driver (Ray Data's executor) too
    ray.init(address="local", num_gpus=1, include_dashboard=False, **extra)
    cpus = ray.cluster_resources().get("CPU", os.cpu_count())
    extra_cfg = {"normalize": "off"} if what_if == "normalize=off" else {}
    cfg = ExtractConfig(manifest=manifest, model=model, output=out_dir, **extra_cfg)
    undo = _patch_actor_cpus(0) if what_if == "actor-cpus=0" else None
    samples = os.path.join(work, "samples.json")
    sampler = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "benchmarks.host_capacity",
            "--_sample",
            samples,
            "--_root",
            str(os.getpid()),
            "--interval",
            str(interval),
        ],
        cwd=ROOT,
    )
    time.sleep(max(0.3, 3 * interval))  # the sampler's baseline
    ld = load()
    busy0, total0 = host_jiffies()
    t_mono0, t0 = time.monotonic(), time.perf_counter()
    summary = run_pipeline(cfg, x_realtime)
    wall = time.perf_counter() - t0
    t_mono1 = time.monotonic()
    busy1, total1 = host_jiffies()
    sampler.send_signal(signal.SIGTERM)
    sampler.wait(60)
    ray.shutdown()
    if undo:
        undo()
    if profile_dir:
        os.environ.pop(PROFILE_ENV, None)
        if _PROFILER is not None:
            _PROFILER.flush()
    with open(samples) as f:
        ticks = json.load(f)
    audio = summary["audio_seconds"]
    st = steady(output.actor_reports(out_dir))
    res = {
        "audio_s": round(audio, 1),
        "segments_ok": summary["segments_ok"],
        "segments_failed": summary.get("segments_failed"),
        "wall_s": round(wall, 2),
        "phase_seconds": summary.get("phase_seconds"),
        "ray_cpus": cpus,
        "x_realtime_whole": round(audio / wall, 1),
        "x_realtime_steady": st["x_realtime"],
        "steady": {k: v for k, v in st.items() if k != "window"},
        "host_busy_share": round((busy1 - busy0) / max(1, total1 - total0), 3),
        "load_before": ld,
        "load_after": load(),
        "profiled": bool(profile_dir),
        "variant": what_if or "base",
    }
    res["cpu"] = attribute(ticks, (t_mono0, t_mono1), st["window"], audio, st["audio_s"])
    if profile_dir:
        time.sleep(1.5)  # the workers' last flush
        res["profile"] = profiles_by_role(profile_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    return res


# -- /proc sampler ------------------------------------------------------------------------------
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat(path: str) -> tuple[str, int, int] | None:
    """(comm, ppid, utime + stime ticks) of a /proc stat file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    lp, rp = data.find(b"("), data.rfind(b")")
    fields = data[rp + 2 :].split()
    return (
        data[lp + 1 : rp].decode(errors="replace"),
        int(fields[1]),
        int(fields[11]) + int(fields[12]),
    )


def _title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return "?"
    parts = [p for p in raw.split(b"\0") if p]
    if not parts:
        return "?"
    first = parts[0].decode(errors="replace").strip()
    if first.startswith("ray::"):
        return first
    text = " ".join(p.decode(errors="replace") for p in parts[:4])
    return text[:200]


def sample_loop(out_path: str, root: int, interval: float) -> None:
    """Every ``interval`` s: CPU-time deltas of ``root``'s descendants (and their threads),
    by title, and the whole host's busy jiffies; written as JSON on SIGTERM."""
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    me = os.getpid()
    last_cpu: dict[int, int] = {}
    last_title: dict[int, str] = {}
    last_thread: dict[tuple[int, int], int] = {}
    last_wait: dict[int, int] = {}
    ticks = []
    by_pid: dict[str, dict[str, int]] = {}  # pid -> title -> CPU ticks
    first = True
    while not stop:
        t = time.monotonic()
        stats = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                s = _stat(f"/proc/{name}/stat")
                if s is not None:
                    stats[int(name)] = s
        children: dict[int, list[int]] = {}
        for pid, (_, ppid, _) in stats.items():
            children.setdefault(ppid, []).append(pid)
        ours, todo = [], [root]
        while todo:
            pid = todo.pop()
            ours.append(pid)
            todo.extend(children.get(pid, []))
        procs, threads, occ, waits = {}, {}, {}, {}
        for pid in ours:
            if pid == me or pid not in stats:
                continue
            cpu = stats[pid][2]
            title = "driver" if pid == root else _title(pid)
            prev_title = last_title.get(pid, title)
            delta = cpu - last_cpu.get(pid, 0 if not first else cpu)
            last_cpu[pid], last_title[pid] = cpu, title
            key = title if prev_title == title else f"{prev_title} | {title}"
            occ[title] = occ.get(title, 0) + 1
            # the main thread's time waiting on a run queue (runnable, not running)
            try:
                with open(f"/proc/{pid}/schedstat") as f:
                    wait_ns = int(f.read().split()[1])
            except (OSError, IndexError, ValueError):
                wait_ns = None
            if wait_ns is not None:
                dw = wait_ns - last_wait.get(pid, 0 if not first else wait_ns)
                last_wait[pid] = wait_ns
                if dw > 0:
                    waits[key] = waits.get(key, 0) + dw
            if delta <= 0 and not first:
                continue
            if delta > 0:
                procs[key] = procs.get(key, 0) + delta
                per_pid = by_pid.setdefault(str(pid), {})
                per_pid[key] = per_pid.get(key, 0) + delta
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for tid in tids:
                s = _stat(f"/proc/{pid}/task/{tid}/stat")
                if s is None:
                    continue
                k = (pid, int(tid))
                d = s[2] - last_thread.get(k, 0 if not first else s[2])
                last_thread[k] = s[2]
                if d > 0:
                    tk = f"{key}\t{s[0]}"
                    threads[tk] = threads.get(tk, 0) + d
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        busy = sum(fields) - fields[3] - fields[4]
        ticks.append(
            {
                "t": t,
                "procs": procs,
                "threads": threads,
                "host_busy": busy,
                "occupied": occ,
                "runqueue_wait_ns": waits,
            }
        )
        first = False
        time.sleep(max(0.0, interval - (time.monotonic() - t)))
    with open(out_path, "w") as f:
        json.dump({"clk_tck": CLK_TCK, "sampler_pid": me, "ticks": ticks, "by_pid": by_pid}, f)


# Role of a process title (the first rule that matches: a fused Ray Data task's title names
# every operator it runs).
ROLE_RULES = (
    ("decode", ("_decode",)),
    ("model_init", ("ModelActor)).__init__",)),
    ("model_actor", ("ModelActor",)),
    ("write", ("Write", "HubertFeatures", "write_datasink")),
    (
        "manifest",
        ("_todo", "_read_manifest", "ReadRange", "FromItems", "Repartition", "from_items"),
    ),
    (
        "summary",
        (
            "_summarize",
            "_check_slice",
            "_unexpected",
            "_list_parts",
            "_index_range",
            "_combine_index",
            "mean_segment_seconds",
        ),
    ),
    ("worker_idle", ("ray::IDLE",)),
    ("worker_startup", ("default_worker.py",)),
    ("driver", ("driver",)),
    (
        "ray_daemons",
        ("raylet", "gcs_server", "dashboard", "runtime_env", "log_monitor", "monitor.py", "agent"),
    ),
)


def role_of(title: str) -> str:
    # "A | B": the title changed within the tick; the later one's role (the sampler saw it
    # at the tick's end) unless it is idle.
    parts = [p.strip() for p in title.split(" | ")]
    for part in reversed(parts):
        r = _role(part)
        if r != "worker_idle":
            return r
    return _role(parts[-1])


def _role(title: str) -> str:
    for role, keys in ROLE_RULES:
        if any(k in title for k in keys):
            return role
    return "ray_other" if title.startswith("ray::") else "other_process"


def attribute(samples: dict, run: tuple, window, audio_s: float, steady_audio_s: float) -> dict:
    """CPU seconds per role (and per role and thread name) over the run and the steady window;
    per audio hour."""
    hz = samples["clk_tck"]
    ticks = samples["ticks"]

    def collect(lo, hi):
        roles, threads, titles, occupied, waits = {}, {}, {}, {}, {}
        host = 0
        prev_busy = prev_t = None
        for tk in ticks:
            inside = lo < tk["t"] <= hi
            if inside and prev_busy is not None:
                host += tk["host_busy"] - prev_busy
                dt = tk["t"] - prev_t
                for title, n in tk.get("occupied", {}).items():
                    r = role_of(title)
                    occupied[r] = occupied.get(r, 0.0) + n * dt
            prev_busy, prev_t = tk["host_busy"], tk["t"]
            if not inside:
                continue
            for title, ns in tk.get("runqueue_wait_ns", {}).items():
                r = role_of(title)
                waits[r] = waits.get(r, 0.0) + ns / 1e9
            for title, d in tk["procs"].items():
                r = role_of(title)
                roles[r] = roles.get(r, 0) + d / hz
                titles[title] = titles.get(title, 0) + d / hz
            for key, d in tk["threads"].items():
                title, comm = key.split("\t")
                k = f"{role_of(title)}/{comm}"
                threads[k] = threads.get(k, 0) + d / hz
        ours = sum(roles.values())
        return {
            "seconds": round(hi - lo, 3),
            "cpu_s": {k: round(v, 2) for k, v in sorted(roles.items(), key=lambda kv: -kv[1])},
            "job_cpu_s": round(ours, 2),
            "host_busy_cpu_s": round(host / hz, 2),
            "other_host_cpu_s": round(host / hz - ours, 2),
            "threads_cpu_s": {
                k: round(v, 2)
                for k, v in sorted(threads.items(), key=lambda kv: -kv[1])
                if v >= 0.05
            },
            # per role: processes in it on average (task slots held), the CPU they used per
            # process-second held, and their main threads' run-queue waits per process-second
            # (runnable but not running: CPU contention)
            "occupancy": {
                r: {
                    "processes": round(v / max(1e-9, hi - lo), 3),
                    "cpu_per_held_s": round(roles.get(r, 0.0) / v, 3) if v else None,
                    "runqueue_wait_per_held_s": round(waits.get(r, 0.0) / v, 3) if v else None,
                }
                for r, v in sorted(occupied.items(), key=lambda kv: -kv[1])
            },
            "titles_cpu_s": {
                k: round(v, 2)
                for k, v in sorted(titles.items(), key=lambda kv: -kv[1])
                if v >= 0.05
            },
        }

    out = {"whole": collect(*run)}
    out["whole"]["audio_h"] = round(audio_s / 3600, 4)
    out["whole"]["per_audio_hour"] = {
        k: round(v / (audio_s / 3600), 1) for k, v in out["whole"]["cpu_s"].items()
    }
    out["whole"]["job_per_audio_hour"] = round(out["whole"]["job_cpu_s"] / (audio_s / 3600), 1)
    if window:
        s = collect(*window)
        h = steady_audio_s / 3600
        s["audio_h"] = round(h, 4)
        s["per_audio_hour"] = {k: round(v / h, 1) for k, v in s["cpu_s"].items()}
        s["job_per_audio_hour"] = round(s["job_cpu_s"] / h, 1)
        s["job_cores_busy"] = round(s["job_cpu_s"] / s["seconds"], 3)
        out["steady"] = s
    return out


# -- in-process profiler ---------------------------------------------------------------------------
PROFILE_ENV = "HOST_CAPACITY_PROFILE_DIR"


class ThreadCpuProfiler:
    """A sampling profiler inside one process whose samples are weighted by CPU time: every
    ``interval`` s a daemon thread reads each Python thread's CPU clock
    (``pthread_getcpuclockid``) and gives the CPU that thread used since the last tick to the
    stack it is on now (``sys._current_frames``), classified by :func:`fine_stage_of` under the
    process's title at that moment (``/proc/self/cmdline``: Ray's ``ray::<task>``). Idle
    threads cost nothing and count nothing; threads without Python (Ray's C++ threads) are
    not seen (the /proc table has them). Its own CPU is counted apart (``profiler``). The
    totals are rewritten to ``<dir>/<pid>.json`` every ``flush_s`` and at exit."""

    def __init__(self, out_dir: str, interval: float = 0.02, flush_s: float = 1.0):
        import threading

        self.path = os.path.join(out_dir, f"{os.getpid()}.json")
        self.interval, self.flush_s = interval, flush_s
        self.last: dict[int, float] = {}
        self.stages: dict[str, float] = {}  # "title\tfine stage" -> CPU s
        self.leaves: dict[str, float] = {}  # "title\tfine stage\tframe" -> CPU s
        self.cache: dict[tuple, tuple[str, str]] = {}
        self.own = 0.0
        self.own_by_title: dict[str, float] = {}
        self._thread = threading.Thread(target=self._run, name="cpu-profiler", daemon=True)
        self._thread.start()
        import atexit

        atexit.register(self.flush)

    def _classify(self, frame) -> tuple[str, str]:
        codes = []
        f = frame
        while f is not None and len(codes) < 80:
            codes.append(f.f_code)
            f = f.f_back
        key = tuple(codes)
        hit = self.cache.get(key)
        if hit is None:
            stack = [(c.co_name, c.co_filename) for c in codes]
            stage = fine_stage_of(stack)
            # the innermost frame the rule matched on, else the innermost frame
            where = stack[0] if stack else ("?", "?")
            for name, path in stack:
                if _matches(stage, name, path):
                    where = (name, path)
                    break
            hit = (stage, f"{where[0]} ({'/'.join(where[1].split('/')[-2:])})")
            if len(self.cache) < 200_000:
                self.cache[key] = hit
        return hit

    def _run(self) -> None:
        me = __import__("threading").get_ident()
        next_flush = time.monotonic() + self.flush_s
        while True:
            time.sleep(self.interval)
            t0 = time.thread_time()
            title = _title(os.getpid())
            title = title if title.startswith("ray::") else "driver-or-startup:" + title[:60]
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                try:
                    cpu = time.clock_gettime(time.pthread_getcpuclockid(ident))
                except (OSError, OverflowError, ValueError):
                    continue
                prev = self.last.get(ident)
                self.last[ident] = cpu
                if prev is None or cpu <= prev:
                    continue
                stage, where = self._classify(frame)
                k = f"{title}\t{stage}"
                self.stages[k] = self.stages.get(k, 0.0) + cpu - prev
                k = f"{k}\t{where}"
                self.leaves[k] = self.leaves.get(k, 0.0) + cpu - prev
            del frame
            own = time.thread_time() - t0
            self.own += own
            self.own_by_title[title] = self.own_by_title.get(title, 0.0) + own
            if time.monotonic() >= next_flush:
                self.flush()
                next_flush = time.monotonic() + self.flush_s

    def flush(self) -> None:
        data = {
            "pid": os.getpid(),
            "stages": dict(self.stages),
            "leaves": dict(self.leaves),
            "profiler_cpu_s": self.own,
            "profiler_cpu_s_by_title": dict(self.own_by_title),
        }
        tmp = f"{self.path}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(data, f)
            os.replace(tmp, self.path)
        except OSError:
            pass


_PROFILER = None


def worker_hook() -> None:
    """Ray's ``worker_process_setup_hook`` (and the driver's): a :class:`ThreadCpuProfiler` in
    this process when ``$HOST_CAPACITY_PROFILE_DIR`` is set."""
    global _PROFILER
    out = os.environ.get(PROFILE_ENV)
    if out and _PROFILER is None:
        os.makedirs(out, exist_ok=True)
        _PROFILER = ThreadCpuProfiler(out)


def _matches(stage: str, name: str, path: str) -> bool:
    for st, frag, names in FINE_RULES:
        if st == stage and frag in path and (names is None or name in names):
            return True
    return False


def profiles_by_role(profile_dir: str) -> dict:
    """The processes' profiles summed by role (from each sample's process title): CPU
    seconds per fine stage, and the top frames."""
    roles: dict[str, dict] = {}
    own = 0.0
    for path in glob.glob(os.path.join(profile_dir, "*.json")):
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        own += data.get("profiler_cpu_s", 0.0)
        for title, cpu in data.get("profiler_cpu_s_by_title", {}).items():
            r = roles.setdefault(_profile_role(title), {"stages": {}, "leaves": {}})
            r["profiler_cpu_s"] = r.get("profiler_cpu_s", 0.0) + cpu
        for key, cpu in data["stages"].items():
            title, stage = key.split("\t")
            r = roles.setdefault(_profile_role(title), {"stages": {}, "leaves": {}})
            r["stages"][stage] = r["stages"].get(stage, 0.0) + cpu
        for key, cpu in data["leaves"].items():
            title, stage, where = key.split("\t")
            r = roles.setdefault(_profile_role(title), {"stages": {}, "leaves": {}})
            k = f"{stage}: {where}"
            r["leaves"][k] = r["leaves"].get(k, 0.0) + cpu
    out = {"profiler_cpu_s": round(own, 2), "roles": {}}
    for role, r in roles.items():
        total = sum(r["stages"].values())
        out["roles"][role] = {
            "cpu_s": round(total, 2),
            "profiler_cpu_s": round(r.get("profiler_cpu_s", 0.0), 3),
            "stages_cpu_s": {
                k: round(v, 3) for k, v in sorted(r["stages"].items(), key=lambda kv: -kv[1])
            },
            "share": {
                k: round(v / total, 4)
                for k, v in sorted(r["stages"].items(), key=lambda kv: -kv[1])
            }
            if total
            else {},
            "top_frames_cpu_s": {
                k: round(v, 3) for k, v in sorted(r["leaves"].items(), key=lambda kv: -kv[1])[:30]
            },
        }
    return out


def _profile_role(title: str) -> str:
    if title.startswith("driver-or-startup:"):
        return "worker_startup" if "default_worker.py" in title else "driver"
    return role_of(title)


# Fine stage of a py-spy sample: walking the stack from the innermost frame outwards, the
# first frame that a rule matches decides (a numpy call under ``_cut`` is cut/normalise, under
# ``features_array`` the model actor's Arrow output). A rule: (fine stage, file path
# fragment, function names or None for any). Frames are Python frames (py-spy without
# --native: time in C code, libopus or Arrow's C++, counts for the Python frame that called it).
FINE_RULES = (
    # frames that decide nothing: the caller's frame does
    ("_skip", "hubert_ray/io/storage.py", None),
    ("_skip", "hubert_ray/core/errors.py", None),
    # decoding (soundfile -> libsndfile -> libopus / libFLAC; soxr) and reading the bytes
    ("decode.soundfile", "/soundfile.py", None),
    ("decode.soundfile", "/soxr/", None),
    ("cut.segment", "hubert_ray/corpus/reading.py", {"samples", "release", "start"}),
    ("decode.stream", "hubert_ray/corpus/reading.py", None),
    ("decode.stream", "hubert_ray/corpus/objects.py", None),
    ("decode.stream", "/fsspec/", None),
    (
        "cut.segment",
        "hubert_ray/corpus/decoding.py",
        {"segment_bounds", "_check_times", "cut_segment", "_times"},
    ),
    ("decode.stream", "hubert_ray/corpus/decoding.py", None),
    # cutting and normalising
    ("cut.normalise", "hubert_ray/core/signal.py", {"normalise"}),
    (
        "cut.segment",
        "hubert_ray/corpus/audio.py",
        {
            "_cut",
            "_decode_rows",
            "_cut_as_decoded",
            "_pending",
            "_sparse",
            "_next_run",
            "_forget_failed",
            "samples",
            "release",
            "segment_bounds",
            "_check_times",
            "cut_segment",
        },
    ),
    # the decode stage's Arrow output (concatenating the segments, building the arrays)
    ("decode.arrow_out", "hubert_ray/corpus/audio.py", {"__call__", "_table"}),
    ("decode.stream", "hubert_ray/corpus/audio.py", None),  # streams, the recording cache
    # the model actor's host work
    (
        "model.arrow_out",
        "hubert_ray/stages/extractor.py",
        {
            "features_array",
            "units_array",
            "unit_run_arrays",
            "_valid_only",
            "assemble",
            "finish",
            "feature_type",
        },
    ),
    ("model.arrow_in", "hubert_ray/stages/extractor.py", {"audio_views", "launch"}),
    ("model.report", "hubert_ray/stages/extractor.py", {"_write_report"}),
    ("model.stage", "hubert_ray/stages/extractor.py", None),
    ("model.engine", "hubert_ray/model/", None),
    ("model.engine", "hubert_ray/core/chunking.py", None),
    ("model.engine", "/torch/", None),
    ("model.actor", "hubert_ray/backend/actor.py", None),
    (
        "model.actor",
        "hubert_ray/backend/pipeline.py",
        {"__call__", "_sub_calls", "_call", "_launch", "_run", "_new_retries", "_compute"},
    ),
    # writing Parquet
    ("write.parquet", "/pyarrow/parquet/", None),
    ("write.sink", "hubert_ray/dataset/output.py", None),
    ("write.sink", "hubert_ray/backend/sink.py", None),
    ("write.sink", "hubert_ray/backend/pipeline.py", {"write", "put", "on_write_complete"}),
    # the decode task's wrapper (per batch: the config key, the retries column)
    (
        "task.decode_wrapper",
        "hubert_ray/backend/",
        {"_decode", "_with_retries_column", "_upstream_retries", "trace", "_trace"},
    ),
    # the job's other task functions (manifest expansion, resume index, summary)
    ("task.other", "hubert_ray/", None),
    # Ray: serialisation and the object store, Ray Data's blocks, batching and bookkeeping
    ("ray.serialization", "ray/_private/serialization.py", None),
    ("ray.serialization", "ray/_private/arrow_serialization.py", None),
    ("ray.serialization", "/cloudpickle/", None),
    ("ray.serialization", "/pickle.py", None),
    (
        "ray.serialization",
        "ray/_private/worker.py",
        {"put_object", "get_objects", "deserialize_objects"},
    ),
    ("ray.data_blocks", "ray/data/_internal/arrow_block.py", None),
    ("ray.data_blocks", "ray/data/_internal/table_block.py", None),
    ("ray.data_blocks", "ray/data/_internal/arrow_ops/", None),
    ("ray.data_blocks", "ray/data/_internal/output_buffer.py", None),
    ("ray.data_blocks", "ray/data/_internal/batcher.py", None),
    ("ray.data_blocks", "ray/data/_internal/block_batching/", None),
    ("ray.data_blocks", "ray/data/_internal/pandas_block.py", None),
    ("ray.data_blocks", "ray/data/block.py", None),
    ("ray.data_executor", "ray/data/_internal/execution/", None),
    ("ray.data_other", "ray/data/", None),
    ("ray.task_loop", "ray/_private/worker.py", {"main_loop"}),
    ("ray.other", "/ray/", None),
    ("python.import", "<frozen importlib", None),
)
# Fine stage -> the stage of the breakdown table.
COARSE = {
    "decode.soundfile": "decode",
    "decode.stream": "decode",
    "cut.normalise": "cut_normalise",
    "cut.segment": "cut_normalise",
    "decode.arrow_out": "decode_arrow",
    "task.decode_wrapper": "decode_arrow",
    "model.arrow_out": "model_host",
    "model.arrow_in": "model_host",
    "model.report": "model_host",
    "model.stage": "model_host",
    "model.engine": "model_host",
    "model.actor": "model_host",
    "write.parquet": "write",
    "write.sink": "write",
    "ray.serialization": "transfer",
    "ray.data_blocks": "transfer",
    "ray.task_loop": "transfer",
    "ray.data_executor": "ray_overhead",
    "ray.data_other": "ray_overhead",
    "ray.other": "ray_overhead",
    "python.import": "ray_overhead",
    "task.other": "manifest_summary",
    "unsampled": "ray_cpp_threads",
    "other": "other",
}


def fine_stage_of(stack: list[tuple[str, str]]) -> str:
    """``stack``: (function, file) pairs, innermost first."""
    for name, path in stack:
        for stage, frag, names in FINE_RULES:
            if frag in path and (names is None or name in names):
                if stage == "_skip":
                    break  # the next frame out decides
                return stage
    return "other"


def role_shares(profile: dict, proc_cpu_s: dict) -> dict:
    """Each role's fine-stage shares of its /proc CPU in the profiled run: what the profiler
    saw in its Python threads, and ``unsampled`` for the rest (threads without Python: Ray's
    C++ core-worker threads; start-up before the profiler)."""
    out = {}
    for role, prof in profile["roles"].items():
        # the role's CPU without the profiler's own (it runs in every profiled process)
        total = proc_cpu_s.get(role, 0.0) - prof.get("profiler_cpu_s", 0.0)
        if total <= 0:
            continue
        share = {k: v / total for k, v in prof["stages_cpu_s"].items()}
        seen = sum(share.values())
        if seen < 1:
            share["unsampled"] = 1 - seen
        else:  # sampled more than /proc saw (clock granularity, title changes): normalise
            share = {k: v / seen for k, v in share.items()}
        out[role] = {
            "share": {k: round(v, 4) for k, v in sorted(share.items(), key=lambda kv: -kv[1])}
        }
    return out


# Stages of a role's CPU with no profile: all of it in one.
ROLE_STAGE = {
    "decode": "decode",
    "model_actor": "model_host",
    "write": "write",
    "driver": "ray_overhead",
    "ray_daemons": "ray_overhead",
    "worker_idle": "ray_overhead",
    "ray_other": "ray_overhead",
    "manifest": "manifest_summary",
    "summary": "manifest_summary",
    "other_process": "ray_overhead",
    "worker_startup": "worker_startup",
    "model_init": "model_init",
}
STAGES = (
    "decode",
    "cut_normalise",
    "decode_arrow",
    "transfer",
    "ray_cpp_threads",
    "model_host",
    "model_init",
    "write",
    "manifest_summary",
    "worker_startup",
    "ray_overhead",
    "other",
)


SPLIT_ROLES = ("decode", "model_actor", "write")


def stage_table(cpu: dict, split: dict | None) -> dict:
    """CPU seconds per audio hour by stage: each role's CPU, split by its profile's shares."""
    out = dict.fromkeys(STAGES, 0.0)
    for role, per_h in cpu["per_audio_hour"].items():
        shares = (split or {}).get(role, {}).get("share")
        if not shares or role not in SPLIT_ROLES:
            out[ROLE_STAGE.get(role, "other")] += per_h
            continue
        for fine, share in shares.items():
            out[COARSE.get(fine, "other")] += per_h * share
    return {k: round(v, 1) for k, v in out.items()}


# Rows of the report's table: a fine stage of a profiled role, or a whole role.
REPORT_ROWS = (
    ("decode (soundfile: libopus/libFLAC, reading bytes)", ("decode.soundfile", "decode.stream")),
    ("cut (segment bounds, copies out of the stream)", ("cut.segment",)),
    ("normalise (core/signal.py:normalise)", ("cut.normalise",)),
    (
        "decode stage's Arrow output (audio.py:DecodeStage._table)",
        ("decode.arrow_out", "task.decode_wrapper"),
    ),
    (
        "transfers/serialisation: Ray serialisation, Ray Data blocks/batching, task loop, "
        "Ray C++ threads in workers",
        ("ray.serialization", "ray.data_blocks", "ray.task_loop", "unsampled"),
    ),
    (
        "model actor host work (Arrow in/out, packing, staging, engine; its non-Python threads)",
        (
            "model.arrow_in",
            "model.arrow_out",
            "model.engine",
            "model.stage",
            "model.actor",
            "model.report",
        ),
    ),
    ("write (Parquet: pq.write_table)", ("write.parquet", "write.sink")),
    (
        "Ray Data/Ray Python code in workers, imports, other",
        (
            "ray.data_executor",
            "ray.data_other",
            "ray.other",
            "python.import",
            "task.other",
            "other",
        ),
    ),
)
FIXED_ROLES = (
    "worker_startup",
    "worker_idle",
    "model_init",
    "manifest",
    "summary",
    "other_process",
)
CONTROL_ROLES = ("driver", "ray_daemons", "ray_other")


def report_table(result: dict, variant: str = "base") -> tuple[list[tuple[str, float, float]], str]:
    """CPU seconds per audio hour by stage (median whole-run role CPU, the audio-proportional
    roles split by the profile's shares; steady-window figures beside), and a Markdown table."""
    v = result["summary"]["variants"][variant]
    split = result.get("profile_split") or {}
    rows = []
    for win in ("whole", "steady"):
        roles = v[f"median_roles_per_audio_hour_{win}"]
        out = {}
        for role in SPLIT_ROLES:
            per_h = roles.get(role, 0.0)
            shares = dict(split.get(role, {}).get("share") or {"other": 1.0})
            if role == "model_actor":  # its threads without Python: torch's, Ray's C++ ones
                shares["model.engine"] = shares.get("model.engine", 0.0) + shares.pop(
                    "unsampled", 0.0
                )
            for label, fines in REPORT_ROWS:
                out[label] = out.get(label, 0.0) + per_h * sum(shares.get(f, 0.0) for f in fines)
        out["Ray control plane: driver (Ray Data executor), raylet/gcs/agents, Ray's actors"] = sum(
            roles.get(r, 0.0) for r in CONTROL_ROLES
        )
        out["fixed start-up: worker start/imports, model actor init, manifest, summary"] = sum(
            roles.get(r, 0.0) for r in FIXED_ROLES
        )
        rows.append(out)
    whole, steady = rows
    table = [(k, round(whole[k], 2), round(steady.get(k, 0.0), 2)) for k in whole]
    raw = result["summary"]["median_raw_cpu_s_per_audio_hour"]
    lines = [
        "| stage | CPU s per audio hour, whole run | steady window |",
        "|---|---|---|",
        *(f"| {k} | {a:.2f} | {b:.2f} |" for k, a, b in table),
        f"| **job total** | **{sum(a for _, a, _ in table):.2f}** | "
        f"**{sum(b for _, _, b in table):.2f}** |",
        f"| raw decode alone (sf.read, one process) | {raw:.2f} | {raw:.2f} |",
    ]
    return table, "\n".join(lines)


# -- decode probe ---------------------------------------------------------------------------------
def decode_probe(path: str, minutes: float, repeats: int = 3) -> dict:
    """CPU seconds per audio hour on one core, alternating, of ways to decode one recording:
    soundfile on the path (whole, or in windows of several sizes), through the job's file
    objects (fsspec's local file in ``objects.GuardedFile``: libsndfile calls back into Python
    for every read/seek/tell), from memory (BytesIO), the job's ``RecordingStream``, and the
    job's whole ``DecodeStage`` (decode, cut, normalise or not, Arrow) on the recording's
    segments in batches of 128."""
    import io

    import pyarrow as pa
    import soundfile as sf

    from hubert_ray.corpus import audio as job_audio
    from hubert_ray.corpus.objects import GuardedFile
    from hubert_ray.corpus.reading import RecordingStream
    from hubert_ray.io.storage import filesystem

    try:
        from hubert_ray.core.config import DecodeConfig
    except ImportError:  # moved
        from hubert_ray.core.stage_config import DecodeConfig

    audio_h = minutes / 60
    segs = segment_times(minutes * 60, seed=0)
    table = pa.table(
        {
            "segment_id": [f"s{i}" for i in range(len(segs))],
            "recording_id": ["r"] * len(segs),
            "audio_uri": [path] * len(segs),
            "start_s": [a for a, _ in segs],
            "end_s": [b for _, b in segs],
        }
    )
    batches = [table.slice(i, 128) for i in range(0, table.num_rows, 128)]

    def windows(f, n):
        with sf.SoundFile(f) as snd:
            while snd.read(n, dtype="float32", always_2d=True).shape[0] == n:
                pass

    def fsspec_windows(n):
        fs, p = filesystem(path)
        with fs.open(p, "rb") as raw:
            windows(GuardedFile(raw), n)

    def stream():
        rs = RecordingStream(path)
        while rs.fill():
            rs.release(rs.pos)
        rs.close()

    def stage(normalize):
        job_audio.clear_cache()
        st = job_audio.DecodeStage(DecodeConfig(normalize=normalize))
        for b in batches:
            st(b)
        job_audio.clear_cache()

    with open(path, "rb") as f:
        data = f.read()
    ways = {
        "sf.read(path) whole (the raw baseline)": lambda: sf.read(path, dtype="float32"),
        "SoundFile(path), windows of 65536": lambda: windows(path, 1 << 16),
        "SoundFile(BytesIO), windows of 65536": lambda: windows(io.BytesIO(data), 1 << 16),
        "SoundFile(GuardedFile(fsspec)), windows of 16384": lambda: fsspec_windows(1 << 14),
        "SoundFile(GuardedFile(fsspec)), windows of 65536 (the job's path)": lambda: fsspec_windows(
            1 << 16
        ),
        "SoundFile(GuardedFile(fsspec)), windows of 262144": lambda: fsspec_windows(1 << 18),
        "RecordingStream.fill to the end (the job's reader)": stream,
        "DecodeStage, normalize on (the job's decode task)": lambda: stage(True),
        "DecodeStage, normalize off": lambda: stage(False),
    }
    res: dict[str, list] = {k: [] for k in ways}
    for _ in range(repeats):
        for name, fn in ways.items():
            t0 = time.process_time()
            fn()
            res[name].append(round((time.process_time() - t0) / audio_h, 3))
    return {
        name: {"cpu_s_per_audio_hour": v, "median": float(np.median(v))} for name, v in res.items()
    }


# -- write probe --------------------------------------------------------------------------------
def write_probe(work: str, rows: int = 256, repeats: int = 3) -> dict:
    """output.write_part's x-realtime on one core: zero features (the simulated device's)
    against random float16 ones, and a few Parquet options on the random ones."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hubert_ray.dataset import output
    from hubert_ray.stages.extractor import features_array

    rng = np.random.default_rng(0)
    durs = [b - a for a, b in segment_times(rows * SEG_MEAN_S * 1.2, 0)][:rows]
    frames = [max(1, int((d * SR - 400) // 320) + 1) for d in durs]
    audio_s = sum(durs)
    n = sum(frames)

    def table(values, layout="job"):
        if layout == "job":  # list<fixed_size_list<half, 768>>: one Parquet leaf per value
            feats = features_array(values, frames, [True] * len(frames), "float16")
        elif layout == "flat":  # list<half>: the row's frames x 768 values, one list level
            offsets = np.concatenate(([0], np.cumsum(frames) * 768)).astype(np.int32)
            feats = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.reshape(-1)))
        elif layout == "frame_binary":  # list<fixed_size_binary(1536)>: one leaf per frame
            offsets = np.concatenate(([0], np.cumsum(frames))).astype(np.int32)
            buf = pa.py_buffer(np.ascontiguousarray(values).view(np.uint8).reshape(-1))
            inner = pa.FixedSizeBinaryArray.from_buffers(
                pa.binary(values.shape[1] * 2), values.shape[0], [None, buf]
            )
            feats = pa.ListArray.from_arrays(pa.array(offsets), inner)
        else:  # "blob": one large_binary value per row (frames x 768 float16 bytes)
            offsets = np.concatenate(([0], np.cumsum(frames) * 768 * 2)).astype(np.int64)
            buf = pa.py_buffer(np.ascontiguousarray(values).view(np.uint8).reshape(-1))
            feats = pa.LargeBinaryArray.from_buffers(
                pa.large_binary(), len(frames), [None, pa.py_buffer(offsets), buf]
            )
        ids = [f"r-{i:06d}" for i in range(len(frames))]
        return pa.table(
            {
                "segment_id": ids,
                "recording_id": ["r"] * len(ids),
                "start_s": pa.array(np.zeros(len(ids))),
                "end_s": pa.array(durs),
                "num_frames": pa.array(frames, pa.int32()),
                "layer_9": feats,
            }
        )

    rand = rng.standard_normal((n, 768), dtype=np.float32).astype(np.float16)
    tables = {
        "zeros": table(np.zeros((n, 768), np.float16)),
        "random": table(rand),
        "random_flat": table(rand, "flat"),
        "random_blob": table(rand, "blob"),
        "random_frame_binary": table(rand, "frame_binary"),
    }
    variants = {
        "warm_up": ("random", None),
        "job_options_zeros": ("zeros", None),
        "job_options_random": ("random", None),
        "random_no_compression": ("random", {"compression": "none"}),
        "random_zstd1": ("random", {"compression": "zstd", "compression_level": 1}),
        "random_dictionary_on": ("random", {"use_dictionary": True}),
        "random_batch_2000": ("random", {"_batch": 100000}),
        "random_batch_16": ("random", {"_batch": 16}),
        "random_flat_list_layout": ("random_flat", {}),
        "random_binary_blob_layout": ("random_blob", {}),
        "random_frame_binary_layout": ("random_frame_binary", {}),
    }
    res: dict[str, dict] = {k: {"x_realtime": [], "bytes": None} for k in variants}
    d = os.path.join(work, "probe")
    os.makedirs(d, exist_ok=True)
    for _ in range(repeats):
        for name, (src, opts) in variants.items():
            t = tables[src]
            t0 = time.process_time()
            if opts is None:
                path = output.write_part(t, d, {"x": 1}, key=name)
                path = path.replace("file://", "")
            else:
                opts = dict(opts)
                batch = opts.pop("_batch", output.WRITE_BATCH_ROWS)
                tb = pa.Table.from_batches(t.to_batches(batch), t.schema)
                o = output.parquet_options(t.schema) | opts
                path = os.path.join(d, f"{name}.parquet")
                pq.write_table(tb, path, **o)
            cpu = time.process_time() - t0
            res[name]["x_realtime"].append(round(audio_s / cpu))
            res[name]["bytes"] = os.path.getsize(path)
    shutil.rmtree(d, ignore_errors=True)
    res.pop("warm_up")
    for r in res.values():
        r["median"] = float(np.median(r["x_realtime"]))
        r["cpu_s_per_audio_hour"] = round(3600 / r["median"], 1)
        r["bytes_per_audio_s"] = round(r["bytes"] / audio_s)
    return {"rows": len(frames), "audio_s": round(audio_s, 1), "variants": res}


# -- main -----------------------------------------------------------------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return ""


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def median(xs):
    xs = [x for x in xs if x is not None]
    return round(float(np.median(xs)), 3) if xs else None


def summarise(rounds: list[dict], split: dict | None) -> dict:
    raws = {r["round"]: r["raw"]["x_realtime_per_core"] for r in rounds}
    raw_cpu = {r["round"]: 3600 / r["raw"]["x_realtime_per_cpu_second"] for r in rounds}
    out = {"rows": []}
    for r in rounds:
        job, raw = r["job"], r["raw"]
        cpus = job["ray_cpus"]
        row = {
            "round": r["round"],
            "variant": job.get("variant", "base"),
            "raw_x_per_core": raw["x_realtime_per_core"],
            "job_x_steady": job["x_realtime_steady"],
            "job_x_whole": job["x_realtime_whole"],
            "job_x_steady_per_core": round(job["x_realtime_steady"] / cpus, 1)
            if job["x_realtime_steady"]
            else None,
            "job_x_whole_per_core": round(job["x_realtime_whole"] / cpus, 1),
            "load_raw": raw["load"]["loadavg"],
            "load_job": job["load_before"]["loadavg"],
            "load_job_after": job["load_after"]["loadavg"],
            "other_host_cpu_s_steady": (job["cpu"].get("steady") or {}).get("other_host_cpu_s"),
            "profiled": job["profiled"],
        }
        if row["job_x_steady_per_core"]:
            row["ratio_steady"] = round(
                row["job_x_steady_per_core"] / raw["x_realtime_per_core"], 3
            )
        row["ratio_whole"] = round(row["job_x_whole_per_core"] / raw["x_realtime_per_core"], 3)
        w = job["cpu"].get("steady") or job["cpu"]["whole"]
        row["job_cpu_per_audio_hour_steady"] = w["job_per_audio_hour"]
        row["job_cpu_per_audio_hour_whole"] = job["cpu"]["whole"]["job_per_audio_hour"]
        # the same ratio in CPU time (load-proof: other users' processes take wall time, not
        # CPU time): raw decode's CPU seconds per audio hour / the job's
        raw_cpu_h = 3600 / raw["x_realtime_per_cpu_second"]
        row["raw_cpu_per_audio_hour"] = round(raw_cpu_h, 1)
        row["ratio_cpu_steady"] = round(raw_cpu_h / w["job_per_audio_hour"], 3)
        row["ratio_cpu_whole"] = round(raw_cpu_h / row["job_cpu_per_audio_hour_whole"], 3)
        row["job_cores_busy_steady"] = w.get("job_cores_busy")
        # the profile's shares split the roles of runs of the profiled (baseline) code only
        shares = split if row["variant"] == "base" else None
        row["stages_per_audio_hour_steady"] = stage_table(w, shares)
        row["stages_per_audio_hour_whole"] = stage_table(job["cpu"]["whole"], shares)
        row["roles_per_audio_hour_steady"] = w["per_audio_hour"]
        row["roles_per_audio_hour_whole"] = job["cpu"]["whole"]["per_audio_hour"]
        occ = w.get("occupancy", {})
        row["steady_processes"] = {r: occ[r]["processes"] for r in ("decode", "write") if r in occ}
        out["rows"].append(row)
    out["median_raw_x_per_core"] = median(list(raws.values()))
    out["median_raw_cpu_s_per_audio_hour"] = median(list(raw_cpu.values()))
    out["variants"] = {}
    for variant in dict.fromkeys(row["variant"] for row in out["rows"]):
        timed = [row for row in out["rows"] if not row["profiled"] and row["variant"] == variant]
        if not timed:
            continue
        keys = (
            "job_x_steady",
            "job_x_whole",
            "ratio_steady",
            "ratio_whole",
            "ratio_cpu_steady",
            "ratio_cpu_whole",
            "job_cpu_per_audio_hour_steady",
            "job_cpu_per_audio_hour_whole",
            "job_cores_busy_steady",
        )
        v = {f"median_{k}": median([row.get(k) for row in timed]) for k in keys}
        v["runs"] = len(timed)
        for win in ("steady", "whole"):
            for what in ("stages", "roles"):
                tables = [row[f"{what}_per_audio_hour_{win}"] for row in timed]
                names = dict.fromkeys(k for t in tables for k in t)
                v[f"median_{what}_per_audio_hour_{win}"] = {
                    k: median([t.get(k, 0.0) for t in tables]) for k in names
                }
        # The per-hour cost of a long run: the audio-proportional roles over the whole run (the
        # steady window catches a random share of a run's few write tasks and misses the decode
        # of the first call's audio) plus the control plane at its steady rate (per wall second)
        whole_roles = v["median_roles_per_audio_hour_whole"]
        steady_roles = v["median_roles_per_audio_hour_steady"]
        est = sum(whole_roles.get(r, 0.0) for r in SPLIT_ROLES) + sum(
            steady_roles.get(r, 0.0) for r in CONTROL_ROLES
        )
        v["long_run_cpu_per_audio_hour"] = round(est, 2)
        v["long_run_ratio_cpu"] = round(out["median_raw_cpu_s_per_audio_hour"] / est, 3)
        v["median_steady_processes"] = {
            r: median([row["steady_processes"].get(r, 0.0) for row in timed])
            for r in ("decode", "write")
        }
        out["variants"][variant] = v
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.host_capacity",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--format", choices=sorted(FORMATS), default="opus")
    p.add_argument("--recording-minutes", type=float, default=10.0)
    p.add_argument("--coverage", type=float, default=1.0, help="fraction of segments listed")
    p.add_argument("--hours", type=float, default=2.0, help="hours of recordings")
    p.add_argument("--x-realtime", type=float, default=1e6, help="simulated device speed")
    p.add_argument("--repeats", type=int, default=2, help="rounds of raw decode + job")
    p.add_argument("--unique-recordings", type=int, default=3)
    p.add_argument(
        "--what-if",
        action="append",
        default=[],
        choices=sorted(WHAT_IFS),
        help="also run the job with this change, alternating with the baseline in each round: "
        + "; ".join(f"{k}: {v}" for k, v in WHAT_IFS.items()),
    )
    p.add_argument(
        "--profile", action="store_true", help="one more job run with the CPU-time profiler"
    )
    p.add_argument("--write-probe", action="store_true", help="time write_part on one core")
    p.add_argument(
        "--decode-probe",
        action="store_true",
        help="time ways of decoding one recording on one core (soundfile's I/O paths, window "
        "sizes, the job's reader and decode stage)",
    )
    p.add_argument("--interval", type=float, default=0.05, help="/proc sampling period, s")
    p.add_argument(
        "--corpus-dir", default=os.path.join(tempfile.gettempdir(), "host-capacity-corpus")
    )
    p.add_argument("--profile-dir", help="keep the py-spy profiles here")
    p.add_argument("--json", help="write the result here too")
    p.add_argument(
        "--resummarise", metavar="JSON", help="recompute the summary of a result file in place"
    )
    p.add_argument("--_sample", help=argparse.SUPPRESS)
    p.add_argument("--_root", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._sample:
        sample_loop(args._sample, args._root, args.interval)
        return 0
    if args.resummarise:
        with open(args.resummarise) as f:
            result = json.load(f)
        result["summary"] = summarise(result["rounds"], result.get("profile_split"))
        result["table"], table_md = report_table(result)
        with open(args.resummarise, "w") as f:
            json.dump(result, f, indent=2)
        print(json.dumps(result["summary"]["variants"], indent=2))
        print(table_md)
        return 0
    if not 0 < args.coverage <= 1:
        p.error("--coverage must be in (0, 1]")

    count = max(1, round(args.hours * 60 / args.recording_minutes))
    root = os.path.join(args.corpus_dir, f"{args.format}-{args.recording_minutes:g}min")
    files = make_audio(root, args.format, args.recording_minutes, count, args.unique_recordings)
    work = tempfile.mkdtemp(prefix="host-capacity-")
    manifest = os.path.join(work, "manifest.jsonl")
    corpus = write_manifest(manifest, files, args.recording_minutes, args.coverage)
    corpus |= {
        "format": args.format,
        "recording_minutes": args.recording_minutes,
        "coverage": args.coverage,
        "recording_hours": round(count * args.recording_minutes / 60, 3),
        "bytes_per_audio_s": round(os.path.getsize(files[0]) / (args.recording_minutes * 60)),
        "unique_recordings": min(args.unique_recordings, count),
    }
    from benchmarks.workloads import make_model

    model = make_model("tiny", os.path.join(work, "model"))  # its config only: zeros out
    result = {
        "meta": {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": "python -m benchmarks.host_capacity "
            + " ".join(sys.argv[1:] if argv is None else argv),
            "git": git("rev-parse", "--short", "HEAD"),
            "dirty_product_files": git("status", "--porcelain", "hubert_ray").splitlines(),
            "cpu": cpu_name(),
            "cpu_count": os.cpu_count(),
            "x_realtime_device": args.x_realtime,
            "interval_s": args.interval,
            "python": platform.python_version(),
        },
        "corpus": corpus,
        "rounds": [],
    }
    print(json.dumps(result["meta"] | {"corpus": corpus}, indent=2), flush=True)
    variants = [None, *args.what_if]
    for k in range(args.repeats):
        raw = raw_decode(files, args.recording_minutes * 60)
        print(
            f"round {k}: raw decode {raw['x_realtime_per_core']}x per core "
            f"(load {raw['load']['loadavg']})",
            flush=True,
        )
        # the variants alternate within each round, their order turning round by round
        turn = k % len(variants)
        for variant in variants[turn:] + variants[:turn]:
            job = job_run(manifest, model, work, args.x_realtime, args.interval, what_if=variant)
            print(
                f"round {k} [{variant or 'base'}]: job steady {job['x_realtime_steady']}x, whole "
                f"{job['x_realtime_whole']}x on {job['ray_cpus']} CPUs "
                f"(load {job['load_before']['loadavg']} -> {job['load_after']['loadavg']})",
                flush=True,
            )
            result["rounds"].append({"round": k, "raw": raw, "job": job})
    split = None
    if args.profile:
        prof_dir = args.profile_dir or os.path.join(work, "profiles")
        shutil.rmtree(prof_dir, ignore_errors=True)
        raw = raw_decode(files, args.recording_minutes * 60)
        job = job_run(manifest, model, work, args.x_realtime, args.interval, prof_dir)
        split = role_shares(job["profile"], job["cpu"]["whole"]["cpu_s"])
        print(
            f"profiled: job steady {job['x_realtime_steady']}x, whole {job['x_realtime_whole']}x",
            flush=True,
        )
        result["rounds"].append({"round": args.repeats, "raw": raw, "job": job})
        result["profile_split"] = split
    if args.write_probe:
        result["write_probe"] = write_probe(work)
    if args.decode_probe:
        result["decode_probe"] = decode_probe(files[0], args.recording_minutes)
        for name, v in result["decode_probe"].items():
            print(f"decode probe: {v['median']:.2f} CPU s per audio hour  {name}", flush=True)
    if result["rounds"]:
        result["summary"] = summarise(result["rounds"], split)
        result["table"], table_md = report_table(result)
        print(json.dumps(result["summary"]["variants"], indent=2))
        print(table_md)
    text = json.dumps(result, indent=2)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            f.write(text)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
