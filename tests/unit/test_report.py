"""``<output>/report.html``: rendered for a real pipeline run and for a synthetic output; well
formed, self-contained, with its charts, numbers and error reasons; rendered by headless
Chromium when it is installed.

The rest of these tests, in other tiers (tests/conftest.py), are in
``tests/ray/test_report.py``.
"""

from __future__ import annotations

import html.parser
import json
import os

import pyarrow as pa
import pytest

from hubert_ray.dataset import output, report

VOID = {"meta", "br", "hr", "img", "input", "link", "col", "source", "wbr"}


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
