"""Live job metrics through ``ray.util.metrics``: Ray's metrics agent on each node serves them
on its Prometheus endpoint (``ray_`` + the names below; see README "Metrics and report").

Recorded where the work happens: decode tasks (``hubert_ray.backend.dataset._decode``) time
each decode call; model actors (``hubert_ray.backend.actor.ModelActor``) count each output
batch (outcomes, audio seconds, errors by reason, FP32 fallbacks) and time its forward passes.

Importable and callable without Ray: when Ray is not imported or not initialised (unit tests of
the stages, the Ray-free reader) every ``record_*`` call is a no-op. The Ray metric objects are
created lazily, once per process, in the process that records (each worker has its own).
"""

from __future__ import annotations

import collections
import logging
import sys

import pyarrow as pa
import pyarrow.compute as pc

log = logging.getLogger("hubert_ray")

PREFIX = "hubert_ray_"
SEGMENTS = PREFIX + "segments_total"  # tag outcome: ok | failed
AUDIO_SECONDS = PREFIX + "audio_seconds_total"  # seconds of audio in ok segments
ERRORS = PREFIX + "errors_total"  # tag reason (missing_file, too_short, non_finite, ...)
# tag reason: self_test | escalated | precision | non_finite
FALLBACKS = PREFIX + "fp32_fallbacks_total"
BATCH_FORWARD_SECONDS = PREFIX + "batch_forward_seconds"  # histogram, per model-stage batch
DECODE_SECONDS = PREFIX + "decode_seconds"  # histogram, per decode task call
BATCH_ROWS = PREFIX + "batch_rows"  # gauge: rows in the model actor's latest batch

# Histogram buckets (seconds): a tiny CPU batch takes ~10 ms, a GPU batch of 64 x 10 s ~0.1 s,
# a CPU batch or a decode task of long Opus recordings tens of seconds.
_BOUNDARIES = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]

_SPECS = {
    SEGMENTS: ("counter", "Segments finished, by outcome (ok: features row; failed: error row)",
               ("outcome",)),
    AUDIO_SECONDS: ("counter", "Seconds of audio in segments with features", ()),
    ERRORS: ("counter", "Error rows, by reason", ("reason",)),
    FALLBACKS: ("counter", "Rows computed in FP32 instead of the compute dtype, by reason",
                ("reason",)),
    BATCH_FORWARD_SECONDS: ("histogram", "Model-stage forward seconds per batch", ()),
    DECODE_SECONDS: ("histogram", "Seconds per decode task call (read + decode + cut)", ()),
    BATCH_ROWS: ("gauge", "Rows in the model actor's latest batch", ()),
}  # fmt: skip

_metrics: dict[str, object] | None = None
_sink = None  # test hook: a callable(kind, name, value, tags) used instead of Ray's metrics


def set_sink(sink) -> None:
    """Record through ``sink(kind, name, value, tags)`` instead of Ray (``None``: back to Ray)."""
    global _sink
    _sink = sink


def _ray_active() -> bool:
    ray = sys.modules.get("ray")  # never import Ray here: no Ray imported = no Ray running
    return ray is not None and ray.is_initialized()


def _ray_metrics() -> dict[str, object]:
    global _metrics
    if _metrics is None:
        from ray.util import metrics as rm

        made = {}
        for name, (kind, desc, tags) in _SPECS.items():
            if kind == "counter":
                made[name] = rm.Counter(name, description=desc, tag_keys=tags)
            elif kind == "gauge":
                made[name] = rm.Gauge(name, description=desc, tag_keys=tags)
            else:
                made[name] = rm.Histogram(
                    name, description=desc, boundaries=_BOUNDARIES, tag_keys=tags
                )
        _metrics = made
    return _metrics


def _emit(name: str, value: float, tags: dict[str, str] | None = None) -> None:
    kind = _SPECS[name][0]
    if _sink is not None:
        _sink(kind, name, value, tags or {})
        return
    if not _ray_active():
        return
    try:
        m = _ray_metrics()[name]
        if kind == "counter":
            if value > 0:
                m.inc(value, tags=tags)
        elif kind == "gauge":
            m.set(value, tags=tags)
        else:
            m.observe(value, tags=tags)
    except Exception:  # metrics never fail the job
        log.debug("recording metric %s failed", name, exc_info=True)


def batch_counts(table: pa.Table) -> dict:
    """What one model-stage output batch adds: rows by outcome, audio seconds of ok rows,
    errors by reason, FP32 fallbacks by reason."""
    reason = table.column("error_reason")
    ok_mask = reason.is_null()
    ok = int(pc.sum(ok_mask).as_py() or 0)
    seconds = 0.0
    if ok:
        dur = pc.subtract(table.column("end_s"), table.column("start_s")).filter(ok_mask)
        seconds = float(pc.sum(dur).as_py() or 0.0)
    fallbacks = {}
    if "fallback_reason" in table.column_names:
        fallbacks = collections.Counter(
            r for r in table.column("fallback_reason").to_pylist() if r is not None
        )
    return {
        "ok": ok,
        "failed": table.num_rows - ok,
        "audio_seconds": seconds,
        "errors": dict(collections.Counter(r for r in reason.to_pylist() if r is not None)),
        "fallbacks": dict(fallbacks),
    }


def record_model_batch(table: pa.Table, forward_s: float) -> None:
    """Model actor: count one output batch and observe its forward seconds."""
    if _sink is None and not _ray_active():
        return
    c = batch_counts(table)
    _emit(SEGMENTS, c["ok"], {"outcome": "ok"})
    _emit(SEGMENTS, c["failed"], {"outcome": "failed"})
    _emit(AUDIO_SECONDS, c["audio_seconds"])
    for reason, n in c["errors"].items():
        _emit(ERRORS, n, {"reason": reason})
    for reason, n in c["fallbacks"].items():
        _emit(FALLBACKS, n, {"reason": reason})
    _emit(BATCH_FORWARD_SECONDS, forward_s)
    _emit(BATCH_ROWS, table.num_rows)


def record_decode(seconds: float) -> None:
    """Decode task: observe one decode call's seconds."""
    _emit(DECODE_SECONDS, seconds)
