"""``<output>/report.html``: one self-contained page (hand-written inline SVG, no scripts, no
network) about a finished run: throughput over time, segment lengths, errors by reason,
precision by layer and the summary.

Everything comes from the output itself and the summary: throughput from each feature part
file's modification time and the seconds of audio in it (:mod:`hubert_ray.dataset.throughput`);
segment lengths from the feature rows' ``end_s - start_s``. Each section of the page is one
function below; the charts are :mod:`hubert_ray.dataset.charts`. Needs no Ray.
"""

from __future__ import annotations

import html
import json

import numpy as np

from hubert_ray.dataset import output
from hubert_ray.dataset.charts import bar_chart, fmt, grouped_log_bars, histogram, line_chart
from hubert_ray.dataset.throughput import job_start, part_progress, throughput_series
from hubert_ray.io import storage

REPORT_FILE = "report.html"

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:24px;
color:#222;max-width:1100px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}td.n{text-align:right}
svg text{font-size:11px;fill:#333}svg .axis-label{font-size:12px;fill:#222}
svg .grid{stroke:#eee}svg .axis{stroke:#888}.note{color:#666;font-size:13px}
.bad{color:#b00;font-weight:bold}
"""


def _table(rows: list[tuple], header: tuple | None = None) -> str:
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>")
    for row in rows:
        cells = []
        for v in row:
            num = isinstance(v, (int, float)) and not isinstance(v, bool)
            text = fmt(v) if isinstance(v, float) else str(v)
            cells.append(f"<td{' class=n' if num else ''}>{html.escape(text)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _header(output_uri: str, summary: dict) -> list[str]:
    """The page's head, title and one-line summary (and any missing or duplicated segments)."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>hubert-ray report: {html.escape(output_uri)}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>hubert-ray report</h1>",
        f'<p class="note">{html.escape(output_uri)} — '
        f"{summary.get('segments_ok', 0):,} of {summary.get('segments_total', 0):,} segments "
        f"with features, {summary.get('audio_seconds', 0.0) / 3600:,.2f} h of audio in "
        f"{summary.get('wall_seconds', 0.0):,.1f} s ({summary.get('x_realtime')} x realtime)</p>",
    ]
    bad = summary.get("segments_missing", 0) + summary.get("segments_duplicated", 0)
    if bad:
        parts.append(
            f'<p class="bad">{summary.get("segments_missing", 0)} segment(s) missing, '
            f"{summary.get('segments_duplicated', 0)} duplicated</p>"
        )
    return parts


def _throughput_section(output_uri: str, summary: dict, storage_options) -> list[str]:
    """x realtime and cumulative audio hours over time, from the feature part files."""
    parts = ["<h2>Throughput</h2>"]
    progress = part_progress(output_uri, storage_options)
    if not progress:
        return [*parts, '<p class="note">No feature part files.</p>']
    start = job_start(output_uri, summary, storage_options, progress[0][0])
    xs, rate, cum = throughput_series(progress, start)
    parts.append(
        line_chart(
            xs,
            {"x realtime (audio s written / wall s)": rate},
            "Throughput over time",
            "minutes since job start (end of bin)",
            "x realtime",
        )
    )
    parts.append(
        line_chart(
            xs,
            {"cumulative audio hours written": cum},
            "Audio written",
            "minutes since job start",
            "hours of audio",
        )
    )
    parts.append(
        f'<p class="note">From {len(progress)} feature part file(s): each part counted '
        "when its file appeared (its modification time).</p>"
    )
    return parts


def _lengths_section(output_uri: str, storage_options) -> list[str]:
    """A histogram of the lengths of the segments with features, and their statistics."""
    parts = ["<h2>Segment lengths</h2>"]
    feats = output.read_table(
        storage.join(output_uri, output.FEATURES_DIR), ["start_s", "end_s"], storage_options
    )
    if feats is None or not feats.num_rows:
        return [*parts, '<p class="note">No segments with features.</p>']
    dur = np.asarray(feats.column("end_s")) - np.asarray(feats.column("start_s"))
    parts.append(histogram(dur, "Segment length (segments with features)", "seconds", "segments"))
    q = np.percentile(dur, [50, 99])
    parts.append(
        f'<p class="note">{dur.size:,} segments: mean {dur.mean():.2f} s, median '
        f"{q[0]:.2f} s, p99 {q[1]:.2f} s, max {dur.max():.2f} s</p>"
    )
    return parts


def _errors_section(summary: dict) -> list[str]:
    """Error rows by reason: a bar chart and a table, most frequent first."""
    parts = ["<h2>Errors by reason</h2>"]
    by_reason = summary.get("errors_by_reason") or {}
    if not by_reason:
        return [*parts, '<p class="note">No errors.</p>']
    items = sorted(by_reason.items(), key=lambda kv: -kv[1])
    parts.append(
        bar_chart(
            [k for k, _ in items],
            [float(v) for _, v in items],
            "Error rows by reason",
            "segments",
        )
    )
    parts.append(_table(items, ("reason", "segments")))
    return parts


def _precision_layers(prec: dict) -> list[str]:
    """The sampled FP32 rechecks by layer: relative L2 errors (chart, table) and unit flips."""
    layers = prec.get("layers") or {}
    if not layers:
        return ['<p class="note">No sampled FP32 rechecks in this run.</p>']
    names = sorted(layers, key=lambda k: int(k) if str(k).isdigit() else str(k))
    series = {
        stat: [float(layers[k][f"rel_l2_{stat}"]) for k in names] for stat in ("p50", "p99", "max")
    }
    thresholds = {
        k: float(prec[k]) for k in ("warn", "limit") if isinstance(prec.get(k), (int, float))
    }
    parts = [
        grouped_log_bars(
            [f"layer {k}" for k in names],
            series,
            f"Relative L2 error of stored features vs {prec.get('reference_dtype', 'float32')}",
            "",
            "relative L2 error (log)",
            thresholds,
        ),
        _table(
            [
                (
                    k,
                    layers[k].get("segments", ""),
                    layers[k].get("rel_l2_mean", float("nan")),
                    layers[k]["rel_l2_p50"],
                    layers[k]["rel_l2_p99"],
                    layers[k]["rel_l2_max"],
                    layers[k].get("cos_min", float("nan")),
                )
                for k in names
            ],
            ("layer", "segments", "rel_l2 mean", "p50", "p99", "max", "cos min"),
        ),
    ]
    flips = [k for k in names if "unit_flip_rate" in layers[k]]
    if flips:
        parts.append(
            _table(
                [
                    (
                        k,
                        layers[k]["unit_frames"],
                        layers[k]["unit_flips"],
                        layers[k]["unit_flip_rate"],
                        layers[k]["unit_flip_rate_max"],
                    )
                    for k in flips
                ],
                ("layer", "frames", "units changed", "unit flip rate", "worst segment"),
            )
        )
    return parts


def _self_tests(prec: dict) -> list[str]:
    """The self-test of each model actor that computes in reduced precision."""
    parts = ["<h3>Self-test of each model actor</h3>"]
    tests = prec.get("self_test") or []
    if not tests:
        return [*parts, '<p class="note">No self-test: every actor computed in float32.</p>']
    rows = [
        (
            t["actor_id"],
            t["device"],
            t["dtype"],
            t["worst_layer"],
            t["worst_rel_l2"],
            t["action"],
            t["seconds"],
        )
        for t in tests
    ]
    header = ("actor", "device", "dtype", "worst layer", "rel_l2", "action", "seconds")
    return [*parts, _table(rows, header)]


def _escalations(prec: dict) -> list[str]:
    """Model actors switched to float32 after systematic breaches, and the suspect segments."""
    if not prec.get("escalations"):
        return []
    return [
        f'<p class="bad">{len(prec["escalations"])} model actor(s) switched to float32 '
        "after systematic breaches of the sampled checks; "
        f"{prec.get('suspect_segments', 0):,} segment(s) written before the switch are "
        "suspect (rerun with --recompute-suspect)</p>",
        _table(
            [tuple(e.values()) for e in prec["escalations"]],
            tuple(prec["escalations"][0]),
        ),
    ]


def _precision_section(summary: dict) -> list[str]:
    """Precision: rechecks by layer, self-tests, escalations and the scalar counters."""
    prec = summary.get("precision") or {}
    parts = ["<h2>Precision</h2>", *_precision_layers(prec), *_self_tests(prec)]
    parts += _escalations(prec)
    scalars = [(k, v) for k, v in prec.items() if k != "layers" and not isinstance(v, (dict, list))]
    if scalars:
        parts.append(_table(scalars, ("precision", "value")))
    return parts


def _summary_section(summary: dict) -> list[str]:
    """Every field of the summary (but the precision, above), and the run config folded."""
    parts = ["<h2>Summary</h2>"]
    rows = []
    for k, v in summary.items():
        if k in ("config", "precision"):
            continue
        rows.append((k, json.dumps(v) if isinstance(v, (dict, list)) else v))
    parts.append(_table(rows, ("field", "value")))
    if summary.get("config"):
        parts.append("<details><summary>Run config</summary>")
        parts.append(_table([(k, json.dumps(v)) for k, v in summary["config"].items()]))
        parts.append("</details>")
    return parts


def render(output_uri: str, summary: dict, storage_options: dict | None = None) -> str:
    """The report page as a string."""
    parts = [
        *_header(output_uri, summary),
        *_throughput_section(output_uri, summary, storage_options),
        *_lengths_section(output_uri, storage_options),
        *_errors_section(summary),
        *_precision_section(summary),
        *_summary_section(summary),
        "</body></html>",
    ]
    return "\n".join(parts)


def write_report(output_uri: str, summary: dict, storage_options: dict | None = None) -> str:
    """Render the report for the output at ``output_uri`` and write ``<output>/report.html``
    (one write); returns its URL."""
    page = render(output_uri, summary, storage_options).encode()
    fs, path = storage.filesystem(output_uri, storage_options)
    storage.with_retries(fs.pipe_file, f"{path.rstrip('/')}/{REPORT_FILE}", page)
    return storage.join(output_uri, REPORT_FILE)
