"""The whole pipeline against a simulated accelerator: does the rest of the job keep a device of
speed R busy?

    python -m benchmarks.simulated_device --x-realtime 1000 --hours 10 --json out.json

FLAC decode (CPU tasks) → model actor on :class:`hubert_ray.model.device.SimulatedDevice` (device
time = ``--forward-ms`` + padded samples / R per forward, no host CPU while it computes, zeros
out) → Parquet with one 768-dim float16 layer, on local Ray with one (simulated) GPU and the
job's default options.
Prints and writes::

    device_x_realtime    R
    pipeline_x_realtime  audio seconds / wall seconds of the whole run (start-up included)
    steady_ratio         x-realtime from the first to the last finished model call, / R
    whole_ratio          pipeline_x_realtime / R
    device_busy_share    the device's busy time over the span of its work (idle: waiting for
                         the host)
    real_per_padded      audio over the padded samples the device computed (packing's waste:
                         steady_ratio is about busy share x real per padded)
    micro_batch_cost_s   the per-forward cost each actor packed with at the end (seconds of
                         padded audio: the larger of forward-ms and the host's time per
                         micro-batch, times R)
    forward_cost         what it measured (hubert_ray.model.cost.ForwardCost)
    host_cpu_util        busy share of all of the host's cores during the run (/proc/stat)

The corpus: one hour of WenetSpeech-like mixed-length segments (``--utt-seconds``) in 60 s
FLAC recordings, listed ``--hours`` times under distinct recording ids (each listing is decoded
again: decode cost is real, generation is not repeated).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from benchmarks.workloads import make_lengths, make_model, make_raw, parse_dists, write_corpus


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def repeat_manifest(manifest: str, copies: int) -> str:
    """The manifest listed ``copies`` times with distinct recording and segment ids."""
    with open(manifest) as f:
        records = [json.loads(line) for line in f]
    out = manifest.replace(".jsonl", f"-x{copies}.jsonl")
    with open(out, "w") as f:
        for c in range(copies):
            for r in records:
                segs = [{**s, "id": f"c{c}-{s['id']}"} for s in r["segments"]]
                f.write(json.dumps({**r, "id": f"c{c}-{r['id']}", "segments": segs}) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--x-realtime", type=float, default=1000.0, help="simulated device speed R")
    p.add_argument("--hours", type=float, default=1.0, help="audio hours through the pipeline")
    p.add_argument("--utt-seconds", default="mixed", help="10 (fixed) or mixed[:MEAN]")
    p.add_argument("--unique-hours", type=float, default=1.0, help="distinct audio generated")
    p.add_argument(
        "--forward-ms",
        type=float,
        default=0.0,
        help="the device's fixed time per forward (a GPU's kernel launches), milliseconds",
    )
    p.add_argument(
        "--queue-depth",
        type=int,
        default=None,
        help="model calls launched and unfinished at once (default: the job's; 1 = the device "
        "waits while the host finishes each call and receives the next)",
    )
    p.add_argument(
        "--calls-per-actor",
        type=int,
        default=None,
        help="calls Ray hands the model actor at once (default: the job's)",
    )
    p.add_argument("--json", help="write the result here too")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)

    import ray

    from hubert_ray.backend import extract
    from hubert_ray.core.config import ExtractConfig
    from hubert_ray.model.device import SimulatedDevice

    (dist, secs, mixed), *_ = parse_dists(args.utt_seconds)
    work = tempfile.mkdtemp(prefix="simulated-device-")
    unique_s = min(args.unique_hours, args.hours) * 3600
    raw = make_raw(make_lengths(secs, mixed, unique_s, seed=1), seed=7)
    manifest = write_corpus(os.path.join(work, "corpus"), raw, dist)
    copies = max(1, round(args.hours * 3600 / unique_s))
    manifest = repeat_manifest(manifest, copies)
    model = make_model("tiny", os.path.join(work, "model"))  # its config only: zeros out
    del raw

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.init(address="local", num_gpus=1, include_dashboard=False)
    extra = {
        k: v
        for k, v in (("queue_depth", args.queue_depth), ("calls_per_actor", args.calls_per_actor))
        if v is not None
    }
    cfg = ExtractConfig(manifest=manifest, model=model, output=os.path.join(work, "out"), **extra)
    busy0, total0 = cpu_jiffies()
    t0 = time.perf_counter()
    device = SimulatedDevice(x_realtime=args.x_realtime, forward_s=args.forward_ms / 1e3)
    summary = extract.run(cfg, overwrite=True, device=device)
    wall = time.perf_counter() - t0
    busy1, total1 = cpu_jiffies()
    ray.shutdown()

    from hubert_ray.dataset import output

    # Steady state: the audio of every call after each actor's first, over the time from its
    # first to its last finished call (one actor per simulated GPU).
    # What bounds it: the device's busy share of that span, and real audio per padded sample
    # (the device computes padded micro-batches: steady ratio ~ busy share x real / padded).
    steady, busy, real_per_padded, costs, measured = [], [], [], [], []
    for report in output.actor_reports(cfg.output):
        costs.append(report.get("micro_batch_cost_seconds"))
        measured.append(report.get("forward_cost"))
        sim = report.get("simulated") or {}
        calls = sim.get("calls") or []
        if len(calls) >= 2:
            audio = sum(samples for _, samples in calls[1:]) / 16_000
            span = calls[-1][0] - calls[0][0]
            steady.append(audio / span)
            total_audio = sum(samples for _, samples in calls) / 16_000
            padded_s = sim["busy_s"] - sim["forwards"] * sim["forward_s"]
            real_per_padded.append(total_audio / (padded_s * args.x_realtime))
            busy.append(sim["busy_s"] / (sim["last_end"] - sim["first_start"]))
    result = {
        "device_x_realtime": args.x_realtime,
        "forward_ms": args.forward_ms,
        "micro_batch_cost_s": costs,
        "forward_cost": measured,
        "queue_depth": cfg.queue_depth,
        "calls_per_actor": cfg.calls_per_actor,
        "audio_hours": round(summary["audio_seconds"] / 3600, 3),
        "segments": summary["segments_ok"],
        "wall_s": round(wall, 2),
        "pipeline_x_realtime": round(summary["audio_seconds"] / wall, 1),
        "steady_ratio": round(sum(steady) / args.x_realtime, 4) if steady else None,
        "whole_ratio": round(summary["audio_seconds"] / wall / args.x_realtime, 4),
        "device_busy_share": round(sum(busy) / len(busy), 4) if busy else None,
        "real_per_padded": (
            round(sum(real_per_padded) / len(real_per_padded), 4) if real_per_padded else None
        ),
        "host_cpu_util": round((busy1 - busy0) / max(1, total1 - total0), 3),
        "cpu_count": os.cpu_count(),
        "utt_seconds": args.utt_seconds,
        "phase_seconds": summary["phase_seconds"],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
