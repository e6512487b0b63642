"""The evaluation harness: one model, one benchmark, one mode (SPEC §3).

- ``baseline``: the plain question, one generation.
- ``orr``: the tools run first, their outputs go into the prompt in ORR form, one
  generation, the answer parsed from ``<ANSWER>``.
- ``rr``: the agent loop — the model writes THOUGHT/OPERATOR/RAG/SIGNAL, the harness runs
  the real tools and the retriever and answers with the protocol's user turns: the results
  and "Please continue your reasoning." on ``continue``, "Please make a reflection." on
  ``reflection``. On ``end``, at the step cap, or after a step that does not parse or was
  cut off at the step's token limit (each counted), it sends the summary request; only the
  reply to the summary is scored.

Generations are batched across problems: every dialogue of a batch that is still reasoning
takes its next step in one call. The per-step token limit (``Limits.step_tokens``) comes
from the training data's step lengths (p99, :func:`generation_limits`), recorded with the
model.

The model is any :data:`~mmat_assets.contracts.Responder`: ``(messages, image paths) -> text``,
which the configured trainer provides for its base and tuned students. A responder with a
``generate_batch(prompts, max_new_tokens) -> list[Reply]`` method (see :class:`BatchResponder`)
is called once per batch with the limit of each kind of turn, and says which replies it cut
off; a plain callable is called prompt by prompt and is never seen cutting a step.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from mmat_assets import protocol
from mmat_assets.contracts import Benchmark, BenchmarkItem, Responder, Retriever, Tool
from mmat_assets.engine.export import IMAGE_TAG
from mmat_assets.engine.stages import orr_system, rr_system
from mmat_assets.engine.tools import call_tool
from mmat_assets.versions import doc_version

MODES = ("baseline", "orr", "rr")
STYLE = "Answer the question using a single word or phrase."
LETTER_STYLE = "Answer with the option's letter from the given choices directly."
#: A chat and its image paths: one generation request.
Prompt = tuple[list[dict[str, str]], list[str]]


@dataclass
class Reply:
    """One generation: its text and whether it stopped at the token limit."""

    text: str
    truncated: bool = False


@runtime_checkable
class BatchResponder(Protocol):
    """A responder that generates for many prompts at once, each up to ``max_new_tokens``."""

    def generate_batch(self, prompts: Sequence[Prompt], max_new_tokens: int) -> list[Reply]: ...


@dataclass
class Limits:
    """Tokens per generation, by kind of turn (sized from the training data)."""

    step_tokens: int = 64  #: one RR step
    answer_tokens: int = 64  #: the reply to the summary request, and the baseline answer
    orr_tokens: int = 256  #: the ORR turn (all thoughts, then the answer)

    @classmethod
    def of(cls, recorded: Mapping[str, Any] | None, default: int, cap: int | None = None) -> Limits:
        """From the limits recorded with a model (:func:`generation_limits`); ``default``
        for any not recorded; none above ``cap`` (a bounded run: what it cuts is counted)."""
        rec = {k: int(v) for k, v in (recorded or {}).items() if k.endswith("_tokens") and v}
        out = cls(rec.get("step_tokens", default), rec.get("answer_tokens", default),
                  rec.get("orr_tokens", max(default, 256)))
        if cap is not None:
            out = cls(min(out.step_tokens, cap), min(out.answer_tokens, cap), min(out.orr_tokens, cap))
        return out


@dataclass
class ItemResult:
    item_id: str
    prediction: str
    score: float
    seconds: float
    steps: int = 1
    tool_calls: list[str] = field(default_factory=list)
    #: RR steps that did not parse / that hit the step's token limit / reflections taken
    bad_steps: int = 0
    cut_steps: int = 0
    reflections: int = 0
    #: how the reasoning ended: end, step_cap, bad_step, cut_step (rr); answer otherwise
    ended: str = "answer"
    choice: bool = False  #: a multiple-choice item (for the breakdown by question type)


@dataclass
class Harness:
    """What a mode may use: tools (for orr/rr), a retriever (rr), limits."""

    tools: Mapping[str, Tool]
    retriever: Retriever | None = None
    orr_tools: tuple[str, ...] = ("ocr",)
    max_steps: int = 6
    rag_k: int = 3
    limits: Limits = field(default_factory=Limits)
    batch_size: int = 8  #: problems whose generations go to the model together


def _prompt(item: BenchmarkItem) -> str:
    # The benchmark says whether its options are answered by letter; the answer itself is
    # the scorer's alone.
    letter = bool(item.choices) and item.meta.get("answer_style") == "letter"
    return protocol.question_prompt(item.question, item.choices, LETTER_STYLE if letter else STYLE)


def _with_images(text: str, images: list[str]) -> str:
    return IMAGE_TAG * len(images) + text


def batch_generate(model: Responder, prompts: Sequence[Prompt], max_new_tokens: int) -> list[Reply]:
    """Replies to ``prompts``, in one call where the model batches."""
    if not prompts:
        return []
    if isinstance(model, BatchResponder):
        return list(model.generate_batch(prompts, max_new_tokens))
    return [Reply(model(msgs, images)) for msgs, images in prompts]


@dataclass
class _Case:
    """One item on its way through a mode."""

    item: BenchmarkItem
    images: list[str]
    msgs: list[dict[str, str]] = field(default_factory=list)
    used: list[str] = field(default_factory=list)
    steps: int = 0
    bad: int = 0
    cut: int = 0
    reflections: int = 0
    ended: str = "answer"
    reasoning: bool = True
    prediction: str = ""
    error: str | None = None


def _baseline(model: Responder, cases: list[_Case], h: Harness) -> None:
    for c in cases:
        c.msgs, c.steps = [{"role": "user", "content": _with_images(_prompt(c.item), c.images)}], 1
    _answer(model, cases, h.limits.answer_tokens, lambda text: text)


def _orr(model: Responder, cases: list[_Case], h: Harness) -> None:
    for c in cases:
        outputs = []
        for name in h.orr_tools:
            if name in h.tools and c.images:
                call = call_tool(h.tools[name], c.images[0], None, {}, None)
                if call.error is None:
                    outputs.append(protocol.Result(name, call.text))
                    c.used.append(name)
        one = protocol.OneTurn(_prompt(c.item), outputs, "", "", orr_system(h.tools))
        c.msgs = protocol.render_orr(one)[:-1]  # system + user; the model writes the assistant turn
        c.msgs[-1]["content"] = _with_images(c.msgs[-1]["content"], c.images)
        c.steps = 1
    _answer(model, cases, h.limits.orr_tokens, lambda text: protocol.parse_orr_answer(text) or text)


def _rr(model: Responder, cases: list[_Case], h: Harness) -> None:
    for c in cases:
        prompt = _prompt(c.item)
        c.msgs = [{"role": "system", "content": rr_system(h.tools)},
                  {"role": "user", "content": _with_images(f"{protocol.neutralise(prompt)} {protocol.START}",
                                                           c.images)}]
    while active := [c for c in cases if c.reasoning and c.error is None]:
        replies = _generate(model, active, h.limits.step_tokens)
        for c, reply in zip(active, replies, strict=True):
            if reply is not None:
                _take_step(c, reply, h)
    for c in cases:
        c.msgs.append({"role": "user", "content": protocol.SUMMARY.format(prompt=protocol.neutralise(_prompt(c.item)))})
    _answer(model, cases, h.limits.answer_tokens, lambda text: text)


def _take_step(c: _Case, reply: Reply, h: Harness) -> None:
    """Record one RR step and answer it, or end the reasoning (SPEC §3)."""
    c.steps += 1
    c.msgs.append({"role": "assistant", "content": reply.text})
    if reply.truncated:
        c.cut, c.reasoning, c.ended = c.cut + 1, False, "cut_step"
        return
    try:
        step = protocol.parse_step(reply.text)
    except protocol.ProtocolError:
        c.bad, c.reasoning, c.ended = c.bad + 1, False, "bad_step"
        return
    if step.signal == "end":
        c.reasoning, c.ended = False, "end"
        return
    c.reflections += step.signal == "reflection"
    try:
        step.results = _act(step, c.images, h, c.used)
    except Exception as exc:  # a tool that raises costs this item, not the evaluation
        c.error = f"[error] {type(exc).__name__}: {exc}"
        return
    c.msgs.append({"role": "user", "content": protocol.render_feedback(step)})
    if c.steps >= h.max_steps:
        c.reasoning, c.ended = False, "step_cap"


def _generate(model: Responder, cases: list[_Case], max_new_tokens: int) -> list[Reply | None]:
    """One generation per case, batched; where the batch fails, case by case, and a case
    whose own generation fails carries its error (None)."""
    prompts = [(c.msgs, c.images) for c in cases]
    try:
        return list(batch_generate(model, prompts, max_new_tokens))
    except Exception:
        pass  # find the item that breaks it; the others still run
    out: list[Reply | None] = []
    for c, p in zip(cases, prompts, strict=True):
        try:
            out.append(batch_generate(model, [p], max_new_tokens)[0])
        except Exception as exc:
            c.error = f"[error] {type(exc).__name__}: {exc}"
            out.append(None)
    return out


def _answer(model: Responder, cases: list[_Case], max_new_tokens: int, parse: Callable[[str], str]) -> None:
    todo = [c for c in cases if c.error is None]
    for c, reply in zip(todo, _generate(model, todo, max_new_tokens), strict=True):
        if reply is not None:
            c.prediction = parse(reply.text).strip()


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


RUNNERS: dict[str, Callable[[Responder, list[_Case], Harness], None]] = {"baseline": _baseline, "orr": _orr,
                                                                          "rr": _rr}


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
             workdir: Path, progress: Callable[[int], None] | None = None,
             resume: Path | None = None) -> list[ItemResult]:
    """Score every item in one mode, ``h.batch_size`` problems per batch of generations; a
    failing item scores 0 with its error as prediction. An item's latency is its batch's
    wall time shared among the batch's items.

    With ``resume`` (a JSON-lines file), each finished batch's results are appended to it,
    and a batch whose results are all there is not run again: an evaluation that stops
    resumes at its first unfinished batch, with the same batches as a run that did not stop.
    The caller names the file by everything that decides the results (:func:`resume_name`)."""
    out: list[ItemResult] = []
    pending = list(items)
    done = _finished(resume)
    for start in range(0, len(pending), max(1, h.batch_size)):
        chunk = pending[start:start + max(1, h.batch_size)]
        if all(i.item_id in done for i in chunk):
            out += [done[i.item_id] for i in chunk]
            if progress is not None:
                progress(len(out))
            continue
        began = time.perf_counter()
        cases = [_Case(item, item_images(item, workdir)) for item in chunk]
        try:
            RUNNERS[mode](model, cases, h)
        except Exception as exc:  # one broken batch must not end the evaluation
            for c in cases:
                c.error = c.error or f"[error] {type(exc).__name__}: {exc}"
        share = (time.perf_counter() - began) / len(cases)
        scored = [_result(bench, c, share, mode) for c in cases]
        if resume is not None:
            _append(resume, scored)
        out += scored
        if progress is not None:
            progress(len(out))
    return out


def resume_name(parts: Mapping[str, Any]) -> str:
    """The file name of an evaluation's finished batches: a hash of what decides them (the
    model and its version, the mode, the limits and harness, the items in order)."""
    return f"{doc_version(parts)}.jsonl"


def _finished(path: Path | None) -> dict[str, ItemResult]:
    """The results already in a resume file, by item id (a torn last line is skipped)."""
    if path is None or not path.is_file():
        return {}
    done: dict[str, ItemResult] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            r = ItemResult(**json.loads(line))
        except (ValueError, TypeError):
            continue
        done[r.item_id] = r
    return done


def _append(path: Path, results: list[ItemResult]) -> None:
    """One batch's results, written and synced in one append (on a line of its own after a
    torn one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r.__dict__, ensure_ascii=False) + "\n" for r in results)
    with path.open("ab+") as f:  # every write appends, wherever the file position is
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                text = "\n" + text
        f.write(text.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def _result(bench: Benchmark, c: _Case, seconds: float, mode: str) -> ItemResult:
    try:
        score = bench.score(c.prediction, c.item) if c.error is None else 0.0
    except Exception as exc:  # a scorer that raises on one prediction scores it 0, named
        c.error, score = f"[error] {type(exc).__name__}: {exc}", 0.0
    return ItemResult(c.item.item_id, c.error or c.prediction, score, seconds, c.steps, list(c.used), c.bad, c.cut,
                      c.reflections, c.ended if mode == "rr" else "answer", bool(c.item.choices))


def summary(results: list[ItemResult]) -> dict[str, Any]:
    n = len(results)

    def mean(values: Iterable[float]) -> float:
        return sum(values) / n if n else 0.0

    return {"items": n, "score": round(100 * mean(r.score for r in results), 2),
            "latency_s": round(mean(r.seconds for r in results), 4),
            "mean_steps": round(mean(r.steps for r in results), 2),
            "bad_steps": sum(r.bad_steps for r in results), "cut_steps": sum(r.cut_steps for r in results),
            "reflections": sum(r.reflections for r in results),
            "errors": sum(r.prediction.startswith("[error]") for r in results)}


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0-1) of ``values`` by the nearest-rank method (0 for none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return float(ordered[max(0, math.ceil(q * len(ordered)) - 1)])


def generation_limits(rr: Iterable[Sequence[Mapping[str, Any]]], orr: Iterable[Sequence[Mapping[str, Any]]],
                      count_tokens: Callable[[str], int], q: float = 0.99) -> dict[str, Any]:
    """Token limits per kind of turn from training dialogues (their messages): the ``q``
    quantile of the RR steps' lengths (every assistant turn but the answer), of the RR
    answers' and of the ORR turns', so a step as long as the data teaches is not cut."""
    steps, answers, orr_turns = [], [], []
    for msgs in rr:
        said = [str(m["content"]) for m in msgs if m.get("role") == "assistant"]
        steps += [count_tokens(t) for t in said[:-1]]
        answers += [count_tokens(t) for t in said[-1:]]
    for msgs in orr:
        orr_turns += [count_tokens(str(m["content"])) for m in msgs if m.get("role") == "assistant"]
    # the end-of-turn token comes on top of the text
    return {"step_tokens": int(percentile(steps, q)) + 1 if steps else 0,
            "answer_tokens": int(percentile(answers, q)) + 1 if answers else 0,
            "orr_tokens": int(percentile(orr_turns, q)) + 1 if orr_turns else 0, "quantile": q,
            "rr_turns": len(steps), "orr_turns": len(orr_turns)}


_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


def export_dialogues(path: Path | str) -> list[list[dict[str, str]]]:
    """The dialogues of an export file as role/content messages: ``messages`` lines
    (ms-swift, InternVL-style) or ``conversations`` lines with ``from``/``value`` (ShareGPT)."""
    out = []
    p = Path(path)
    for line in p.read_text(encoding="utf-8").splitlines() if p.is_file() else []:
        row = json.loads(line)
        turns = row.get("messages") or row.get("conversations") or []
        out.append([{"role": _ROLES.get(str(t.get("role", t.get("from"))), "user"),
                     "content": str(t.get("content", t.get("value", "")))} for t in turns])
    return out


def limits_of_export(files: Mapping[str, str], count_tokens: Callable[[str], int] | None) -> dict[str, Any]:
    """:func:`generation_limits` of an export's RR and ORR files (``files``: format -> path);
    without a token counter, about four characters a token."""
    count = count_tokens or (lambda text: math.ceil(len(text) / 4))
    return generation_limits(export_dialogues(files.get("rr", "")), export_dialogues(files.get("orr", "")), count)


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
