"""The output's summary: what the written parts hold (counted part by part), the runs into
one output, and the ``_summary.json`` of a run."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from hubert_ray.core.config import ExtractConfig, compute_dtype
from hubert_ray.dataset import output
from hubert_ray.dataset.identity import redacted
from hubert_ray.io import storage


def summarize_parts(uri: str, storage_options: dict | None = None) -> dict:
    """What the output holds, counted part file by part file (never the whole output at
    once): rows, errors by reason, audio seconds, frames, compute dtypes, precision, and the
    transient errors retried (ids in ``retried/``) and recovered (those now in ``features/``).
    The manifest-wide checks (missing, duplicated) are the backend's tasks."""
    from collections import Counter

    fs, feature_files = output.part_files(storage.join(uri, output.FEATURES_DIR), storage_options)
    _, error_files = output.part_files(storage.join(uri, output.ERRORS_DIR), storage_options)
    retried_dir = storage.join(uri, output.RETRIED_DIR)
    retried = output.read_table(retried_dir, ["segment_id"], storage_options)
    retried_ids = (
        pc.unique(retried.column("segment_id").combine_chunks())
        if retried is not None
        else pa.array([], pa.string())
    )
    reasons: Counter = Counter()
    dtypes: Counter = Counter()
    fallbacks: Counter = Counter()
    ok = failed = frames = recovered = model_non_finite = 0
    audio = 0.0
    cols = ["segment_id", "start_s", "end_s", "num_frames", "compute_dtype", "fallback_reason"]
    for path in feature_files:
        t = output.read_part(fs, path, cols)
        ok += t.num_rows
        audio += float(pc.sum(pc.subtract(t.column("end_s"), t.column("start_s"))).as_py() or 0)
        frames += int(pc.sum(t.column("num_frames")).as_py() or 0)
        dtypes.update(output.value_counts(t.column("compute_dtype")))
        fallbacks.update(output.value_counts(t.column("fallback_reason").drop_null()))
        if len(retried_ids):
            recovered += int(pc.sum(pc.is_in(t.column("segment_id"), retried_ids)).as_py() or 0)
    for path in error_files:
        t = output.read_part(fs, path, ["stage", "reason"])
        failed += t.num_rows
        reasons.update(output.value_counts(t.column("reason")))
        is_model_nf = pc.and_(
            pc.equal(t.column("stage"), "model"), pc.equal(t.column("reason"), "non_finite")
        )
        model_non_finite += int(pc.sum(is_model_nf).as_py() or 0)
    summary = {
        "segments_ok": ok,
        "segments_failed": failed,
        "errors_by_reason": dict(sorted(reasons.items())),
        "segments_retried": len(retried_ids),
        "segments_recovered": recovered,
        "audio_seconds": round(audio, 3),
        "frames": frames,
        "compute_dtype_counts": dict(dtypes),
    }
    summary["precision"] = _precision_from_counts(uri, fallbacks, model_non_finite, storage_options)
    return summary


def _precision_from_counts(
    uri: str, fallbacks, model_non_finite: int, storage_options: dict | None
) -> dict:
    from hubert_ray.core.precision import summarize_layers

    checks = output.read_table(storage.join(uri, output.PRECISION_DIR), None, storage_options)
    rows = checks.to_pylist() if checks is not None else []
    rows = list({(r["segment_id"], r["layer"]): r for r in rows}.values())
    worst: dict[str, str] = {}
    for r in rows:
        worst[r["segment_id"]] = r["action"]
    reports = output.actor_reports(uri, storage_options)
    suspect = output.suspect_segment_ids(uri, reports, storage_options)
    return {
        "sampled": len(worst),
        "warned": sum(1 for a in worst.values() if a != "none"),
        "breaches": sum(1 for a in worst.values() if a in ("fallback", "breach_ignored")),
        "fallbacks": sum(fallbacks.values()),
        "fallbacks_precision": fallbacks.get("precision", 0),
        "fallbacks_non_finite": fallbacks.get("non_finite", 0),
        "fallbacks_self_test": fallbacks.get("self_test", 0),
        "fallbacks_escalated": fallbacks.get("escalated", 0),
        "non_finite": fallbacks.get("non_finite", 0) + model_non_finite,
        "non_finite_errors": model_non_finite,
        "layers": summarize_layers(rows) if rows else {},
        "self_test": [_self_test_row(r) for r in reports if r.get("self_test")],
        "self_test_breaches": sum(1 for r in reports if (r.get("self_test") or {}).get("breach")),
        "escalations": [
            {k: r.get(k) for k in ("actor_id", "device", "requested_dtype", "checks", "breaches")}
            | {"segments_written_before": r.get("reduced_rows_before_escalation", 0)}
            for r in reports
            if r.get("escalated")
        ],
        # Rows an escalated actor wrote in its reduced dtype before the switch (still in the
        # output): ``--recompute-suspect`` recomputes exactly these.
        "suspect_segments": len(suspect),
        "suspect_segment_ids": suspect.slice(0, SUSPECT_IDS_SHOWN).to_pylist(),
        "audit_device_share": _audit_share(reports),
    }


def _audit_share(reports: list[dict]) -> float | None:
    """The sampled FP32 rechecks' share of the model actors' device time (their cost), from
    the actors' records (device times rewritten every ``REPORT_INTERVAL_S``); None if none."""
    times = [r["device_s"] for r in reports if r.get("device_s")]
    total = sum(t["forward"] + t["audit"] for t in times)
    return round(sum(t["audit"] for t in times) / total, 4) if total > 0 else None


SUSPECT_IDS_SHOWN = 1000  # the summary lists at most this many suspect segment ids


def _self_test_row(report: dict) -> dict:
    st = report["self_test"]
    keys = ("device", "dtype", "worst_layer", "worst_rel_l2", "limit", "breach", "action")
    return {"actor_id": report["actor_id"], **{k: st[k] for k in keys}} | {
        "seconds": st["seconds"],
        "layers": st["layers"],
    }


# -- runs into one output -----------------------------------------------------------------------
def read_runs(uri: str, storage_options: dict | None = None) -> list[dict]:
    """The entries of ``<uri>/_runs.json`` (empty if none)."""
    fs, path = storage.filesystem(uri, storage_options)
    fs.invalidate_cache(path)
    runs = storage.read_json(storage.join(uri, output.RUNS_FILE), storage_options)
    return (runs or {}).get("runs", [])


def write_runs(uri: str, runs: list[dict], storage_options: dict | None = None) -> None:
    storage.write_json(storage.join(uri, output.RUNS_FILE), {"runs": runs}, storage_options)


def runs_totals(runs: list[dict]) -> dict:
    """Audio seconds, wall seconds and x-realtime of these runs together (runs that ended;
    one that was killed has no wall time and is counted in ``runs_interrupted``)."""
    ended = [r for r in runs if r.get("wall_seconds") is not None]
    audio = round(sum(r.get("audio_seconds", 0.0) for r in ended), 3)
    wall = round(sum(r["wall_seconds"] for r in ended), 3)
    return {
        "runs": len(runs),
        "runs_interrupted": len(runs) - len(ended),
        "audio_seconds": audio,
        "wall_seconds": wall,
        "x_realtime": round(audio / wall, 2) if wall > 0 else None,
    }


def run_summary(
    parts: dict,
    cfg: ExtractConfig,
    *,
    job: dict,
    runs: list[dict],
    wall: float,
    phases: dict[str, float],
    run_audio: float,
    sample_rate: float,
    reference_weights_bytes,
    storage_retries: int,
    spilled_mib: float | None,
) -> dict:
    """The run's ``_summary.json``: ``parts`` (:func:`summarize_parts` plus the manifest
    checks) with this run's figures. ``job``: what the run resolved (``layers``, ``prep``,
    ``spec``, ``codebooks``, ``info``, ``pool``, ``gpu``, ``done_rows``, ``retried``). The last
    entry of ``runs`` (this run) gets its wall time and audio. ``reference_weights_bytes``: a
    callable giving the FP32 model's weight bytes (read only while sampling is on)."""
    summary = dict(parts)
    this_run = runs[-1]
    this_run.update(
        {
            "wall_seconds": round(wall, 3),
            "audio_seconds": round(run_audio, 3),
            "segments_retried": job["retried"],
            "x_realtime": round(run_audio / wall, 2) if wall > 0 else None,
        }
    )
    summary.update(
        {
            # This run: the audio it wrote (not what earlier runs into this output wrote).
            "wall_seconds": round(wall, 3),
            "phase_seconds": {k: round(v, 2) for k, v in phases.items()},
            "run_audio_seconds": round(run_audio, 3),
            "x_realtime": this_run["x_realtime"],
            "runs": runs,
            "cumulative": runs_totals(runs),
            "recordings_total": job["info"]["recordings"],
            "layers": list(job["layers"]),
            "store": cfg.stored,
            "unit_layers": [b["layer"] for b in job["codebooks"]],
            "model_actors": job["pool"],
            "device": "gpu" if job["gpu"] else "cpu",
            "config": redacted(cfg),
            # Rows an earlier, interrupted run of this job had written (not redone).
            "segments_resumed": job["done_rows"],
            "segments_retried_this_run": job["retried"],
            "preprocessing": job["prep"].to_dict(),
            "model_family": job["spec"].to_dict(),
        }
    )
    compute = _computed_dtype(summary, cfg.dtype, job["gpu"])
    checking = compute != "float32" and cfg.precision_sample_rate > 0
    summary["precision"].update(
        {
            "compute_dtype": compute,
            "reference_dtype": "float32",
            "sample_rate": cfg.precision_sample_rate if checking else 0.0,
            # raised for small runs: at least MIN_CHECKED_SEGMENTS (or all) are checked
            "effective_sample_rate": sample_rate if checking else 0.0,
            "warn": cfg.precision_warn,
            "limit": cfg.precision_limit,
            "on_breach": cfg.on_precision_breach,
            # The FP32 reference model exists only while sampling is on: its weights' memory
            # on each model actor's device.
            "reference_weights_bytes": reference_weights_bytes() if checking else 0,
        }
    )
    # Retries by the decode tasks, model actors and writers and by the driver.
    summary["storage_retries"] = storage_retries
    summary["object_store_spilled_mib"] = spilled_mib
    return summary


def _computed_dtype(summary: dict, requested: str, gpu: bool) -> str:
    """What the actors really computed in: an "auto" GPU placement whose actor found no CUDA
    runs float32. Rows recomputed in FP32 (fallbacks) do not count; with no other rows, the
    request."""
    counts = summary["compute_dtype_counts"]
    reduced = [d for d in counts if d != "float32"]
    if reduced:
        return max(reduced, key=counts.get)
    if counts.get("float32", 0) > summary["precision"]["fallbacks"]:
        return "float32"
    return compute_dtype(requested, gpu)
