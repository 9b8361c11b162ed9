"""One poisoned and one process-killing segment in an N-segment run: the job completes, exactly
those two rows are ``model_error``, every other segment is written once; and what isolating
them costs in wall time.

    python -m benchmarks.fault_isolation --segments 2000 --json PATH [--per-recording 50]

Generates, in a temporary directory, a tiny random HuBERT (``hubert_ray.testing``) and a corpus
of 16 kHz WAV recordings cut into back-to-back segments of ``--segment-seconds`` (a
validated canonical manifest, as ``hubert-ray prepare`` writes). Runs ``python -m jobs.extract`` on
CPU with the job's defaults twice, each in a fresh process with its own local Ray: once
clean, once with the fault hook (``HUBERT_RAY_FAULT_SEGMENTS``, ``testing.faults``) on one
segment that raises in the model stage and one that kills its worker process, both chosen
inside the run (a third and two thirds of the way). Checks and prints the faulted run's exit
code, its ``model_error`` ids, that every other segment is in ``features/`` exactly once (and
nothing in ``errors/`` else), the summary's missing / duplicated counts, the model-actor
processes each run started (one report each under ``<output>/actors/``: a process killed by
the segment is restarted) and the wall time of both runs with their ratio. ``--json`` writes
the result. Exit status 0 when every check holds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_inputs(work: str, n_segments: int, per: int, seconds: float) -> tuple[str, list[str]]:
    """WAV recordings of ``per`` back-to-back segments (the last one shorter if need be), and
    their validated canonical manifest; returns its path and the segment ids in order."""
    import pyarrow as pa

    from hubert_ray.corpus import canonical, manifest
    from hubert_ray.testing.synth import synth_signal, write_audio

    ids, rows = [], []
    for r in range(-(-n_segments // per)):
        n = min(per, n_segments - r * per)
        path = os.path.join(work, "audio", f"rec{r:04d}.wav")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_audio(path, synth_signal(n * seconds + 0.1, 16000, seed=r), 16000, "wav16")
        for i in range(n):
            sid = f"rec{r:04d}-{i:03d}"
            ids.append(sid)
            rows.append((sid, f"rec{r:04d}", path, i * seconds, (i + 1) * seconds))
    names = manifest.SEGMENT_SCHEMA.names
    cols = {name: list(col) for name, col in zip(names, zip(*rows, strict=True), strict=True)}
    table = pa.table(cols, schema=manifest.SEGMENT_SCHEMA)
    uri = os.path.join(work, "manifest.parquet")
    canonical.write_validated(table, uri)
    return uri, ids


def run_job(manifest_path: str, model: str, out: str, env_extra: dict) -> tuple[int, float, str]:
    """``python -m jobs.extract`` on CPU in a fresh process: exit code, wall seconds, stderr."""
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1", **env_extra}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("RAY_ADDRESS", None)
    args = [sys.executable, "-m", "jobs.extract", "--manifest", manifest_path, "--model", model]
    args += ["--output", out, "--num-gpus", "0", "--quiet"]
    t = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    return proc.returncode, time.perf_counter() - t, proc.stderr


def outcome(out: str) -> dict:
    """Ids in ``features/`` and ``errors/`` (with reasons) and the summary's checks."""
    from hubert_ray.dataset import output

    feats = output.read_table(os.path.join(out, output.FEATURES_DIR), ["segment_id"])
    errs = output.read_table(os.path.join(out, output.ERRORS_DIR), ["segment_id", "reason"])
    summary_path = os.path.join(out, output.SUMMARY_FILE)
    summary = json.load(open(summary_path)) if os.path.exists(summary_path) else {}
    rows = errs.to_pylist() if errs is not None else []
    return {
        "features": feats.column("segment_id").to_pylist() if feats is not None else [],
        "errors": {r["segment_id"]: r["reason"] for r in rows},
        "error_rows": errs.num_rows if errs is not None else 0,
        "missing": summary.get("segments_missing"),
        # each model-actor process writes its own report: restarts after a death show here
        "actor_processes": len(output.actor_reports(out)),
        "duplicated": summary.get("segments_duplicated"),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--segments", type=int, default=2000)
    p.add_argument("--per-recording", type=int, default=50)
    p.add_argument("--segment-seconds", type=float, default=0.5)
    p.add_argument("--json", help="write the result (JSON) to this file")
    p.add_argument("--workdir", help="where to generate the inputs (default: a temp dir)")
    args = p.parse_args()
    from hubert_ray.testing.synth import make_tiny_model

    with tempfile.TemporaryDirectory(prefix="fault-isolation-", dir=args.workdir) as work:
        path, ids = make_inputs(work, args.segments, args.per_recording, args.segment_seconds)
        model = make_tiny_model(os.path.join(work, "tiny-hubert"))
        poisoned, killer = ids[len(ids) // 3], ids[2 * len(ids) // 3]
        clean_rc, clean_s, clean_err = run_job(path, model, os.path.join(work, "clean"), {})
        fault_env = {"HUBERT_RAY_FAULT_SEGMENTS": f"raise:{poisoned};exit:{killer}"}
        out = os.path.join(work, "faults")
        rc, wall, err = run_job(path, model, out, fault_env)
        got = outcome(out)
        clean = outcome(os.path.join(work, "clean"))
    counts = Counter(got["features"])
    model_errors = sorted(s for s, why in got["errors"].items() if why == "model_error")
    others = [s for s in ids if s not in (poisoned, killer)]
    checks = {
        "exit_code_0": rc == 0,
        "model_error_ids_exact": model_errors == sorted([poisoned, killer]),
        "no_other_error_rows": got["error_rows"] == 2,
        "others_written_once": all(counts[s] == 1 for s in others) and len(counts) == len(others),
        "summary_missing_duplicated_0": got["missing"] == 0 and got["duplicated"] == 0,
        "clean_run_complete": clean_rc == 0 and sorted(clean["features"]) == sorted(ids),
    }
    result = {
        "segments": len(ids),
        "recordings": -(-len(ids) // args.per_recording),
        "segment_seconds": args.segment_seconds,
        "poisoned": poisoned,
        "process_killing": killer,
        "exit_code": rc,
        "model_error_ids": model_errors,
        "error_rows": got["error_rows"],
        "other_segments_written_once": sum(counts[s] == 1 for s in others),
        "other_segments": len(others),
        "summary_missing": got["missing"],
        "summary_duplicated": got["duplicated"],
        "model_actor_processes_faults": got["actor_processes"],
        "model_actor_processes_clean": clean["actor_processes"],
        "wall_seconds_faults": round(wall, 1),
        "wall_seconds_clean": round(clean_s, 1),
        "wall_ratio_faults_over_clean": round(wall / clean_s, 2),
        "checks": checks,
        "ok": all(checks.values()),
    }
    print(json.dumps(result, indent=2))
    if not result["ok"]:
        print((err if rc else clean_err)[-4000:], file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
