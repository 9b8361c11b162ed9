"""``<output>/report.html``: rendered for a real pipeline run and for a synthetic output; well
formed, self-contained, with its charts, numbers and error reasons; rendered by headless
Chromium when it is installed.

The rest of these tests, in other tiers (tests/conftest.py), are in
``tests/unit/test_report.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from hubert_ray.core.config import ExtractConfig
from tests.unit.test_report import check_page


@pytest.fixture(scope="module")
def run(ray_session, corpus, tiny_model, tmp_path_factory):
    from hubert_ray.backend import extract

    cfg = ExtractConfig(
        manifest=corpus,
        model=tiny_model,
        output=str(tmp_path_factory.mktemp("report") / "out"),
        layers="1,2",
        chunk_seconds=4.0,
        batch_size=8,
        rows_per_file=4,
        num_cpu_actors=2,
        decode_batch_size=6,
        dtype="int8",  # CPU dynamic quantisation: sampled FP32 rechecks give precision stats
        precision_sample_rate=0.5,
    )
    return cfg, extract.run(cfg)


@pytest.mark.ray
def test_pipeline_writes_report(run):
    cfg, summary = run
    path = os.path.join(cfg.output, "report.html")
    with open(path, encoding="utf-8") as f:
        page = f.read()
    c = check_page(page)
    # throughput x2, segment lengths, errors, precision
    assert c.counts.get("svg", 0) == 5
    assert c.counts.get("rect", 0) > 20 and c.counts.get("polyline", 0) == 2
    text = " ".join(c.text)
    for reason, n in summary["errors_by_reason"].items():
        assert reason in text
        assert f"<td>{reason}</td><td class=n>{n}</td>" in page
    for key in ("segments_total", "segments_ok", "segments_failed", "audio_seconds"):
        assert f"<td>{key}</td>" in page
    assert f"<td class=n>{summary['segments_total']}</td>" in page
    assert f"{summary['segments_ok']:,} of {summary['segments_total']:,} segments" in text
    layers = summary["precision"]["layers"]
    assert set(layers) == {"1", "2"}
    assert "layer 1" in text and "layer 2" in text and "rel_l2 mean" in text
    n_parts = len([p for p in os.listdir(os.path.join(cfg.output, "features")) if p[0] != "."])
    assert f"From {n_parts} feature part file(s)" in text


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.ray
@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed")
def test_report_renders_in_chromium(run, tmp_path):
    """Headless Chromium loads the page and draws it (DOM dump has the SVGs; screenshot made)."""
    cfg, _ = run
    page = "file://" + os.path.join(cfg.output, "report.html")
    shot = tmp_path / "report.png"
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
    res = subprocess.run([*base, "--dump-dom", page], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("<svg") == 5 and "Errors by reason" in res.stdout
    res = subprocess.run(
        [*base, f"--screenshot={shot}", "--window-size=1200,2600", page],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
