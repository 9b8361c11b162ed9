"""Job metrics: the per-batch counting (pure), no-op without Ray, and the metrics of a real
pipeline run read back from the Ray node's Prometheus endpoint.

The rest of these tests, in other tiers (tests/conftest.py), are in
``tests/integration/test_metrics.py`` and ``tests/ray/test_metrics.py``.
"""

from __future__ import annotations

import pyarrow as pa
import pytest

from hubert_ray.backend import metrics


def model_output(reasons, fallbacks, durations):
    return pa.table(
        {
            "segment_id": [f"s{i}" for i in range(len(reasons))],
            "start_s": [1.0] * len(reasons),
            "end_s": [1.0 + d for d in durations],
            "fallback_reason": pa.array(fallbacks, pa.string()),
            "error_reason": pa.array(reasons, pa.string()),
        }
    )


def test_batch_counts():
    t = model_output(
        [None, "too_short", None, "missing_file", "too_short"],
        ["precision", None, "non_finite", None, None],
        [2.5, 0.01, 1.5, 3.0, 0.02],
    )
    c = metrics.batch_counts(t)
    assert c["ok"] == 2 and c["failed"] == 3
    assert c["audio_seconds"] == pytest.approx(4.0)  # ok rows only
    assert c["errors"] == {"too_short": 2, "missing_file": 1}
    assert c["fallbacks"] == {"precision": 1, "non_finite": 1}


def test_sink_receives_every_metric():
    got = []
    metrics.set_sink(lambda kind, name, value, tags: got.append((kind, name, value, tags)))
    try:
        metrics.record_model_batch(model_output([None, "too_short"], [None, None], [2.0, 0.0]), 0.3)
        metrics.record_decode(0.7)
    finally:
        metrics.set_sink(None)
    assert ("counter", metrics.SEGMENTS, 1, {"outcome": "ok"}) in got
    assert ("counter", metrics.SEGMENTS, 1, {"outcome": "failed"}) in got
    assert ("counter", metrics.ERRORS, 1, {"reason": "too_short"}) in got
    assert ("counter", metrics.AUDIO_SECONDS, 2.0, {}) in got
    assert ("histogram", metrics.BATCH_FORWARD_SECONDS, 0.3, {}) in got
    assert ("histogram", metrics.DECODE_SECONDS, 0.7, {}) in got
    assert all(name.startswith("hubert_ray_") for _, name, _, _ in got)
