"""Rationale stage: the multi-turn teacher loop of SPEC §2.2, one sample at a time.

The teacher sees the image, the question and the gold answer and writes one JSON step at
a time; the engine runs the tools it names (through the tool layer and its cache) and
the retriever for its RAG query, feeds the results back, and asks again until
``final_answer`` or the step limit. Every teacher request goes through the request cache
keyed by the request's full hash, and is stored as soon as it is answered, so a shard
killed half-way and rerun repeats no completed request. Failures are data: a sample that
cannot be finished ends as an :class:`Outcome` with a reason, never as an exception.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from mmat_assets import protocol
from mmat_assets.contracts import (Retriever, StepContext, StepSoFar, Teacher, TeacherError, TeacherReply,
                                   TeacherRequest, Tool)
from mmat_assets.engine.budget import BUDGET_REASON, Budget
from mmat_assets.engine.cache import ResultCache, aclaim_or_wait
from mmat_assets.engine.reflection import Declarations
from mmat_assets.engine.tools import ToolCall, call_tool, search_cached, tool_prompt

T = TypeVar("T")

#: Bounds of a step. A server that constrains decoding to the schema (llama.cpp) cannot stop
#: a reply inside a string, so without them a small model's thought runs into max_tokens and
#: the reply is cut off unparseable; with them every reply it writes is a whole step.
THOUGHT_MAX_CHARS = 200
QUERY_MAX_CHARS = 120
MAX_OPERATORS = 4

STEP_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "thought": {"type": "string"},
        "operators": {"type": "array", "items": {"type": "string"}},
        "rag": {"type": "object", "properties": {"needed": {"type": "boolean"},
                                                 "query": {"type": ["string", "null"]}},
                "required": ["needed", "query"], "additionalProperties": False},
        "next_action": {"type": "string", "enum": ["continue", "final_answer"]},
    },
    "required": ["thought", "operators", "rag", "next_action"],
    "additionalProperties": False,
}


def step_schema(tools: Mapping[str, Any]) -> dict[str, Any]:
    """The schema a step request carries: :data:`STEP_SCHEMA` with its strings bounded and
    each operator one of ``tools`` by name, optionally with its ``[object1|object2]``
    arguments, so a constrained model can neither run on nor name a missing tool."""
    names = "|".join(re.escape(n) for n in sorted(tools))
    item = {"type": "string", "pattern": rf'^({names})(\[[^\]\["\\\x00-\x1f]{{1,80}}\])?$'} if tools else {"type": "string"}
    base = STEP_SCHEMA["properties"]
    props = {**base, "thought": {"type": "string", "minLength": 1, "maxLength": THOUGHT_MAX_CHARS},
             "operators": {**base["operators"], "items": item, "maxItems": MAX_OPERATORS if tools else 0},
             "rag": {**base["rag"], "properties": {
                 "needed": {"type": "boolean"},
                 "query": {"anyOf": [{"type": "string", "maxLength": QUERY_MAX_CHARS}, {"type": "null"}]}}}}
    return {**STEP_SCHEMA, "properties": props}

TEACHER_SYSTEM = """\
You are a careful multimodal reasoner writing a step-by-step rationale for a question about
an image. You are given the question and its correct answer: reason toward that answer
from evidence, but never quote or reveal the given answer as a source. Each reply is ONE
JSON object with keys: "thought" (one short reasoning step that uses the previous results),
"operators" (a list, possibly empty, of tools to run now; a tool that takes object names
is written "tool[object1|object2]"), "rag" ({{"needed": true|false, "query": text or null}}: a
text web search, only when the tools are not enough), "next_action" ("continue" or
"final_answer"). Tools you may call:
{tools}
{rag_line}Use final_answer only once the reasoning reaches the answer."""


@dataclass
class StageSettings:
    """Knobs of the loop (from configuration)."""

    max_steps: int = 6
    rag_k: int = 3
    concurrency: int = 16
    tool_concurrency: int = 2
    #: the build's spending cap in USD (None: no cap); see mmat_assets.engine.budget
    budget_usd: float | None = None


@dataclass
class Environment:
    """What a shard's loop talks to: teacher, tools, retriever and their caches."""

    teacher: Teacher
    teacher_name: str
    tools: Mapping[str, Tool]
    retriever: Retriever | None
    tool_cache: ResultCache | None
    retrieval_cache: ResultCache | None
    request_cache: ResultCache | None
    local_image: Callable[[str], Path]
    settings: StageSettings = field(default_factory=StageSettings)
    #: one lock per (tool, image, args): questions about one image wait for its first call
    inflight: dict[str, asyncio.Lock] = field(default_factory=dict)
    #: what the build's plugins declare for reflection's claim checks (None: the
    #: declarations of ``tools`` alone, and no source's ground truth)
    declarations: Declarations | None = None
    #: the spending cap's ledger, built at the first request when settings.budget_usd is set
    budget: Budget | None = None


@dataclass
class Outcome:
    """One sample's rationale: its trajectory, every call made, or why it failed."""

    sample_id: str
    trajectory: protocol.Trajectory | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    teacher_calls: list[dict[str, Any]] = field(default_factory=list)
    failure: str | None = None
    detail: str = ""
    grounding: str = ""

    @property
    def used_rag(self) -> bool:
        return bool(self.trajectory and any(s.rag is not None for s in self.trajectory.steps))


class StepError(ValueError):
    """A teacher reply that is not a valid step."""


#: The :class:`TeacherError` reason of a rejected API key (HTTP 401/403).
AUTH_REASON = "auth"


class TeacherRejected(RuntimeError):
    """The teacher rejected its credentials. Every further request would be rejected the same
    way, so the shard stops at once instead of spending each row on it: rows still waiting
    send nothing, rows in flight are cancelled, and the stage fails with this one line."""


# ------------------------------------------------------------------------ parsing


def parse_step_json(content: str, allowed: set[str]) -> tuple[protocol.Step, bool, str]:
    """A protocol step from the teacher's JSON; returns (step, final, grounding note)."""
    try:
        data = json.loads(content)
    except json.JSONDecodeError as exc:
        raise StepError(f"reply is not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("thought"), str) or not data["thought"].strip():
        raise StepError("reply has no thought")
    ops = [_operator(o) for o in (data.get("operators") or [])]
    unknown = [o.name for o in ops if o.name not in allowed]
    if unknown:
        raise StepError(f"unknown or unavailable operator(s): {', '.join(unknown)}")
    rag = data.get("rag") or {}
    query = rag.get("query") if isinstance(rag, dict) and rag.get("needed") else None
    final = data.get("next_action") == "final_answer"
    step = protocol.Step(data["thought"].strip(), ops, query.strip() if isinstance(query, str) and query.strip() else None,
                         "end" if final else "continue")
    return step, final, str(data.get("grounding") or "")


def _operator(raw: Any) -> protocol.OperatorCall:
    if isinstance(raw, dict):
        name, args = str(raw.get("name", "")), [str(a) for a in raw.get("objects") or raw.get("args") or []]
    else:
        m = re.fullmatch(r"\s*([\w.-]+)\s*(?:\[(.*)\])?\s*", str(raw))
        if not m:
            raise StepError(f"bad operator {raw!r}")
        name, args = m[1], (m[2] or "").split("|") if m[2] else []
    clean = [re.sub(r"[,|\[\]]", " ", a).strip() for a in args]  # the operator syntax's own characters
    return protocol.OperatorCall(name, [a for a in clean if a])


# ------------------------------------------------------------------------ requests


def first_messages(sample: Mapping[str, Any], env: Environment) -> list[dict[str, Any]]:
    """System and opening user message of a teacher conversation about one sample."""
    rag_line = "- rag: search the web with a text query\n" if env.retriever is not None else ""
    system = TEACHER_SYSTEM.format(tools=tool_prompt(env.tools) or "(none)", rag_line=rag_line)
    parts: list[dict[str, Any]] = [{"type": "image", "path": str(env.local_image(img["uri"])),
                                    "sha256": img["sha256"]} for img in sample["images"] or []]
    text = f"Question: {sample['prompt']}\nCorrect answer (do not quote it): {sample['answer']}"
    if sample.get("rationale"):
        text += f"\nA reference solution you may follow:\n{sample['rationale']}"
    parts.append({"type": "text", "text": text})
    return [{"role": "system", "content": system}, {"role": "user", "content": parts}]


def step_context(sample: Mapping[str, Any], env: Environment, steps: list[protocol.Step]) -> StepContext:
    """The structured facts behind a step request (for teachers that work from facts).
    Keys and their order are part of the request's cache key: keep them as they are."""
    meta = sample.get("meta") or "{}"
    return StepContext(
        sample_id=sample["sample_id"], dataset=sample["dataset"], subset=sample["subset"],
        question=sample["question"], prompt=sample["prompt"], choices=list(sample["choices"] or []),
        answer=sample["answer"], answer_type=sample["answer_type"], rationale=sample.get("rationale"),
        meta=json.loads(meta) if isinstance(meta, str) else meta,
        tools=sorted(env.tools), retrieval=env.retriever is not None,
        steps=[_step_so_far(s) for s in steps], max_steps=env.settings.max_steps,
    )


def _step_so_far(step: protocol.Step) -> StepSoFar:
    return StepSoFar(thought=step.thought, operators=[o.render() for o in step.operators], rag=step.rag,
                     results=[{"tool": r.tool, "text": r.text} for r in step.results])


def _step_message(step: protocol.Step) -> dict[str, Any]:
    body = {"thought": step.thought, "operators": [o.render() for o in step.operators],
            "rag": {"needed": step.rag is not None, "query": step.rag},
            "next_action": "final_answer" if step.signal == "end" else "continue"}
    return {"role": "assistant", "content": json.dumps(body, ensure_ascii=False)}


def _feedback_message(step: protocol.Step) -> dict[str, Any]:
    return {"role": "user", "content": protocol.render_feedback(step)}


async def ask(env: Environment, request: TeacherRequest) -> tuple[TeacherReply, dict[str, Any]]:
    """One teacher request through the request cache; returns the reply and its record."""
    model = env.teacher.model or f"{env.teacher.name}@{env.teacher.version}"
    key = request.fingerprint(model)

    budget = _budget(env)

    async def send() -> tuple[TeacherReply, dict[str, Any]]:
        if budget is not None:
            budget.check()  # only new requests: a cached answer costs nothing
        reply = await env.teacher.acomplete(request)
        if budget is not None:
            budget.charge(reply.cost_usd)
        return reply, asdict(reply)  # stored as it arrives: a rerun resumes here

    # Claimed before it is sent: another process asking the same request waits for this answer.
    hit, sent = await aclaim_or_wait(env.request_cache, key, send)
    reply = TeacherReply(**hit) if hit is not None else sent
    assert reply is not None  # aclaim_or_wait returns the stored answer or the one just sent
    record = {"teacher": env.teacher_name, "model": reply.model or model, "kind": request.kind,
              "prompt_version": request.prompt_version, "request_hash": key,
              "prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
              "cost_usd": reply.cost_usd, "cached": hit is not None}
    return reply, record


def _budget(env: Environment) -> Budget | None:
    if env.budget is None and env.settings.budget_usd is not None:
        env.budget = Budget(env.settings.budget_usd, env.request_cache)
    return env.budget


# ---------------------------------------------------------------------------- loop


async def run_sample(sample: Mapping[str, Any], env: Environment, tool_gate: asyncio.Semaphore) -> Outcome:
    """The teacher loop for one sample; never raises for the sample's own failures."""
    out = Outcome(sample["sample_id"], None)
    steps: list[protocol.Step] = []
    messages = first_messages(sample, env)
    try:
        for _ in range(env.settings.max_steps):
            request = TeacherRequest("step", list(messages), protocol.PROMPT_VERSION, step_schema(env.tools),
                                     {"temperature": 0}, step_context(sample, env, steps))
            reply, record = await ask(env, request)
            out.teacher_calls.append(record)
            step, final, grounding = parse_step_json(reply.content, set(env.tools))
            out.grounding = grounding or out.grounding
            steps.append(step)
            if final:
                out.trajectory = protocol.Trajectory(sample["prompt"], steps, sample["answer"])
                return out
            await _act(step, sample, env, out, tool_gate)
            messages += [_step_message(step), _feedback_message(step)]
        out.failure, out.detail = "step_limit", f"no final_answer within {env.settings.max_steps} steps"
    except TeacherError as exc:
        if exc.reason == AUTH_REASON:
            detail = " ".join(str(exc).split())[:400]  # one line; the teacher scrubbed its key from it
            raise TeacherRejected(f"the teacher {env.teacher_name!r} rejected the API key: {detail}") from None
        # A row the cap stopped is not a failed one: a rerun with a higher cap resumes it.
        reason = BUDGET_REASON if exc.reason == BUDGET_REASON else f"teacher_{exc.reason}"
        out.failure, out.detail = reason, str(exc)
    except StepError as exc:
        out.failure, out.detail = "bad_step", str(exc)
    out.trajectory = protocol.Trajectory(sample["prompt"], steps, sample["answer"]) if steps else None
    return out


async def _act(step: protocol.Step, sample: Mapping[str, Any], env: Environment, out: Outcome,
               tool_gate: asyncio.Semaphore) -> None:
    """Run the step's tools and search; attach their texts as the step's results."""
    images = sample["images"] or []
    for op in step.operators:
        tool = env.tools[op.name]
        args = {"objects": op.args} if op.args else {}
        if not images:
            step.results.append(protocol.Result(op.name, "No image is available for this tool."))
            continue
        key = f"{op.name}\x1f{images[0]['sha256']}\x1f{json.dumps(args, sort_keys=True)}"
        async with env.inflight.setdefault(key, asyncio.Lock()), tool_gate:
            call: ToolCall = await asyncio.to_thread(
                call_tool, tool, env.local_image(images[0]["uri"]), images[0]["sha256"], args, env.tool_cache)
        out.tool_calls.append({**call.to_dict(), "step": len(out.teacher_calls) - 1})
        text = call.text if call.error is None else f"The {op.name} tool failed on this image."
        step.results.append(protocol.Result(op.name, text))
    if step.rag is not None:
        step.results.append(protocol.Result("rag", await _search(step.rag, env, out)))


async def _search(query: str, env: Environment, out: Outcome) -> str:
    if env.retriever is None:
        return "Search is not available."
    try:
        passages, cached = await asyncio.to_thread(search_cached, env.retriever, query, env.settings.rag_k,
                                                   env.retrieval_cache)
    except Exception as exc:  # a search outage is a failed call, not a failed shard
        out.tool_calls.append({"tool": "rag", "version": env.retriever.version, "args": json.dumps({"query": query}),
                               "cache_key": "", "text": "", "error": f"{type(exc).__name__}: {exc}",
                               "step": len(out.teacher_calls) - 1})
        return "The search failed."
    text = " ".join(f"[{i + 1}] {p.title}: {p.text}" for i, p in enumerate(passages)) or "No results."
    out.tool_calls.append({"tool": "rag", "version": env.retriever.version,
                           "args": json.dumps({"query": query, "k": env.settings.rag_k}), "cache_key": "",
                           "text": text, "error": None, "cached": cached, "step": len(out.teacher_calls) - 1})
    return text


def shard_gate(env: Environment, rows: int) -> tuple[asyncio.Semaphore, Callable[[Awaitable[T]], Awaitable[T]]]:
    """The row gate of a shard's loop, and a wrapper that counts a row's end. A batching
    teacher (``Teacher.batched``) gets every row at once and hears how many still run
    (``Teacher.rows_live``), so each turn leaves as one batch."""
    teacher, left = env.teacher, rows
    teacher.rows_live(left, env.request_cache)

    async def counted(row: Awaitable[T]) -> T:
        nonlocal left
        try:
            return await row
        finally:
            left -= 1
            teacher.rows_live(left, env.request_cache)

    return asyncio.Semaphore(max(rows, 1) if teacher.batched else env.settings.concurrency), counted


async def run_shard(samples: list[Mapping[str, Any]], env: Environment,
                    progress: Callable[[int, int], None] | None = None) -> list[Outcome]:
    """Every sample of a shard, ``concurrency`` at a time; results in input order."""
    gate, counted = shard_gate(env, len(samples))
    tool_gate = asyncio.Semaphore(env.settings.tool_concurrency)
    done = 0
    started = time.perf_counter()

    rejected: list[TeacherRejected] = []

    async def one(sample: Mapping[str, Any]) -> Outcome:
        nonlocal done
        async with gate:
            if rejected:  # a row that got the gate as a rejected one left it sends nothing
                raise rejected[0]
            try:
                result = await run_sample(sample, env, tool_gate)
            except TeacherRejected as exc:
                rejected.append(exc)
                raise
            except Exception as exc:  # an engine bug on one row must not take the shard down
                result = Outcome(sample["sample_id"], None, failure="internal_error",
                                 detail=f"{type(exc).__name__}: {exc}")
        done += 1
        if progress is not None:
            progress(done, len(samples))
        return result

    tasks = [asyncio.ensure_future(counted(one(s))) for s in samples]
    try:
        results = await asyncio.gather(*tasks)
    except TeacherRejected:
        for task in tasks:  # rows waiting for the gate never send a request
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    _ = time.perf_counter() - started
    return list(results)
