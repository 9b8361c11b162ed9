"""``<output>/report.html``: rendered for a real pipeline run and for a synthetic output; well
formed, self-contained, with its charts, numbers and error reasons; rendered by headless
Chromium when it is installed."""

from __future__ import annotations

import html.parser
import json
import os
import shutil
import subprocess

import pyarrow as pa
import pytest

from hubert_ray.core.config import ExtractConfig
from hubert_ray.dataset import output, report

VOID = {"meta", "br", "hr", "img", "input", "link", "col", "source", "wbr"}
SVG_LEAVES = {"rect", "line", "circle", "polyline", "path"}  # may be written self-closing


class Checker(html.parser.HTMLParser):
    """Counts tags and checks every opened element is closed in order."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.counts: dict[str, int] = {}
        self.problems: list[str] = []
        self.text: list[str] = []
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.counts[tag] = self.counts.get(tag, 0) + 1
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.counts[tag] = self.counts.get(tag, 0) + 1

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def check_page(page: str) -> Checker:
    assert page.startswith("<!DOCTYPE html>")
    c = Checker()
    c.feed(page)
    c.close()
    assert not c.problems, c.problems[:5]
    assert not c.stack, c.stack
    assert not c.urls  # self-contained: nothing to fetch
    assert "<script" not in page and "http://" not in page.replace("http://www.w3.org", "")
    return c


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


def test_report_synthetic_output(tmp_path):
    """No Ray: an output dir built with output.write_part; lengths and throughput add up."""
    out = str(tmp_path / "out")
    feats = os.path.join(out, output.FEATURES_DIR)
    for i in range(3):
        output.write_part(
            pa.table({"segment_id": [f"a{i}", f"b{i}"], "start_s": [0.0, 1.0],
                      "end_s": [2.0, 4.0 + i]}),
            feats,
            None,
        )  # fmt: skip
    summary = {
        "segments_total": 7,
        "segments_ok": 6,
        "segments_failed": 1,
        "errors_by_reason": {"missing_file": 1},
        "audio_seconds": 18.0,
        "wall_seconds": 2.0,
        "x_realtime": 9.0,
        "precision": {"sampled": 0, "layers": {}},
        "config": {"layers": "last", "storage_options": []},
    }
    with open(os.path.join(out, output.SUMMARY_FILE), "w") as f:
        json.dump(summary, f)
    url = report.write_report(out, summary)
    assert url == os.path.join(out, "report.html")
    with open(url, encoding="utf-8") as f:
        page = f.read()
    c = check_page(page)
    assert c.counts["svg"] == 4  # no precision chart without sampled layers
    assert "No sampled FP32 rechecks" in page and "missing_file" in page
    progress = report.part_progress(out)
    assert len(progress) == 3 and sum(s for _, s in progress) == pytest.approx(18.0)
    xs, rate, cum = report.throughput_series(progress, progress[0][0] - 1.0)
    assert cum[-1] == pytest.approx(18.0 / 3600)
    assert sum(rate) * (xs[1] - xs[0]) * 60 == pytest.approx(18.0)
    assert "6 segments: mean 3.00 s" in page


def test_report_empty_output(tmp_path):
    summary = {"segments_total": 1, "segments_ok": 0, "segments_failed": 1,
               "errors_by_reason": {"too_short": 1}, "precision": {}}  # fmt: skip
    page = report.render(str(tmp_path / "nothing"), summary)
    c = check_page(page)
    assert c.counts["svg"] == 1 and "No feature part files" in page


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
