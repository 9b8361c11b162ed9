"""``<output>/report.html``: one self-contained page (hand-written inline SVG, no scripts, no
network) about a finished run: throughput over time, segment lengths, errors by reason,
precision by layer and the summary.

Everything comes from the output itself and the summary: throughput from each feature part
file's modification time (local mtime / S3 ``LastModified``: when the part became visible) and
the seconds of audio in it; segment lengths from the feature rows' ``end_s - start_s``. Needs no
Ray.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import html
import json
import math
import os

import numpy as np
import pyarrow.parquet as pq

from hubert_ray.dataset import output
from hubert_ray.io import storage

REPORT_FILE = "report.html"

# -- SVG charts ---------------------------------------------------------------------------------
_W, _H = 720, 300
_L, _R, _T, _B = 70, 20, 20, 60  # margins: left (y labels), right, top, bottom (x labels)
_FILL = "#4e79a7"
_ALT = ("#4e79a7", "#f28e2b", "#e15759")


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e5 or a < 1e-3:
        return f"{v:.1e}"
    if a >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    step = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(step))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= step)
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int(math.ceil((hi - start) / step)) + 1)]


def _svg(body: list[str], title: str, xlabel: str, ylabel: str) -> str:
    return "\n".join(
        [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" '
            f'viewBox="0 0 {_W} {_H}" role="img" aria-label="{html.escape(title)}">',
            f"<title>{html.escape(title)}</title>",
            '<rect width="100%" height="100%" fill="#fff"/>',
            *body,
            f'<text x="{_L + (_W - _L - _R) / 2}" y="{_H - 8}" text-anchor="middle" '
            f'class="axis-label">{html.escape(xlabel)}</text>',
            f'<text transform="translate(14,{_T + (_H - _T - _B) / 2}) rotate(-90)" '
            f'text-anchor="middle" class="axis-label">{html.escape(ylabel)}</text>',
            "</svg>",
        ]
    )


def _x_scale(ticks: list[float]):
    """Data x → SVG x over the plot area, spanning the first to the last tick."""
    plot_w = _W - _L - _R
    return lambda v: _L + plot_w * (v - ticks[0]) / (ticks[-1] - ticks[0])


def _y_scale(top: float):
    """Data y (0 at the axis) → SVG y over the plot area, ``top`` at its upper edge."""
    plot_h = _H - _T - _B
    return lambda v: _H - _B - plot_h * v / top


def _x_labels(ticks: list[float], x_of) -> list[str]:
    return [
        f'<text x="{x_of(t):.1f}" y="{_H - _B + 16}" text-anchor="middle">{_fmt(t)}</text>'
        for t in ticks
    ]


def _y_axis(ticks: list[float], y_of, labels: list[str] | None = None) -> list[str]:
    out = []
    for i, t in enumerate(ticks):
        y = y_of(t)
        out.append(f'<line x1="{_L}" x2="{_W - _R}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        text = labels[i] if labels else _fmt(t)
        out.append(f'<text x="{_L - 6}" y="{y + 4:.1f}" text-anchor="end">{text}</text>')
    out.append(f'<line x1="{_L}" x2="{_L}" y1="{_T}" y2="{_H - _B}" class="axis"/>')
    out.append(f'<line x1="{_L}" x2="{_W - _R}" y1="{_H - _B}" y2="{_H - _B}" class="axis"/>')
    return out


def bar_chart(labels: list[str], values: list[float], title: str, ylabel: str) -> str:
    """Vertical bars, one per label, each with its value on top."""
    top = max(values, default=0) or 1
    ticks = _ticks(0, top)
    y_of = _y_scale(ticks[-1])
    body = _y_axis(ticks, y_of)
    slot = (_W - _L - _R) / max(len(labels), 1)
    bw = min(slot * 0.7, 80)
    for i, (lab, v) in enumerate(zip(labels, values, strict=True)):
        x = _L + slot * i + (slot - bw) / 2
        y = y_of(v)
        body.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{bw:.1f}" height="{_H - _B - y:.1f}" '
            f'fill="{_FILL}"><title>{html.escape(lab)}: {_fmt(v)}</title></rect>'
        )
        body.append(
            f'<text x="{x + bw / 2:.1f}" y="{y - 4:.1f}" text-anchor="middle">{_fmt(v)}</text>'
        )
        body.append(
            f'<text x="{x + bw / 2:.1f}" y="{_H - _B + 16}" text-anchor="middle">'
            f"{html.escape(lab)}</text>"
        )
    return _svg(body, title, "", ylabel)


def histogram(values: np.ndarray, title: str, xlabel: str, ylabel: str, bins: int = 30) -> str:
    """Counts of ``values`` in equal-width bins."""
    values = np.asarray(values, dtype=np.float64)
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    xt = _ticks(0.0 if lo >= 0 else lo, hi)
    counts, edges = np.histogram(values, bins=bins, range=(xt[0], xt[-1]))
    yt = _ticks(0, float(counts.max()) if counts.size and counts.max() else 1.0)
    x_of, y_of = _x_scale(xt), _y_scale(yt[-1])
    body = _y_axis(yt, y_of)
    for c, a, b in zip(counts, edges[:-1], edges[1:], strict=True):
        if c:
            y = y_of(c)
            body.append(
                f'<rect x="{x_of(a) + 0.5:.1f}" y="{y:.1f}" width="{x_of(b) - x_of(a) - 1:.1f}" '
                f'height="{_H - _B - y:.1f}" fill="{_FILL}"><title>{_fmt(a)}–{_fmt(b)}: {c}'
                "</title></rect>"
            )
    body += _x_labels(xt, x_of)
    return _svg(body, title, xlabel, ylabel)


def line_chart(
    xs: list[float], series: dict[str, list[float]], title: str, xlabel: str, ylabel: str
) -> str:
    """One polyline (with dots) per series over shared x values."""
    ys = [v for s in series.values() for v in s]
    xt = _ticks(min(xs, default=0.0), max(xs, default=1.0))
    yt = _ticks(0, max(ys, default=0) or 1.0)
    x_of, y_of = _x_scale(xt), _y_scale(yt[-1])
    body = _y_axis(yt, y_of) + _x_labels(xt, x_of)
    for k, (name, s) in enumerate(series.items()):
        color = _ALT[k % len(_ALT)]
        pts = " ".join(f"{x_of(x):.1f},{y_of(y):.1f}" for x, y in zip(xs, s, strict=True))
        body.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"/>')
        for x, y in zip(xs, s, strict=True):
            body.append(
                f'<circle cx="{x_of(x):.1f}" cy="{y_of(y):.1f}" r="3" fill="{color}">'
                f"<title>{html.escape(name)} at {_fmt(x)}: {_fmt(y)}</title></circle>"
            )
        body.append(
            f'<text x="{_L + 10}" y="{_T + 14 + 16 * k}" fill="{color}">{html.escape(name)}</text>'
        )
    return _svg(body, title, xlabel, ylabel)


def grouped_log_bars(
    groups: list[str],
    series: dict[str, list[float]],
    title: str,
    xlabel: str,
    ylabel: str,
    lines: dict[str, float] | None = None,
) -> str:
    """Grouped bars on a log10 y axis (for errors spanning decades), with optional labelled
    horizontal threshold lines."""
    vals = [v for s in series.values() for v in s if v > 0] + list((lines or {}).values())
    lo = math.floor(math.log10(min(vals))) if vals else -6
    hi = math.ceil(math.log10(max(vals))) if vals else 0
    if hi <= lo:
        hi = lo + 1
    plot_w, plot_h = _W - _L - _R, _H - _T - _B

    def y_of(v):
        v = max(v, 10.0**lo)
        return _H - _B - plot_h * (math.log10(v) - lo) / (hi - lo)

    ticks = [10.0**e for e in range(lo, hi + 1)]
    body = _y_axis(ticks, y_of, [f"1e{e}" for e in range(lo, hi + 1)])
    slot = plot_w / max(len(groups), 1)
    bw = min(slot * 0.8 / max(len(series), 1), 40)
    for g, name in enumerate(groups):
        x0 = _L + slot * g + (slot - bw * len(series)) / 2
        for k, (sname, s) in enumerate(series.items()):
            y = y_of(s[g])
            body.append(
                f'<rect x="{x0 + k * bw:.1f}" y="{y:.1f}" width="{bw - 1:.1f}" '
                f'height="{_H - _B - y:.1f}" fill="{_ALT[k % len(_ALT)]}"><title>'
                f"{html.escape(name)} {html.escape(sname)}: {_fmt(s[g])}</title></rect>"
            )
        body.append(
            f'<text x="{_L + slot * g + slot / 2:.1f}" y="{_H - _B + 16}" '
            f'text-anchor="middle">{html.escape(name)}</text>'
        )
    for label, v in (lines or {}).items():
        y = y_of(v)
        body.append(
            f'<line x1="{_L}" x2="{_W - _R}" y1="{y:.1f}" y2="{y:.1f}" stroke="#b00" '
            'stroke-dasharray="6,4"/>'
        )
        body.append(
            f'<text x="{_W - _R - 4}" y="{y - 4:.1f}" text-anchor="end" fill="#b00">'
            f"{html.escape(label)} {_fmt(v)}</text>"
        )
    for k, sname in enumerate(series):
        body.append(
            f'<rect x="{_L + 10 + 90 * k}" y="{_T + 4}" width="10" height="10" '
            f'fill="{_ALT[k % len(_ALT)]}"/><text x="{_L + 24 + 90 * k}" y="{_T + 13}">'
            f"{html.escape(sname)}</text>"
        )
    return _svg(body, title, xlabel, ylabel)


# -- data from the output -----------------------------------------------------------------------
def _mtime(info: dict) -> float | None:
    for key in ("mtime", "LastModified", "last_modified", "created"):
        v = info.get(key)
        if isinstance(v, dt.datetime):
            return v.timestamp()
        if isinstance(v, (int, float)):
            return float(v)
    return None


def part_progress(
    output_uri: str, storage_options: dict | None = None
) -> list[tuple[float, float]]:
    """``(time the part appeared, seconds of audio in it)`` per feature part file, by time."""
    fs, path = storage.filesystem(storage.join(output_uri, output.FEATURES_DIR), storage_options)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return []
    infos = [
        i
        for i in fs.find(path, detail=True).values()
        if i["name"].endswith(".parquet") and not os.path.basename(i["name"]).startswith(".")
    ]

    def one(info):
        t = _mtime(info)
        cols = pq.read_table(info["name"], columns=["start_s", "end_s"], filesystem=fs)
        dur = np.asarray(cols.column("end_s")) - np.asarray(cols.column("start_s"))
        return (t, float(dur.sum()))

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, infos))
    return sorted((t, s) for t, s in got if t is not None)


def _job_start(output_uri: str, summary: dict, storage_options, first_part: float) -> float:
    """When the job started: the summary's write time minus its wall time (else first part)."""
    fs, path = storage.filesystem(output_uri, storage_options)
    try:
        t = _mtime(fs.info(f"{path.rstrip('/')}/{output.SUMMARY_FILE}"))
    except (FileNotFoundError, OSError):
        t = None
    if t is None or "wall_seconds" not in summary:
        return first_part
    return min(t - float(summary["wall_seconds"]), first_part)


def throughput_series(progress: list[tuple[float, float]], start: float, bins: int = 20):
    """Binned x-realtime (audio seconds written per wall second) and cumulative audio hours
    over minutes since ``start``."""
    if not progress:
        return [], [], []
    end = progress[-1][0]
    span = max(end - start, 1e-6)
    width = span / bins
    audio = np.zeros(bins)
    for t, s in progress:
        audio[min(int((t - start) / width), bins - 1)] += s
    xs = [(i + 1) * width / 60 for i in range(bins)]
    return xs, list(audio / width), list(np.cumsum(audio) / 3600)


# -- page ---------------------------------------------------------------------------------------
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
            text = _fmt(v) if isinstance(v, float) else str(v)
            cells.append(f"<td{' class=n' if num else ''}>{html.escape(text)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def render(output_uri: str, summary: dict, storage_options: dict | None = None) -> str:
    """The report page as a string."""
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

    # Throughput over time.
    parts.append("<h2>Throughput</h2>")
    progress = part_progress(output_uri, storage_options)
    if progress:
        start = _job_start(output_uri, summary, storage_options, progress[0][0])
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
    else:
        parts.append('<p class="note">No feature part files.</p>')

    # Segment lengths.
    parts.append("<h2>Segment lengths</h2>")
    feats = output.read_table(
        storage.join(output_uri, output.FEATURES_DIR), ["start_s", "end_s"], storage_options
    )
    if feats is not None and feats.num_rows:
        dur = np.asarray(feats.column("end_s")) - np.asarray(feats.column("start_s"))
        parts.append(
            histogram(dur, "Segment length (segments with features)", "seconds", "segments")
        )
        q = np.percentile(dur, [50, 99])
        parts.append(
            f'<p class="note">{dur.size:,} segments: mean {dur.mean():.2f} s, median '
            f"{q[0]:.2f} s, p99 {q[1]:.2f} s, max {dur.max():.2f} s</p>"
        )
    else:
        parts.append('<p class="note">No segments with features.</p>')

    # Errors by reason.
    parts.append("<h2>Errors by reason</h2>")
    by_reason = summary.get("errors_by_reason") or {}
    if by_reason:
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
    else:
        parts.append('<p class="note">No errors.</p>')

    # Precision.
    prec = summary.get("precision") or {}
    parts.append("<h2>Precision</h2>")
    layers = prec.get("layers") or {}
    if layers:
        names = sorted(layers, key=lambda k: int(k) if str(k).isdigit() else str(k))
        series = {
            stat: [float(layers[k][f"rel_l2_{stat}"]) for k in names]
            for stat in ("p50", "p99", "max")
        }
        thresholds = {
            k: float(prec[k]) for k in ("warn", "limit") if isinstance(prec.get(k), (int, float))
        }
        parts.append(
            grouped_log_bars(
                [f"layer {k}" for k in names],
                series,
                f"Relative L2 error of stored features vs {prec.get('reference_dtype', 'float32')}",
                "",
                "relative L2 error (log)",
                thresholds,
            )
        )
        parts.append(
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
            )
        )
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
    else:
        parts.append('<p class="note">No sampled FP32 rechecks in this run.</p>')
    parts.append("<h3>Self-test of each model actor</h3>")
    tests = prec.get("self_test") or []
    if tests:
        parts.append(
            _table(
                [
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
                ],
                ("actor", "device", "dtype", "worst layer", "rel_l2", "action", "seconds"),
            )
        )
    else:
        parts.append('<p class="note">No self-test: every actor computed in float32.</p>')
    if prec.get("escalations"):
        parts.append(
            f'<p class="bad">{len(prec["escalations"])} model actor(s) switched to float32 '
            "after systematic breaches of the sampled checks; "
            f"{prec.get('suspect_segments', 0):,} segment(s) written before the switch are "
            "suspect (rerun with --recompute-suspect)</p>"
        )
        parts.append(
            _table(
                [tuple(e.values()) for e in prec["escalations"]],
                tuple(prec["escalations"][0]),
            )
        )
    scalars = [(k, v) for k, v in prec.items() if k != "layers" and not isinstance(v, (dict, list))]
    if scalars:
        parts.append(_table(scalars, ("precision", "value")))

    # Summary table.
    parts.append("<h2>Summary</h2>")
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
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(output_uri: str, summary: dict, storage_options: dict | None = None) -> str:
    """Render the report for the output at ``output_uri`` and write ``<output>/report.html``
    (one write); returns its URL."""
    page = render(output_uri, summary, storage_options).encode()
    fs, path = storage.filesystem(output_uri, storage_options)
    storage.with_retries(fs.pipe_file, f"{path.rstrip('/')}/{REPORT_FILE}", page)
    return storage.join(output_uri, REPORT_FILE)
