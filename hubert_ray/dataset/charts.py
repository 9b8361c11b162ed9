"""Hand-written inline SVG charts for the run report (no scripts, no network): bars, a
histogram, lines and grouped bars on a log axis, each a ``<svg>`` string."""

from __future__ import annotations

import html
import math

import numpy as np

_W, _H = 720, 300
_L, _R, _T, _B = 70, 20, 20, 60  # margins: left (y labels), right, top, bottom (x labels)
_FILL = "#4e79a7"
_ALT = ("#4e79a7", "#f28e2b", "#e15759")


def fmt(v: float) -> str:
    """A number as the charts and the report's tables print it."""
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
        f'<text x="{x_of(t):.1f}" y="{_H - _B + 16}" text-anchor="middle">{fmt(t)}</text>'
        for t in ticks
    ]


def _y_axis(ticks: list[float], y_of, labels: list[str] | None = None) -> list[str]:
    out = []
    for i, t in enumerate(ticks):
        y = y_of(t)
        out.append(f'<line x1="{_L}" x2="{_W - _R}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        text = labels[i] if labels else fmt(t)
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
            f'fill="{_FILL}"><title>{html.escape(lab)}: {fmt(v)}</title></rect>'
        )
        body.append(
            f'<text x="{x + bw / 2:.1f}" y="{y - 4:.1f}" text-anchor="middle">{fmt(v)}</text>'
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
                f'height="{_H - _B - y:.1f}" fill="{_FILL}"><title>{fmt(a)}–{fmt(b)}: {c}'
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
                f"<title>{html.escape(name)} at {fmt(x)}: {fmt(y)}</title></circle>"
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
                f"{html.escape(name)} {html.escape(sname)}: {fmt(s[g])}</title></rect>"
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
            f"{html.escape(label)} {fmt(v)}</text>"
        )
    for k, sname in enumerate(series):
        body.append(
            f'<rect x="{_L + 10 + 90 * k}" y="{_T + 4}" width="10" height="10" '
            f'fill="{_ALT[k % len(_ALT)]}"/><text x="{_L + 24 + 90 * k}" y="{_T + 13}">'
            f"{html.escape(sname)}</text>"
        )
    return _svg(body, title, xlabel, ylabel)
