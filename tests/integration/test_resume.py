"""Resume, completion marker and crash recovery: SIGKILL a real
``python -m jobs.extract`` run, rerun it, and compare with an uninterrupted run.

The killed run's whole process group (driver, local Ray, its workers) is SIGKILLed once the
first / third part file exists; the rerun of the same command must produce exactly the segments
of an uninterrupted run, each once, with equal feature values (up to one float16 rounding
step: see :func:`_same_features`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pyarrow.compute as pc
import pytest

from hubert_ray import read_features
from hubert_ray.dataset import output
from hubert_ray.testing.synth import synth_signal, write_audio

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.ray

N_RECORDINGS = 8
SEGMENTS_PER_RECORDING = 24  # 0.5 s each: 192 OK segments


@pytest.fixture(scope="module")
def resume_corpus(tmp_path_factory) -> str:
    """8 recordings x 24 half-second segments, plus a missing file and a too-short segment
    (error rows), so a run writes many small parts and lasts long enough to be killed."""
    root = tmp_path_factory.mktemp("resume-corpus")
    lines = []
    for r in range(N_RECORDINGS):
        write_audio(str(root / f"r{r}.wav"), synth_signal(12.0, 16000, seed=r), 16000, "wav16")
        segs = [
            {"id": f"r{r}-{i}", "start_s": 0.5 * i, "end_s": 0.5 * i + 0.5}
            for i in range(SEGMENTS_PER_RECORDING)
        ]
        if r == 0:
            segs.append({"id": "r0-tiny", "start_s": 1.0, "end_s": 1.01})
        lines.append({"id": f"r{r}", "audio": f"r{r}.wav", "segments": segs})
    lines.append(
        {
            "id": "gone",
            "audio": "gone.wav",
            "segments": [{"id": "gone-0", "start_s": 0, "end_s": 1}],
        }
    )
    path = root / "manifest.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(path)


def _env() -> dict:
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env.pop("RAY_ADDRESS", None)
    return env


def _args(manifest: str, model: str, out: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "jobs.extract",
        "--manifest",
        manifest,
        "--model",
        model,
        "--output",
        out,
        "--layers",
        "1,2",
        "--num-gpus",
        "0",
        "--batch-size",
        "4",
        "--decode-batch-size",
        "8",
        "--rows-per-file",
        "3",
        "--quiet",
        *extra,
    ]


def _run(args: list[str], extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**_env(), **(extra_env or {})}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def _parts(out: str) -> int:
    d = os.path.join(out, "features")
    if not os.path.isdir(d):
        return 0
    return sum(1 for f in os.listdir(d) if f.endswith(".parquet") and not f.startswith("."))


def _run_and_kill(args: list[str], after_parts: int) -> int:
    """Start the job in its own process group; SIGKILL the whole group once ``after_parts``
    feature parts exist. Returns the number of parts seen at the kill. Its model calls each
    take 0.2 s more (a slow device), so that it is still running then however fast this
    machine is."""
    from hubert_ray.testing.faults import DELAY_ENV

    proc = subprocess.Popen(
        args,
        cwd=ROOT,
        env={**_env(), DELAY_ENV: "0.2"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    out = args[args.index("--output") + 1]
    deadline = time.time() + 180
    try:
        while _parts(out) < after_parts:
            assert proc.poll() is None, "the job ended before it could be killed"
            assert time.time() < deadline, "no part files appeared"
            time.sleep(0.01)
        seen = _parts(out)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    _wait_group_gone(proc.pid)
    return seen


def _wait_group_gone(pgid: int, timeout_s: float = 30.0) -> None:
    """Every process of the killed group (Ray's raylet, workers) must be gone before the rerun
    lists the output: a straggling writer could otherwise add a part after the listing."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        alive = []
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[2]) == pgid and fields[0] != "Z":
                    alive.append(pid)
        if not alive:
            return
        for pid in alive:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.1)
    raise AssertionError(f"processes of group {pgid} still alive")


def _outcome(out: str) -> tuple[list[str], dict[str, np.ndarray], dict[str, np.ndarray]]:
    feats = output.read_table(os.path.join(out, "features"), ["segment_id"])
    errs = output.read_table(os.path.join(out, "errors"), ["segment_id"])
    ids = feats.column("segment_id").to_pylist() + errs.column("segment_id").to_pylist()
    return ids, read_features(out, layer=1), read_features(out, layer=2)


def _same_features(got: np.ndarray, want: np.ndarray) -> bool:
    """Equal float16 features, up to one float16 rounding step (relative 2**-10) or an absolute
    1e-5 (the float32 tolerance of the model's exactness tests). Which segments share a model
    batch varies between runs (Ray hands blocks to the model stage as they arrive), and CPU
    kernels round differently for different batch shapes: the same segment computed alone and
    in a batch of 4 measured float32 differences of ~2e-6, which flip the float16 rounding of a
    few of its values. Another segment's features differ by ~1."""
    if got.shape != want.shape:
        return False
    return np.allclose(got.astype(np.float32), want.astype(np.float32), rtol=2**-10, atol=1e-5)


def _same_outcome(got1: dict, got2: dict, ref1: dict, ref2: dict, ids) -> None:
    for sid in ids:
        assert _same_features(got1[sid], ref1[sid]), sid
        assert _same_features(got2[sid], ref2[sid]), sid


@pytest.fixture(scope="module")
def reference(resume_corpus, tiny_model, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("resume") / "reference")
    res = _run(_args(resume_corpus, tiny_model, out))
    assert res.returncode == 0, res.stderr[-3000:]
    return out, _outcome(out)


@pytest.mark.parametrize("kill_after_parts", [1, 3])
def test_killed_run_resumes_exactly(
    reference, resume_corpus, tiny_model, tmp_path, kill_after_parts
):
    ref_out, (ref_ids, ref1, ref2) = reference
    out = str(tmp_path / "out")
    args = _args(resume_corpus, tiny_model, out)
    seen = _run_and_kill(args, kill_after_parts)
    assert seen >= kill_after_parts
    assert os.path.exists(os.path.join(out, output.JOB_FILE))  # written before any part
    for marker in (output.SUMMARY_FILE, output.SUCCESS_FILE):
        assert not os.path.exists(os.path.join(out, marker))  # unfinished: no marker
    with pytest.warns(UserWarning, match="has not finished"):
        partial = read_features(out, layer=2)
    assert 0 < len(partial) < len(ref2)

    res = _run(args)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.load(open(os.path.join(out, output.SUMMARY_FILE)))
    assert os.path.exists(os.path.join(out, output.SUCCESS_FILE))
    assert summary["segments_resumed"] >= len(partial) > 0
    # Per run and across runs: the killed run has no wall time; this run wrote the rest.
    assert [r["wall_seconds"] is None for r in summary["runs"]] == [True, False]
    assert summary["cumulative"]["runs_interrupted"] == 1
    assert 0 < summary["run_audio_seconds"] < summary["audio_seconds"]
    assert summary["x_realtime"] == pytest.approx(
        summary["run_audio_seconds"] / summary["wall_seconds"], rel=1e-2
    )
    assert summary["segments_missing"] == summary["segments_duplicated"] == 0
    ids, got1, got2 = _outcome(out)
    assert len(ids) == len(set(ids))  # each segment exactly once across features + errors
    assert sorted(ids) == sorted(ref_ids)
    assert got2.keys() == ref2.keys()
    _same_outcome(got1, got2, ref1, ref2, ref2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # finished: no "has not finished" warning
        read_features(out, layer=2, segment_ids=["r0-0"])


def test_finished_rerun_does_nothing_and_overwrite_starts_over(
    reference, resume_corpus, tiny_model, tmp_path
):
    import shutil

    out = str(tmp_path / "out")
    shutil.copytree(reference[0], out)  # a finished run
    args = _args(resume_corpus, tiny_model, out)
    summary_path = os.path.join(out, output.SUMMARY_FILE)
    before = open(summary_path).read()
    parts = sorted(os.listdir(os.path.join(out, "features")))

    again = _run(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to do" in again.stderr
    assert open(summary_path).read() == before  # the summary is the finished run's
    assert sorted(os.listdir(os.path.join(out, "features"))) == parts

    # --overwrite removes everything and recomputes: a fresh summary, same outcome.
    stale = os.path.join(out, "features", "part-stale.parquet")
    os.rename(os.path.join(out, "features", parts[0]), stale)
    over = _run([*args, "--overwrite"])
    assert over.returncode == 0, over.stderr[-3000:]
    assert not os.path.exists(stale)
    summary = json.load(open(summary_path))
    assert summary["segments_resumed"] == 0
    assert summary["segments_missing"] == summary["segments_duplicated"] == 0
    assert sorted(_outcome(out)[0]) == sorted(reference[1][0])


@pytest.mark.parametrize(
    "extra, named",
    [
        (["--layers", "2"], "layers"),
        (["--storage-dtype", "float32"], "storage_dtype"),
        (["--dtype", "int8"], "dtype"),
    ],
)
def test_incompatible_rerun_refused(reference, resume_corpus, tiny_model, extra, named):
    ref_out, _ = reference
    before = sorted(os.listdir(os.path.join(ref_out, "features")))
    res = _run([*_args(resume_corpus, tiny_model, ref_out), *extra])
    assert res.returncode == 2, res.stderr[-3000:]
    err = res.stderr.strip().splitlines()[-1]
    assert err.startswith("error: --") and named in err and "--overwrite" in err, err
    assert sorted(os.listdir(os.path.join(ref_out, "features"))) == before


def test_other_model_refused(reference, resume_corpus, tiny_model, tmp_path):
    """Same layers and dtypes, other weights (a different revision): refused, naming it."""
    import shutil

    ref_out, _ = reference
    other = str(tmp_path / "tiny-hubert")
    shutil.copytree(tiny_model, other)
    with open(os.path.join(other, "config.json")) as f:
        cfg = json.load(f)
    cfg["layer_norm_eps"] = cfg.get("layer_norm_eps", 1e-5) * 2
    with open(os.path.join(other, "config.json"), "w") as f:
        json.dump(cfg, f)
    res = _run(_args(resume_corpus, other, ref_out))
    assert res.returncode == 2, res.stderr[-3000:]
    assert "--model" in res.stderr and "model_revision" in res.stderr


# -- crash recovery ------------------------------------------------------------------------
# A model actor that raises or whose process dies mid-batch is retried / restarted and the job
# still writes exactly the uninterrupted run's output. The test hooks (testing.faults) are
# environment variables; the local Ray the subprocess starts inherits them, so the actor sees
# them.


@pytest.mark.parametrize("mode", ["raise", "exit"])
def test_failed_model_batch_is_retried(reference, resume_corpus, tiny_model, tmp_path, mode):
    ref_out, (ref_ids, ref1, ref2) = reference
    out = str(tmp_path / "out")
    fail_dir = tmp_path / "fail"
    fail_dir.mkdir()
    env = {
        "HUBERT_RAY_FAIL_BATCH": "3",
        "HUBERT_RAY_FAIL_MODE": mode,
        "HUBERT_RAY_FAIL_DIR": str(fail_dir),
    }
    res = _run(_args(resume_corpus, tiny_model, out), env)
    assert res.returncode == 0, res.stderr[-4000:]
    assert (fail_dir / "failed-once").exists()  # the failure did happen
    summary = json.load(open(os.path.join(out, output.SUMMARY_FILE)))
    assert summary["segments_missing"] == summary["segments_duplicated"] == 0
    ids, got1, got2 = _outcome(out)
    assert len(ids) == len(set(ids)) and sorted(ids) == sorted(ref_ids)
    _same_outcome(got1, got2, ref1, ref2, ref2)


def test_batch_that_always_kills_its_actor_fails_the_job(resume_corpus, tiny_model, tmp_path):
    """Every model-actor process dies at its first call, whatever part of the call it runs:
    Ray restarts the actor and retries the call a bounded number of times, then the job exits
    4 with an error naming the stage (with Ray Data's defaults it restarted actors until
    killed: 18 processes in 120 s, by hand), and leaves no completion marker."""
    out = str(tmp_path / "out")
    env = {"HUBERT_RAY_FAIL_BATCH": "1", "HUBERT_RAY_FAIL_MODE": "exit-every"}
    res = _run(_args(resume_corpus, tiny_model, out), env)
    assert res.returncode == 4, res.stderr[-4000:]
    message = next(line for line in res.stderr.splitlines() if line.startswith("error: "))
    assert "a model-stage call failed its retries" in message
    assert not os.path.exists(os.path.join(out, output.SUCCESS_FILE))


def test_poisoned_and_process_killing_segments_cost_one_row_each(
    reference, resume_corpus, tiny_model, tmp_path
):
    """A segment on which the model raises every time and one that kills its worker process
    every time: the job completes (exit 0), exactly those two are ``model_error`` rows, every
    other segment is written once with the uninterrupted run's features."""
    ref_out, (ref_ids, ref1, ref2) = reference
    poisoned, killer = sorted(ref1)[5], sorted(ref1)[-7]
    out = str(tmp_path / "out")
    env = {"HUBERT_RAY_FAULT_SEGMENTS": f"raise:{poisoned};exit:{killer}"}
    res = _run(_args(resume_corpus, tiny_model, out), env)
    assert res.returncode == 0, res.stderr[-4000:]
    summary = json.load(open(os.path.join(out, output.SUMMARY_FILE)))
    assert summary["segments_missing"] == summary["segments_duplicated"] == 0
    assert summary["errors_by_reason"].get("model_error") == 2
    errs = output.read_table(os.path.join(out, output.ERRORS_DIR))
    model = errs.filter(pc.equal(errs.column("reason"), "model_error"))
    assert sorted(model.column("segment_id").to_pylist()) == sorted([poisoned, killer])
    messages = dict(
        zip(
            model.column("segment_id").to_pylist(), model.column("message").to_pylist(), strict=True
        )
    )
    assert "injected failure" in messages[poisoned]
    assert "worker process died" in messages[killer]
    ids, got1, got2 = _outcome(out)
    assert len(ids) == len(set(ids)) and sorted(ids) == sorted(ref_ids)
    assert sorted(got1) == sorted(set(ref1) - {poisoned, killer})
    _same_outcome(got1, got2, ref1, ref2, got1)
