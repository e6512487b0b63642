"""Readable terminal views of one sample (``mmat show``) and its lineage (``mmat lineage``).

Pure rendering of the dicts :mod:`mmat_assets.engine.lineage` returns; text from the data
is always printed literally (``rich.Text``), never read as markup.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

ROLE_STYLE = {"system": "dim", "user": "cyan", "assistant": "green"}


def _clip(text: Any, limit: int) -> str:
    s = "" if text is None else str(text)
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _kv(pairs: list[tuple[str, Any]]) -> Table:
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold")
    t.add_column()
    for k, v in pairs:
        t.add_row(k, Text(str(v)))
    return t


def _tool_table(calls: list[Mapping[str, Any]], result_chars: int = 120) -> Table:
    t = Table(title="tool calls", title_justify="left")
    for col in ("tool", "version", "args", "cache key", "result"):
        t.add_column(col, overflow="fold")
    for c in calls:
        result = Text(_clip(c.get("error"), result_chars), style="red") if c.get("error") \
            else Text(_clip(" ".join(str(c.get("text") or "").split()), result_chars))
        t.add_row(Text(str(c.get("tool"))), Text(str(c.get("version"))), Text(str(c.get("args") or "{}")),
                  Text(_clip(c.get("cache_key"), 16)), result)
    return t


def render_show(data: Mapping[str, Any], console: Console) -> None:
    """Header, each dialogue turn by turn, then the tool calls."""
    status = data.get("status") or "foundation only"
    if data.get("failure"):
        status += f" ({data['failure']}: {_clip(data.get('failure_detail'), 200)})"
    console.print(Panel(_kv([
        ("sample", data["sample_id"]), ("source", f"{data['source']}/{data['subset']} row {data['source_row_id']}"),
        ("licence", data["license"]), ("shard", data["shard"]), ("status", status),
        ("question", data["question"]), ("gold answer", data["answer"]),
        ("image", "\n".join(data["images"]) or "(none)"),
    ]), title=f"sample {data['sample_id']}", title_align="left"))
    if not data["dialogues"]:
        console.print("[yellow]no RR/ORR dialogue: the sample did not reach integration[/]")
    for fmt, turns in data["dialogues"].items():
        body = []
        for i, turn in enumerate(turns):
            role = str(turn["role"])
            body.append(Text(f"[{i}] {role}", style=f"bold {ROLE_STYLE.get(role, '')}"))
            body.append(Text(str(turn["content"])))
            body.append(Text(""))
        console.print(Panel(Group(*body), title=f"{fmt.upper()} dialogue ({len(turns)} turns)", title_align="left"))
    if data["tool_calls"]:
        console.print(_tool_table(data["tool_calls"]))


def render_lineage(data: Mapping[str, Any], console: Console) -> None:
    """Backward (source row → images → tool calls → teacher calls → reflection → assets),
    then forward (exports and models), as one tree."""
    src = data["source"]
    root = Tree(Text(f"sample {data['sample_id']}", style="bold"))
    licence = Text(f"licence {src['license']}")
    if src.get("non_commercial"):
        licence.append("  NON-COMMERCIAL", style="bold red")
    node = root.add(Text(f"source row: {src['source']} ({src['dataset']}/{src['subset']}) row {src['source_row_id']}"))
    node.add(licence)
    node.add(Text(f"question: {_clip(src['question'], 200)}"))
    node.add(Text(f"gold answer: {src['answer']}"))
    images = root.add(Text(f"images ({len(data['images'])})"))
    for im in data["images"]:
        missing = "" if im["exists"] else "  (MISSING)"
        images.add(Text(f"sha256 {im['sha256']}  {im['width']}x{im['height']}  {im['path']}{missing}"))
    root.add(Text(f"shard {data['shard']}; status {data.get('status') or '-'}"
                  + (f" (failed in {data.get('failure_stage')}: {data.get('failure')})" if data.get("failure") else "")))
    tools = root.add(Text(f"tool calls ({len(data['tool_calls'])})"))
    for c in data["tool_calls"]:
        what = f"error: {c['error']}" if c.get("error") else " ".join(str(c.get("text") or "").split())
        tools.add(Text(f"{c['tool']} {c['version']} args={c.get('args') or '{}'} cache_key={c.get('cache_key')}\n"
                       f"→ {_clip(what, 300)}"))
    teachers = root.add(Text(f"teacher calls ({len(data['teacher_calls'])})"))
    for c in data["teacher_calls"]:
        teachers.add(Text(f"{c.get('kind')}: {c.get('teacher')}/{c.get('model')} prompt {c.get('prompt_version')} "
                          f"request {c.get('request_hash')}  tokens {c.get('prompt_tokens', 0)}+"
                          f"{c.get('completion_tokens', 0)}  cost ${float(c.get('cost_usd') or 0):.6f}"
                          + ("  (cached)" if c.get("cached") else "")))
    refl = data["reflection"]
    rnode = root.add(Text(f"reflection: checks fired {', '.join(refl['checks']) or 'none'}; "
                          f"fix inserted: {bool(refl['reflected'])}"))
    for f in refl["findings"]:
        rnode.add(Text(_clip(json.dumps(f, ensure_ascii=False), 300)))
    assets = root.add(Text("assets (partition, code version, data version)"))
    for a in data["assets"]:
        part = f"[{a['partition']}]" if a["partition"] is not None else ""
        line = Text(f"{a['asset']}{part}  code {a['code_version'] or '-'}  data {a['data_version']}")
        if a.get("changed_since"):
            line.append(f"  (rebuilt since: this sample was read at {a['recorded_data_version']})", style="yellow")
        assets.add(line)
    fwd = root.add(Text("forward", style="bold"))
    for e in data["forward"]["exports"]:
        mark = f"unknown (no id list at {e['ids_file']})" if e["included"] is None else \
            f"holds it ({', '.join(e['formats'])})" if e["included"] else "does not hold it"
        fwd.add(Text(f"{e['export']} (data version {e['data_version']}): {mark}"))
    for m in data["forward"]["models"]:
        mark = f"unknown (no id list at {m['ids_file']})" if m["trained_on"] is None else \
            "trained on it" if m["trained_on"] else \
            "its export holds it, not in the format it trained on" if m["included"] else "not trained on it"
        fwd.add(Text(f"{m['model']} {m['checkpoint']} (from {m['export']} {m['export_data_version']}, "
                     f"{m['data']}): {mark}"))
    if not data["forward"]["exports"] and not data["forward"]["models"]:
        fwd.add(Text("no exports or models built yet"))
    console.print(root)
