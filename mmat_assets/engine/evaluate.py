"""The evaluation harness: one model, one benchmark, one mode (SPEC §3).

- ``baseline``: the plain question, one generation.
- ``orr``: the tools run first, their outputs go into the prompt in ORR form, one
  generation, the answer parsed from ``<ANSWER>``.
- ``rr``: the agent loop — the model writes THOUGHT/OPERATOR/RAG/SIGNAL, the harness runs
  the real tools and the retriever and answers with the protocol's user turns, sends
  "Please make a reflection." on ``reflection`` and the summary request on ``end`` (or at
  the step cap); the reply to the summary is scored.

The model is any :data:`~mmat_assets.contracts.Responder`: ``(messages, image paths) -> text``,
which the configured trainer provides for its base and tuned students.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmat_assets import protocol
from mmat_assets.contracts import Benchmark, BenchmarkItem, Responder, Retriever, Tool
from mmat_assets.engine.export import IMAGE_TAG
from mmat_assets.engine.stages import orr_system, rr_system
from mmat_assets.engine.tools import call_tool

MODES = ("baseline", "orr", "rr")
STYLE = "Answer the question using a single word or phrase."


@dataclass
class ItemResult:
    item_id: str
    prediction: str
    score: float
    seconds: float
    steps: int = 1
    tool_calls: list[str] = field(default_factory=list)


@dataclass
class Harness:
    """What a mode may use: tools (for orr/rr), a retriever (rr), limits."""

    tools: Mapping[str, Tool]
    retriever: Retriever | None = None
    orr_tools: tuple[str, ...] = ("ocr",)
    max_steps: int = 6
    rag_k: int = 3


def _prompt(item: BenchmarkItem) -> str:
    style = "Answer with the option's letter from the given choices directly." if item.choices and \
        re.fullmatch(r"[A-H]", item.answers[0].strip()) else STYLE
    return protocol.question_prompt(item.question, item.choices, style)


def _with_images(text: str, images: list[str]) -> str:
    return IMAGE_TAG * len(images) + text


def baseline(model: Responder, item: BenchmarkItem, images: list[str], h: Harness) -> tuple[str, int, list[str]]:
    return model([{"role": "user", "content": _with_images(_prompt(item), images)}], images).strip(), 1, []


def orr(model: Responder, item: BenchmarkItem, images: list[str], h: Harness) -> tuple[str, int, list[str]]:
    outputs, used = [], []
    for name in h.orr_tools:
        if name in h.tools and images:
            call = call_tool(h.tools[name], images[0], None, {}, None)
            if call.error is None:
                outputs.append(protocol.Result(name, call.text))
                used.append(name)
    one = protocol.OneTurn(_prompt(item), outputs, "", "", orr_system(h.tools))
    msgs = protocol.render_orr(one)[:-1]  # system + user; the model writes the assistant turn
    msgs[-1]["content"] = _with_images(msgs[-1]["content"], images)
    text = model(msgs, images)
    return (protocol.parse_orr_answer(text) or text).strip(), 1, used


def rr(model: Responder, item: BenchmarkItem, images: list[str], h: Harness) -> tuple[str, int, list[str]]:
    prompt = _prompt(item)
    msgs = [{"role": "system", "content": rr_system(h.tools)},
            {"role": "user", "content": _with_images(f"{prompt} {protocol.START}", images)}]
    used: list[str] = []
    steps = 0
    for steps in range(1, h.max_steps + 1):
        text = model(msgs, images)
        msgs.append({"role": "assistant", "content": text})
        step = _lenient_step(text)
        if step.signal == "end":
            break
        step.results = _act(step, images, h, used)
        msgs.append({"role": "user", "content": protocol.render_feedback(step)})
    msgs.append({"role": "user", "content": protocol.SUMMARY.format(prompt=prompt)})
    return model(msgs, images).strip(), steps, used


def _lenient_step(text: str) -> protocol.Step:
    """What a model's turn asks for; malformed output counts as the end of reasoning."""
    try:
        return protocol.parse_step(text)
    except protocol.ProtocolError:
        signal = re.search(r"<SIGNAL>\s*(continue|reflection|end)\s*</SIGNAL>", text)
        ops = re.search(r"<OPERATOR>(.*?)</OPERATOR>", text, re.S)
        rag = re.search(r"<RAG>(.*?)</RAG>", text, re.S)
        if not signal:
            return protocol.Step(text, [], None, "end")
        names = [o.strip().split("[")[0] for o in (ops[1].split(",") if ops else []) if o.strip()]
        return protocol.Step(text, [protocol.OperatorCall(n) for n in names], rag[1].strip() if rag else None,
                             signal[1])


def _act(step: protocol.Step, images: list[str], h: Harness, used: list[str]) -> list[protocol.Result]:
    results = []
    for op in step.operators:
        if op.name not in h.tools or not images:
            results.append(protocol.Result(op.name, f"The {op.name} tool is not available."))
            continue
        call = call_tool(h.tools[op.name], images[0], None, {"objects": op.args} if op.args else {}, None)
        used.append(op.name)
        results.append(protocol.Result(op.name, call.text if call.error is None else f"The {op.name} tool failed."))
    if step.rag is not None:
        if h.retriever is None:
            results.append(protocol.Result("rag", "Search is not available."))
        else:
            passages = h.retriever.search(step.rag, h.rag_k)
            results.append(protocol.Result("rag", " ".join(f"[{i + 1}] {p.title}: {p.text}" for i, p in enumerate(passages))))
            used.append("rag")
    return results


RUNNERS = {"baseline": baseline, "orr": orr, "rr": rr}


def item_images(item: BenchmarkItem, workdir: Path) -> list[str]:
    """Local image files for an item (bytes written once under ``workdir``)."""
    if item.image is None:
        return []
    if item.image.path:
        return [item.image.path]
    import hashlib

    data = item.image.data or b""
    path = workdir / f"{hashlib.sha256(data).hexdigest()[:24]}.img"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return [str(path)]


def evaluate(model: Responder, bench: Benchmark, items: Iterable[BenchmarkItem], mode: str, h: Harness,
             workdir: Path, progress: Callable[[int], None] | None = None) -> list[ItemResult]:
    """Score every item in one mode; a failing item scores 0 with its error as prediction."""
    out = []
    for n, item in enumerate(items):
        images = item_images(item, workdir)
        start = time.perf_counter()
        try:
            pred, steps, used = RUNNERS[mode](model, item, images, h)
            score = bench.score(pred, item)
        except Exception as exc:  # one broken item must not end the evaluation
            pred, steps, used, score = f"[error] {type(exc).__name__}: {exc}", 0, [], 0.0
        out.append(ItemResult(item.item_id, pred, score, time.perf_counter() - start, steps, used))
        if progress is not None:
            progress(n + 1)
    return out


def summary(results: list[ItemResult]) -> dict[str, Any]:
    n = len(results)
    return {"items": n, "score": round(100 * sum(r.score for r in results) / n, 2) if n else 0.0,
            "latency_s": round(sum(r.seconds for r in results) / n, 4) if n else 0.0,
            "mean_steps": round(sum(r.steps for r in results) / n, 2) if n else 0.0}


def report_markdown(rows: list[dict[str, Any]]) -> str:
    """The paper-style table: rows model × mode, columns benchmarks and the average."""
    benches = sorted({r["benchmark"] for r in rows})
    table: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        table.setdefault((r["model"], r["mode"]), {})[r["benchmark"]] = r
    lines = ["| model | mode | " + " | ".join(benches) + " | average | latency s/sample |",
             "|---|---|" + "---|" * (len(benches) + 2)]
    for (model, mode), cells in sorted(table.items(), key=lambda kv: (kv[0][0], MODES.index(kv[0][1]))):
        scores = [cells[b]["score"] for b in benches if b in cells]
        lat = sum(cells[b]["latency_s"] for b in cells) / len(cells)
        lines.append(f"| {model} | {mode} | " + " | ".join(f"{cells[b]['score']:.1f}" if b in cells else "–"
                                                            for b in benches)
                     + f" | {sum(scores) / len(scores):.1f} | {lat:.2f} |")
    return "\n".join(lines)
