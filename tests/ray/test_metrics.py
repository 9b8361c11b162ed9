"""Job metrics: the per-batch counting (pure), no-op without Ray, and the metrics of a real
pipeline run read back from the Ray node's Prometheus endpoint.

The rest of these tests, in other tiers (tests/conftest.py), are in
``tests/integration/test_metrics.py`` and ``tests/unit/test_metrics.py``.
"""

from __future__ import annotations

import re
import time
import urllib.request

import pytest

from hubert_ray.backend import metrics
from hubert_ray.core.config import ExtractConfig

# -- through Ray's metrics agent ----------------------------------------------------------------
_LINE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(\{(?P<labels>.*)\})? (?P<value>\S+)$")


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """``{(name, ((label, value), ...)): value}`` of the hubert_ray series, summed over the
    Ray labels (WorkerId, ...) that differ between processes."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out: dict[tuple[str, tuple], float] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m or "hubert_ray_" not in m["name"]:
            continue
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m["labels"] or ""))
        keep = tuple(sorted((k, v) for k, v in labels.items() if k in ("outcome", "reason", "le")))
        key = (m["name"], keep)
        out[key] = out.get(key, 0.0) + float(m["value"])
    return out


def delta(after, before):
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


def value(d, name, **labels):
    return d.get(("ray_" + name, tuple(sorted(labels.items()))), 0.0)


@pytest.mark.ray
def test_pipeline_metrics_reach_prometheus(ray_session, corpus, tiny_model, tmp_path):
    from hubert_ray.backend import extract

    node = ray_session._private.worker.global_worker.node
    url = f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics"
    try:
        scrape(url)
    except OSError as e:
        pytest.skip(f"no metrics endpoint in this Ray session ({e})")

    # Other runs in this session may still be exporting: wait until the counters stand still
    # (workers report every few seconds) before taking the baseline.
    before, t0 = scrape(url), time.time()
    while time.time() - t0 < 60:
        time.sleep(6)
        now = scrape(url)
        if now == before:
            break
        before = now

    cfg = ExtractConfig(
        manifest=corpus,
        model=tiny_model,
        output=str(tmp_path / "out"),
        layers="2",
        chunk_seconds=4.0,
        batch_size=8,
        num_cpu_actors=2,
        decode_batch_size=6,
        dtype="int8",  # a tiny limit: every actor's self-test breaches, every row falls back
        precision_sample_rate=0.5,
        precision_warn=1e-9,
        precision_limit=1e-9,
    )
    summary = extract.run(cfg)
    fallbacks = summary["precision"]["fallbacks_self_test"]
    assert fallbacks == summary["segments_ok"] > 0

    decode_calls = summary["recordings_total"] / cfg.decode_batch_size  # a lower bound

    def complete(d):
        return (
            value(d, metrics.SEGMENTS, outcome="ok") == summary["segments_ok"]
            and value(d, metrics.SEGMENTS, outcome="failed") == summary["segments_failed"]
            and value(d, metrics.FALLBACKS, reason="self_test") == fallbacks
            # each process reports on its own timer: wait for the decode workers too
            and value(d, metrics.DECODE_SECONDS + "_count") >= decode_calls
        )

    t0 = time.time()
    got = delta(scrape(url), before)
    while not complete(got) and time.time() - t0 < 60:
        time.sleep(2)
        got = delta(scrape(url), before)
    assert value(got, metrics.SEGMENTS, outcome="ok") == summary["segments_ok"], got
    assert value(got, metrics.SEGMENTS, outcome="failed") == summary["segments_failed"], got
    for reason, n in summary["errors_by_reason"].items():
        assert value(got, metrics.ERRORS, reason=reason) == n, (reason, got)
    assert value(got, metrics.FALLBACKS, reason="self_test") == fallbacks
    assert value(got, metrics.AUDIO_SECONDS) == pytest.approx(summary["audio_seconds"], abs=0.01)
    # Histograms: one forward observation per model batch, one decode per decode task.
    batches = value(got, metrics.BATCH_FORWARD_SECONDS + "_count")
    assert batches >= summary["segments_total"] / cfg.batch_size
    assert value(got, metrics.BATCH_FORWARD_SECONDS + "_sum") > 0
    assert value(got, metrics.DECODE_SECONDS + "_count") >= decode_calls
    assert value(got, metrics.DECODE_SECONDS + "_sum") > 0
