"""Render one audit of an export or a tuned model: rich text, JSON, or one HTML file.

The renderers are pure: they take the :class:`~mmat_assets.engine.audit.Audit` the
collector builds (every key present, lists and mappings possibly empty; the model is None
for an export) and print or return a report; nothing here reads storage. A number that is
None (unknown, e.g. the cost of an unpriced model) shows as "—".
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from mmat_assets.engine.audit import Audit
from mmat_assets.engine.charts import (
    SVG_NS,
    bar_chart_svg,
    fmt_number,
    fmt_share,
    funnel_svg,
)

FLAG = "NON-COMMERCIAL"
TEXT_ORDER = (
    "shards", "sources", "teachers", "tools", "totals", "rates", "funnel", "failures",
    "steps", "tool_calls",
)
HTML_ORDER = ("sources", "teachers", "tools", "funnel", "failures", "shards")


@dataclass
class _Section:
    """One table of the report, drawn by both the text and the HTML renderer."""

    title: str
    headers: tuple[str, ...]
    rows: list[tuple[str, ...]] = field(default_factory=list)
    numeric: frozenset[int] = frozenset()  # right-aligned columns
    alerts: set[tuple[int, int]] = field(default_factory=set)  # (row, column) in red
    flagged: set[int] = field(default_factory=set)  # rows under a non-commercial licence
    flag_col: int | None = None


# --- values -------------------------------------------------------------------------


def _s(v: object) -> str:
    return "—" if v is None or v == "" else str(v)


def _list(items: Iterable[object] | None) -> str:
    return ", ".join(str(x) for x in items or ()) or "—"


def _usd(v: float | None) -> str:
    if v is None:
        return "—"
    return f"${v:,.2f}" if abs(v) >= 1 or v == 0 else f"${v:.4f}"


def _rate(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def _labelled(record: Mapping[str, object], fmt: Callable[[Any], str], *keys: str) -> list[tuple[str, str]]:
    """``(label, formatted value)`` per key of ``record``, labelled by the key spelled out
    (``teacher_calls``: "teacher calls")."""
    return [(key.replace("_", " "), fmt(record.get(key))) for key in keys]


def _numeric_order(counts: Mapping[str, int]) -> dict[str, int]:
    """Keys that are all whole numbers in numeric order ("10" after "9"), else as given."""
    keys = [str(k) for k in counts]
    if keys and all(k.lstrip("-").isdigit() for k in keys):
        return {k: counts[k] for k in sorted(counts, key=lambda k: int(k))}
    return dict(counts)


def _nc_sources(audit: Audit) -> list[str]:
    return [str(s.get("source")) for s in audit["sources"] if s.get("non_commercial")]


def _nc_banner(audit: Audit) -> str:
    names = _nc_sources(audit)
    if not names:
        return ""
    n = len(audit["sources"])
    return (
        f"{len(names)} of {n} sources are licensed for non-commercial use only: "
        f"{', '.join(names)}. The export and anything trained on it inherit that."
    )


# --- sections -----------------------------------------------------------------------


def _header(audit: Audit) -> list[tuple[str, str]]:
    target, export, model = audit["target"], audit["export"] or {}, audit["model"]
    rows = [
        ("target", f"{_s(target.get('kind'))} {_s(target.get('name'))}"),
        ("target path", _s(target.get("path"))),
        ("export", f"{_s(export.get('name'))} ({_s(export.get('asset'))})"),
        ("data version", _s(export.get("data_version"))),
        ("export rows", _list(f"{k}: {fmt_number(v)}" for k, v in
                              (export.get("rows") or {}).items())),
        ("rejected", fmt_number(export.get("rejected"))),
        ("export path", _s(export.get("path"))),
    ]
    if model:
        rows += [
            ("checkpoint", _s(model.get("checkpoint"))),
            ("trainer", _s(model.get("trainer"))),
            ("student", _s(model.get("student"))),
            ("steps", fmt_number(model.get("steps"))),
            ("code version", _s(model.get("code_version"))),
        ]
    return rows


def _shards(audit: Audit) -> _Section:
    assets: dict[str, None] = {}
    for shard in audit["shards"]:
        assets.update(dict.fromkeys(shard.get("data_versions") or {}))
    sec = _Section("Shards", ("shard", "rows", *assets), numeric=frozenset({1}))
    for shard in audit["shards"]:
        versions = shard.get("data_versions") or {}
        sec.rows.append((_s(shard.get("shard")), fmt_number(shard.get("rows")),
                         *(_s(versions.get(a)) for a in assets)))
    return sec


def _sources(audit: Audit) -> _Section:
    sec = _Section("Sources", ("source", "dataset", "subsets", "licence", "rows", "flag"),
                   numeric=frozenset({4}), flag_col=5)
    for i, src in enumerate(audit["sources"]):
        nc = bool(src.get("non_commercial"))
        sec.rows.append((
            _s(src.get("source")), _s(src.get("dataset")), _list(src.get("subsets")),
            src.get("license") or "unknown", fmt_number(src.get("rows")), FLAG if nc else "",
        ))
        if nc:
            sec.flagged.add(i)
        if not src.get("license"):
            sec.alerts.add((i, 3))
    return sec


def _teachers(audit: Audit) -> _Section:
    sec = _Section(
        "Teachers",
        ("teacher", "model", "prompt versions", "calls", "cached", "prompt tokens",
         "completion tokens", "cost"),
        numeric=frozenset({3, 4, 5, 6, 7}),
    )
    for t in audit["teachers"]:
        sec.rows.append((
            _s(t.get("teacher")), _s(t.get("model")), _list(t.get("prompt_versions")),
            fmt_number(t.get("calls")), fmt_number(t.get("cached_calls")),
            fmt_number(t.get("prompt_tokens")), fmt_number(t.get("completion_tokens")),
            _usd(t.get("cost_usd")),
        ))
    return sec


def _tools(audit: Audit) -> _Section:
    sec = _Section("Tools", ("tool", "versions", "calls", "errors", "error rate"),
                   numeric=frozenset({2, 3, 4}))
    for i, t in enumerate(audit["tools"]):
        calls, errors = t.get("calls") or 0, t.get("errors") or 0
        sec.rows.append((_s(t.get("tool")), _list(t.get("versions")), fmt_number(calls),
                         fmt_number(errors), fmt_share(errors, calls)))
        if errors:
            sec.alerts.update({(i, 3), (i, 4)})
    return sec


def _values(title: str, head: str, rows: list[tuple[str, str]]) -> _Section:
    """A two-column section: what is measured, and its value."""
    return _Section(title, (head, "value"), rows=list(rows), numeric=frozenset({1}))


def _totals(audit: Audit) -> _Section:
    t = audit["totals"]
    counts = _labelled(t, fmt_number, "rows", "teacher_calls", "tool_calls", "prompt_tokens", "completion_tokens",
                       "tokens")
    return _values("Totals", "measure", [*counts, ("cost (USD)", _usd(t.get("cost_usd")))])


def _rates(audit: Audit) -> _Section:
    return _values("Rates", "rate", _labelled(audit["rates"], _rate, "reflection_rate", "failure_rate"))


def _funnel(audit: Audit) -> _Section:
    sec = _Section("Yield funnel", ("stage", "rows", "of first", "lost"),
                   numeric=frozenset({1, 2, 3}))
    stages = list(audit["funnel"].items())
    first = stages[0][1] if stages else 0
    for i, (stage, rows) in enumerate(stages):
        lost = (stages[i - 1][1] or 0) - (rows or 0) if i else 0
        sec.rows.append((_s(stage), fmt_number(rows), fmt_share(rows or 0, first or 0),
                         fmt_number(lost) if i else ""))
        if lost > 0:
            sec.alerts.add((i, 3))
    return sec


def _counts(title: str, headers: tuple[str, str], counts: Mapping[str, int]) -> _Section:
    sec = _Section(title, (*headers, "share"), numeric=frozenset({1, 2}))
    total = sum(v or 0 for v in counts.values())
    sec.rows = [(_s(k), fmt_number(v), fmt_share(v or 0, total)) for k, v in counts.items()]
    return sec


def _sections(audit: Audit) -> dict[str, _Section]:
    failures = dict(sorted(audit["failures"].items(), key=lambda kv: (-(kv[1] or 0), kv[0])))
    return {
        "shards": _shards(audit),
        "sources": _sources(audit),
        "teachers": _teachers(audit),
        "tools": _tools(audit),
        "totals": _totals(audit),
        "rates": _rates(audit),
        "funnel": _funnel(audit),
        "failures": _counts("Failures by reason", ("reason", "samples"), failures),
        "steps": _counts("Steps per sample", ("steps", "samples"),
                         _numeric_order(audit["steps_per_sample"])),
        "tool_calls": _counts("Tool calls per tool", ("tool", "calls"),
                              audit["tool_calls_per_tool"]),
    }


# --- text ---------------------------------------------------------------------------


def _rich_table(sec: _Section) -> Table | Text:
    if not sec.rows:
        return Text(f"{sec.title}: none", style="dim")
    table = Table(title=sec.title, title_justify="left", title_style="bold")
    for c, head in enumerate(sec.headers):
        table.add_column(head, justify="right" if c in sec.numeric else "left")
    for r, row in enumerate(sec.rows):
        cells = []
        for c, cell in enumerate(row):
            style = "bold red" if (r, c) in sec.alerts else ""
            if c == sec.flag_col and r in sec.flagged:
                style = "bold white on red"
            cells.append(Text(cell, style=style))  # Text: data is never read as markup
        table.add_row(*cells)
    return table


def _rich_header(audit: Audit) -> Panel:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim")
    grid.add_column()
    for key, value in _header(audit):
        grid.add_row(key, Text(value))
    model = audit["model"]
    if model and model.get("training_config"):
        config = json.dumps(model["training_config"], sort_keys=True, default=str)
        grid.add_row("training config", Text(config))
    target = audit["target"]
    return Panel(grid, title=Text(f"mmat audit: {_s(target.get('name'))}", style="bold"),
                 title_align="left", expand=False)


def render_text(audit: Audit, console: Console) -> None:
    """Print the audit to ``console`` as a header panel and one table per section."""
    console.print(_rich_header(audit))
    if banner := _nc_banner(audit):
        console.print(Text(banner, style="bold red"))
    sections = _sections(audit)
    for key in TEXT_ORDER:
        console.print()
        console.print(_rich_table(sections[key]))


# --- JSON ---------------------------------------------------------------------------


def render_json(audit: Audit) -> str:
    """The audit as indented JSON with sorted keys, so equal audits give equal text."""
    return json.dumps(audit, indent=2, sort_keys=True, ensure_ascii=False, default=str)


# --- HTML ---------------------------------------------------------------------------

CSS = """
:root { --ink: #1f2328; --muted: #59636e; --line: #d1d9e0; --head: #f6f8fa;
        --bad: #b42318; --badbg: #fef3f2; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--ink); background: #fff;
       font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial,
             sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 32px 48px; }
h1 { font-size: 22px; margin: 0 0 12px; }
h2 { font-size: 16px; margin: 28px 0 8px; padding-bottom: 4px;
     border-bottom: 1px solid var(--line); }
code, dd, td.mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas,
                    monospace; font-size: 12.5px; }
.kind { display: inline-block; font-size: 12px; font-weight: 600; color: var(--muted);
        border: 1px solid var(--line); border-radius: 10px; padding: 0 8px;
        vertical-align: middle; text-transform: uppercase; letter-spacing: .04em; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 2px 18px;
          margin: 0; }
dl.meta dt { color: var(--muted); }
dl.meta dd { margin: 0; word-break: break-all; }
details { margin-top: 8px; }
pre { background: var(--head); border: 1px solid var(--line); border-radius: 6px;
      padding: 8px 12px; overflow-x: auto; font-size: 12px; }
.banner { border-left: 4px solid var(--bad); background: var(--badbg); color: var(--bad);
          font-weight: 600; padding: 8px 12px; margin: 16px 0; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(140px, 1fr));
         gap: 10px; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 8px 12px; }
.card .k { color: var(--muted); font-size: 11px; text-transform: uppercase;
           letter-spacing: .04em; }
.card .v { font-size: 20px; font-weight: 600; font-variant-numeric: tabular-nums; }
.charts { display: flex; flex-wrap: wrap; align-items: flex-start; gap: 12px; }
figure { margin: 0; border: 1px solid var(--line); border-radius: 6px; padding: 6px; }
figure svg { display: block; max-width: 100%; height: auto; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { text-align: left; padding: 5px 10px; border-bottom: 1px solid var(--line);
         vertical-align: top; }
th { background: var(--head); font-weight: 600; }
.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.nc td { background: var(--badbg); }
.alert { color: var(--bad); font-weight: 600; }
.flag { display: inline-block; background: var(--bad); color: #fff; font-weight: 700;
        font-size: 11px; letter-spacing: .03em; padding: 1px 6px; border-radius: 3px;
        white-space: nowrap; }
.none { color: var(--muted); font-style: italic; }
footer { margin-top: 32px; color: var(--muted); font-size: 12px; }
"""


def _e(v: object) -> str:
    return html.escape(str(v), quote=True)


def _html_cell(sec: _Section, r: int, c: int, cell: str) -> str:
    classes = [n for n, on in (("num", c in sec.numeric), ("alert", (r, c) in sec.alerts))
               if on]
    attr = f' class="{" ".join(classes)}"' if classes else ""
    body = _e(cell)
    if c == sec.flag_col and r in sec.flagged:
        body = f'<span class="flag">{FLAG}</span>'
    return f"<td{attr}>{body}</td>"


def _html_section(key: str, sec: _Section) -> str:
    if not sec.rows:
        return f'<section id="{key}"><h2>{_e(sec.title)}</h2><p class="none">none</p></section>'
    num = ' class="num"'
    head = "".join(f"<th{num if c in sec.numeric else ''}>{_e(h)}</th>"
                   for c, h in enumerate(sec.headers))
    rows = []
    for r, row in enumerate(sec.rows):
        attr = ' class="nc"' if r in sec.flagged else ""
        cells = "".join(_html_cell(sec, r, c, cell) for c, cell in enumerate(row))
        rows.append(f"<tr{attr}>{cells}</tr>")
    return (f'<section id="{key}"><h2>{_e(sec.title)}</h2><table><thead><tr>{head}</tr>'
            f'</thead><tbody>{"".join(rows)}</tbody></table></section>')


def _html_header(audit: Audit) -> str:
    target = audit["target"]
    items = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in _header(audit))
    config = ""
    model = audit["model"]
    if model and model.get("training_config"):
        text = json.dumps(model["training_config"], indent=2, sort_keys=True, default=str)
        config = f"<details><summary>training config</summary><pre>{_e(text)}</pre></details>"
    return (f'<header><h1>Audit: {_e(target.get("name"))} '
            f'<span class="kind">{_e(target.get("kind"))}</span></h1>'
            f'<dl class="meta">{items}</dl>{config}</header>')


def _html_cards(sections: Mapping[str, _Section]) -> str:
    rows = sections["totals"].rows + sections["rates"].rows
    cards = "".join(f'<div class="card"><div class="k">{_e(k)}</div>'
                    f'<div class="v">{_e(v)}</div></div>' for k, v in rows)
    return (f'<section id="totals"><h2>Totals and rates</h2>'
            f'<div class="cards">{cards}</div></section>')


def _inline(svg: str) -> str:
    # An HTML parser puts <svg> in the SVG namespace by itself; dropping the declaration
    # keeps the page free of any URL.
    return svg.replace(f' xmlns="{SVG_NS}"', "", 1)


def _html_charts(audit: Audit) -> str:
    charts = (
        bar_chart_svg(audit["tool_calls_per_tool"], "Tool calls per tool"),
        bar_chart_svg(_numeric_order(audit["steps_per_sample"]), "Samples by number of steps",
                      horizontal=False),
        funnel_svg(audit["funnel"]),
    )
    figures = "".join(f"<figure>{_inline(svg)}</figure>" for svg in charts)
    return f'<section id="charts"><h2>Charts</h2><div class="charts">{figures}</div></section>'


def render_html(audit: Audit) -> str:
    """The audit as one self-contained HTML page: inline CSS and SVG, no scripts or URLs."""
    sections = _sections(audit)
    banner = _nc_banner(audit)
    parts = [
        _html_header(audit),
        f'<p class="banner">{_e(banner)}</p>' if banner else "",
        _html_cards(sections),
        _html_charts(audit),
        *(_html_section(key, sections[key]) for key in HTML_ORDER),
    ]
    title = f"mmat audit: {_s(audit['target'].get('name'))}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head>\n<body><main>"
        + "\n".join(p for p in parts if p)
        + "\n<footer>Rendered by mmat audit.</footer></main></body></html>\n"
    )
