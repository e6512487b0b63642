"""Small SVG charts with no dependencies: bar charts and a yield funnel.

Each chart is one self-contained ``<svg>`` element (no scripts, no fonts, nothing
fetched), so it can be inlined in an HTML report or, through :func:`markdown_chart`,
shown as a data URI in markdown metadata. Text sizes are estimated from a fixed
character width, because there is no font to measure with.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping

SVG_NS = "http://www.w3.org/2000/svg"
FONT = "Helvetica, Arial, sans-serif"
INK = "#1f2328"
MUTED = "#59636e"
BAR = "#4c78a8"
CHAR_W = 7.0  # rough advance of one 12px character
PAD = 8
TITLE_H = 32
ROW_H = 22
BAR_H = 16
MAX_LABEL = 40  # characters; the full label stays in the bar's tooltip
PLOT_H = 160  # height of the plot area of a vertical chart
MIN_SLOT = 18  # narrowest column of a vertical chart


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _value(v: object) -> float:
    """A bar's length: negative, missing and non-finite values draw as zero."""
    if isinstance(v, int | float) and math.isfinite(v) and v > 0:
        return float(v)
    return 0.0


def fmt_number(v: object) -> str:
    """``1,234`` for whole numbers, ``3.14`` or ``0.0012`` otherwise, ``—`` if unknown."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return "—" if v is None else str(v)
    if isinstance(v, int) or (math.isfinite(v) and v.is_integer()):
        return f"{int(v):,}"
    return f"{v:,.2f}" if abs(v) >= 1 else f"{v:.2g}"


def fmt_share(part: float, whole: float) -> str:
    """``part`` as a percentage of ``whole``; ``—`` when ``whole`` is zero."""
    return f"{100 * part / whole:.1f}%" if whole else "—"


def _clip(label: str, chars: int) -> str:
    chars = max(chars, 1)
    return label if len(label) <= chars else label[: chars - 1] + "…"


def _fit(label: str, chars: int) -> str:
    """``label`` if it fits, clipped if enough of it shows to mean something, else ""."""
    if len(label) <= chars:
        return label
    return _clip(label, chars) if chars >= 3 else ""


def _svg(width: float, height: float, title: str, body: list[str]) -> str:
    w, h = math.ceil(width), math.ceil(height)
    head = (
        f'<svg xmlns="{SVG_NS}" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
        f'role="img" font-family="{FONT}" font-size="12">'
        f"<title>{_esc(title)}</title>"
        f'<text x="{PAD}" y="20" font-size="14" font-weight="bold" fill="{INK}">'
        f"{_esc(title)}</text>"
    )
    return head + "".join(body) + "</svg>"


def _no_data(title: str, width: int) -> str:
    note = _text(width / 2, TITLE_H + 16, "no data", MUTED, "middle")
    return _svg(width, TITLE_H + 28, title, [note])


def _columns(labels: list[str], values: list[str], width: int) -> tuple[float, float]:
    """Widths of the label column (at most 40% of the chart) and the value column."""
    longest = max(len(s) for s in labels)
    label_w = min(min(longest, MAX_LABEL) * CHAR_W + PAD, width * 0.4)
    value_w = max(len(s) for s in values) * CHAR_W + PAD
    return label_w, value_w


def _text(x: float, y: float, text: str, fill: str, anchor: str = "start") -> str:
    if not text:
        return ""
    return (
        f'<text x="{x:.2f}" y="{y:.2f}" text-anchor="{anchor}" fill="{fill}">'
        f"{_esc(text)}</text>"
    )


def _bar(x: float, y: float, w: float, h: float, tip: str, extra: str = "") -> str:
    return (
        f'<rect class="bar" x="{x:.2f}" y="{y:.2f}" width="{w:.2f}" height="{h:.2f}" '
        f'fill="{BAR}"{extra}><title>{_esc(tip)}</title></rect>'
    )


def _horizontal(counts: Mapping[str, float], title: str, width: int, *, shown: list[str] | None = None,
                funnel: bool = False) -> str:
    """One bar per key, left-aligned with its value after it, or (``funnel``) centred and
    fading, with the value in a column at the right."""
    labels = [str(k) for k in counts]
    values = shown if shown is not None else [fmt_number(v) for v in counts.values()]
    label_w, value_w = _columns(labels, values, width)
    x0 = PAD + label_w
    plot_w = max(width - x0 - value_w - PAD, 40)
    top = max(_value(v) for v in counts.values())
    body = []
    for i, (label, v, text) in enumerate(zip(labels, counts.values(), values, strict=True)):
        y = TITLE_H + i * ROW_H
        w = plot_w * _value(v) / top if top else 0.0
        short = _clip(label, int((label_w - PAD) / CHAR_W))
        if funnel:
            fade = f' fill-opacity="{1 - 0.45 * i / max(len(labels) - 1, 1):.2f}"'
            bar, value_x = _bar(x0 + (plot_w - w) / 2, y, w, BAR_H, f"{label}: {text}", fade), x0 + plot_w + 6
        else:
            bar, value_x = _bar(x0, y, w, BAR_H, f"{label}: {text}"), x0 + w + 4
        body += [_text(x0 - 6, y + BAR_H - 4, short, INK, "end"), bar, _text(value_x, y + BAR_H - 4, text, MUTED)]
    total_w = max(width, x0 + plot_w + value_w + PAD)
    return _svg(total_w, TITLE_H + len(labels) * ROW_H + PAD, title, body)


def _vertical(counts: Mapping[str, float], title: str, width: int) -> str:
    n = len(counts)
    longest = max(len(fmt_number(v)) for v in counts.values())
    # widen the columns (and the chart) until every value fits, within reason
    slot = max((width - 2 * PAD) / n, MIN_SLOT, min(longest * CHAR_W + 4, 48))
    base = TITLE_H + 16 + PLOT_H
    top = max(_value(v) for v in counts.values())
    axis = f'x1="{PAD}" y1="{base}" x2="{PAD + n * slot:.2f}" y2="{base}"'
    body = [f'<line {axis} stroke="{MUTED}" stroke-width="1"/>']
    for i, (key, v) in enumerate(counts.items()):
        label, shown = str(key), fmt_number(v)
        h = PLOT_H * _value(v) / top if top else 0.0
        mid = PAD + (i + 0.5) * slot
        chars = int(slot / CHAR_W)  # text that does not fit is left to the tooltip
        body += [
            _bar(mid - slot * 0.35, base - h, slot * 0.7, h, f"{label}: {shown}"),
            _text(mid, base - h - 4, shown if len(shown) <= chars else "", MUTED, "middle"),
            _text(mid, base + 14, _fit(label, chars), INK, "middle"),
        ]
    return _svg(max(width, 2 * PAD + n * slot), base + 14 + PAD, title, body)


def bar_chart_svg(
    counts: Mapping[str, int | float],
    title: str,
    *,
    horizontal: bool = True,
    width: int = 480,
) -> str:
    """A bar chart of ``counts`` in their insertion order, one labelled bar per key.

    Bars are proportional to the values (the largest spans the plot); each shows its
    value, and hovering shows the full label. Empty ``counts`` give a "no data" chart.
    """
    if not counts:
        return _no_data(title, width)
    draw = _horizontal if horizontal else _vertical
    return draw(counts, title, width)


def funnel_svg(stages: Mapping[str, int], title: str = "Yield funnel") -> str:
    """A funnel: one centred bar per stage, with its count and its share of the first."""
    if not stages:
        return _no_data(title, 480)
    first = _value(next(iter(stages.values())))
    shown = [f"{fmt_number(v)} ({fmt_share(_value(v), first)})" for v in stages.values()]
    return _horizontal(stages, title, 480, shown=shown, funnel=True)


def markdown_chart(svg: str, alt: str) -> str:
    """A markdown image of ``svg`` as a base64 data URI (for markdown metadata).

    An image-loaded SVG renders only with its namespace, so one is added if missing.
    """
    if "xmlns=" not in svg.split(">", 1)[0]:
        svg = svg.replace("<svg", f'<svg xmlns="{SVG_NS}"', 1)
    data = base64.b64encode(svg.encode("utf-8")).decode("ascii")
    alt = " ".join(alt.split()).replace("[", "\\[").replace("]", "\\]")
    return f"![{alt}](data:image/svg+xml;base64,{data})"
