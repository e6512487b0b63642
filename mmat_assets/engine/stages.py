"""Shard-level glue of the rationale, reflection and integration stages (no Dagster).

Each function takes one shard's table and returns the next stage's table in the record
schema; failed rows stay in the stage tables with ``status = failed`` and their reason, and
only ``ok`` rows move on to the RR/ORR outputs.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import asdict
from typing import Any, TypeVar

import polars as pl

from mmat_assets import protocol, records
from mmat_assets.contracts import Judge, TeacherError, Tool
from mmat_assets.engine import reflection as refl
from mmat_assets.engine.budget import row_status
from mmat_assets.engine.rationale import Environment, Outcome, ask, run_shard, shard_gate
from mmat_assets.engine.tools import tool_prompt

#: The RR system prompt (SPEC §2.3); ``{tools}`` lists the tools of the build, one per line.
RR_TEMPLATE = """\
You are a multimodal reasoner that solves a question about an image step by step. In each
turn write one short thought in <THOUGHT>...</THOUGHT>. To run vision tools on the image,
name them in <OPERATOR>...</OPERATOR> (comma-separated; a tool that takes object names is
written tool[cat|dog]); to search the web, write a query in <RAG>...</RAG>. End every turn
with <SIGNAL>continue</SIGNAL>, <SIGNAL>reflection</SIGNAL> to re-examine your reasoning, or
<SIGNAL>end</SIGNAL> once the reasoning reaches the answer. Tool and search results come
back in the next user turn. Tools:
{tools}"""

#: The ORR system prompt (SPEC §2.5); ``{tools}`` as in :data:`RR_TEMPLATE`.
ORR_TEMPLATE = """\
You are a multimodal reasoner. The question comes with the outputs of vision tools run on
the image, each between <|begin_api_invoke|>tool<|end_api_invoke|> and
<|begin_result_of_api|>...<|end_result_of_api|>. Reason in one <THOUGHT>...</THOUGHT>,
then answer as <ANSWER>The answer is: ...</ANSWER>. Tools:
{tools}"""


def rr_system(tools: Mapping[str, Tool[Any]]) -> str:
    """The RR system prompt listing ``tools`` (the ones a build offers), each with its name
    and its own description."""
    return RR_TEMPLATE.format(tools=tool_prompt(tools) or "(none)")


def orr_system(tools: Mapping[str, Tool[Any]]) -> str:
    """The ORR system prompt listing ``tools`` as :func:`rr_system` does."""
    return ORR_TEMPLATE.format(tools=tool_prompt(tools) or "(none)")


def system_prompt(df: pl.DataFrame) -> str:
    """The system prompt stored with the first dialogue of ``df`` ("" when none)."""
    first = df.head(1)["turns"].to_list() if "turns" in df.columns else []
    turns = first[0] if first else None
    return str(turns[0]["content"]) if turns and turns[0]["role"] == "system" else ""


def concat_shards(parts: Mapping[str, pl.DataFrame] | pl.DataFrame) -> pl.DataFrame:
    """One table from a ``{shard: frame}`` mapping (how Dagster hands over all partitions)."""
    if isinstance(parts, pl.DataFrame):
        return parts
    frames = [parts[k] for k in sorted(parts)]
    return pl.concat(frames, how="vertical_relaxed") if frames else pl.DataFrame()


def with_prompts(df: pl.DataFrame) -> list[dict[str, Any]]:
    rows = df.to_dicts()
    for r in rows:
        r["prompt"] = protocol.question_prompt(r["question"], r["choices"], r["style"])
    return rows


def trajectory_json(t: protocol.Trajectory | None) -> str | None:
    return json.dumps(asdict(t), ensure_ascii=False) if t is not None else None


def trajectory_from_json(text: str) -> protocol.Trajectory:
    d = json.loads(text)
    steps = [protocol.Step(s["thought"], [protocol.OperatorCall(**o) for o in s["operators"]], s["rag"], s["signal"],
                           [protocol.Result(**r) for r in s["results"]]) for s in d["steps"]]
    return protocol.Trajectory(d["prompt"], steps, d["answer"], d.get("system", ""))


def _tool_call_rows(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keep = ("tool", "version", "args", "cache_key", "text", "error")
    return [{k: (None if c.get(k) is None else str(c.get(k))) for k in keep} for c in calls]


def _provenance(old: str | None, **extra: Any) -> str:
    base = json.loads(old) if old else {}
    for key, value in extra.items():
        if isinstance(value, list) and isinstance(base.get(key), list):
            base[key] = base[key] + value
        else:
            base[key] = value
    return json.dumps(base, ensure_ascii=False, sort_keys=True)


def stamp_lineage(df: pl.DataFrame, asset: str, partition: str, code_version: str | None,
                  inputs: Mapping[str, str]) -> pl.DataFrame:
    """Append to every row's ``lineage`` the asset partition that wrote it, its code version
    and the data versions of the tables it read, so a row carries its own lineage
    (``mmat lineage``) and no event log is needed to trace it. The column is not part of
    any data version: where a row came from is not what it holds."""
    if df.is_empty():
        return df
    entry = {"asset": asset, "partition": partition, "code_version": code_version, "inputs": dict(inputs)}
    old = df["lineage"] if "lineage" in df.columns else pl.Series([None] * df.height, dtype=pl.String)
    stamped = [json.dumps([*(json.loads(x) if x else []), entry], sort_keys=True) for x in old]
    return df.with_columns(lineage=pl.Series(stamped, dtype=pl.String))


T = TypeVar("T")


def quiet_interrupts(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The event loop's error handler, but silent about an interrupt (Ctrl-C, SIGTERM) that
    landed inside the loop's own I/O: the build reports that stop in one line, and a
    traceback logged beside it would say something broke."""
    exc = context.get("exception")
    if isinstance(exc, BaseException) and not isinstance(exc, Exception):
        return
    loop.default_exception_handler(context)


def run_loop(coro: Coroutine[Any, Any, T]) -> T:
    """:func:`asyncio.run` with :func:`quiet_interrupts` as the loop's error handler."""
    async def main() -> T:
        asyncio.get_running_loop().set_exception_handler(quiet_interrupts)
        return await coro

    return asyncio.run(main())


# ------------------------------------------------------------------------ rationale


def run_rationales(df: pl.DataFrame, env: Environment,
                   progress: Callable[[int, int], None] | None = None) -> pl.DataFrame:
    """The teacher loop over one shard; every input row comes out, ok or failed."""
    rows = with_prompts(df)
    outcomes = run_loop(run_shard(list[Mapping[str, Any]](rows), env, progress))
    return records.conform(pl.DataFrame([_rationale_row(r, o) for r, o in zip(rows, outcomes, strict=True)],
                                        schema=records.SAMPLE_SCHEMA, strict=False))


def _rationale_row(row: dict[str, Any], o: Outcome) -> dict[str, Any]:
    tool_errors = sum(1 for c in o.tool_calls if c.get("error"))
    out = {k: row[k] for k in records.FOUNDATION_COLUMNS}
    out["lineage"] = row.get("lineage")
    out.update(
        status=row_status(o.failure),
        failure=o.failure, failure_stage="rationale" if o.failure else None, failure_detail=o.detail or None,
        trajectory=trajectory_json(o.trajectory), steps=len(o.trajectory.steps) if o.trajectory else 0,
        grounding=o.grounding, used_rag=o.used_rag, tool_calls=_tool_call_rows(o.tool_calls),
        provenance=_provenance(row.get("provenance"), teacher_calls=o.teacher_calls, tool_errors=tool_errors),
    )
    return out


# ----------------------------------------------------------------------- reflection


def run_reflections(df: pl.DataFrame, env: Environment) -> pl.DataFrame:
    """Deterministic checks then judges on every ok rationale; failed rows pass through."""
    rows = with_prompts(df)
    return records.conform(pl.DataFrame(run_loop(_reflect_all(rows, env)), schema=records.SAMPLE_SCHEMA,
                                        strict=False))


async def _reflect_all(rows: list[dict[str, Any]], env: Environment) -> list[dict[str, Any]]:
    gate, counted = shard_gate(env, len(rows))

    async def one(row: dict[str, Any]) -> dict[str, Any]:
        row = {k: row[k] for k in records.SAMPLE_SCHEMA}
        if row["status"] != "ok" or not row["trajectory"]:
            return row
        async with gate:
            return await _reflect_row(row, env)

    return list(await asyncio.gather(*(counted(one(r)) for r in rows)))


async def _reflect_row(row: dict[str, Any], env: Environment) -> dict[str, Any]:
    calls: list[dict[str, Any]] = []
    prov = json.loads(row["provenance"] or "{}")
    try:
        verdict = await refl.reflect(row, trajectory_from_json(row["trajectory"]), int(prov.get("tool_errors", 0)),
                                     env, calls)
    except Exception as exc:  # an engine bug on one row must not take the shard down
        verdict = refl.Verdict(None, failure="internal_error", detail=f"{type(exc).__name__}: {exc}")
    row.update(checks=verdict.checks, reflected=verdict.reflected,
               provenance=_provenance(row["provenance"], teacher_calls=calls,
                                      findings=[asdict(f) for f in verdict.findings]))
    if verdict.trajectory is not None:
        row.update(trajectory=trajectory_json(verdict.trajectory), steps=len(verdict.trajectory.steps))
    if verdict.failure:
        row.update(status=row_status(verdict.failure), failure=verdict.failure, failure_stage="reflection",
                   failure_detail=verdict.detail[:2000])
    return row


# ---------------------------------------------------------------------- integration


def _passed(df: pl.DataFrame) -> pl.DataFrame:
    return df.filter(pl.col("status") == "ok")


def rr_samples(df: pl.DataFrame, system: str | None = None) -> pl.DataFrame:
    """RR dialogues (SPEC §2.3) of the rows that passed, system prompt stored with each
    (``system``: :func:`rr_system` of the build's tools; None: the prompt with no tools)."""
    system = rr_system({}) if system is None else system
    ok = _passed(df)
    turns = [protocol.render_rr(_with_system(t, system)) for t in ok["trajectory"]]
    return records.conform(ok.with_columns(format=pl.lit("rr"), turns=pl.Series(turns, dtype=records.SAMPLE_SCHEMA["turns"])))


def orr_samples(df: pl.DataFrame, system: str | None = None) -> pl.DataFrame:
    """ORR one-turn samples (SPEC §2.5); RAG text left out, ``used_rag`` kept for filtering
    (``system`` as in :func:`rr_samples`, from :func:`orr_system`)."""
    system = orr_system({}) if system is None else system
    ok = _passed(df)
    turns = [protocol.render_orr(protocol.to_one_turn(trajectory_from_json(t), system)) for t in ok["trajectory"]]
    return records.conform(ok.with_columns(format=pl.lit("orr"), turns=pl.Series(turns, dtype=records.SAMPLE_SCHEMA["turns"])))


def _with_system(text: str, system: str) -> protocol.Trajectory:
    t = trajectory_from_json(text)
    t.system = system
    return t


# ---------------------------------------------------------------------------- stats


def teacher_totals(df: pl.DataFrame) -> dict[str, float]:
    tokens_in = tokens_out = calls = cached = 0
    cost = 0.0
    for prov in df["provenance"].drop_nulls():
        for c in json.loads(prov).get("teacher_calls", []):
            calls += 1
            cached += bool(c.get("cached"))
            tokens_in += int(c.get("prompt_tokens") or 0)
            tokens_out += int(c.get("completion_tokens") or 0)
            cost += float(c.get("cost_usd") or 0.0)
    return {"teacher_calls": calls, "teacher_calls_cached": cached, "prompt_tokens": tokens_in,
            "completion_tokens": tokens_out, "cost_usd": round(cost, 6)}


def tool_counts(df: pl.DataFrame) -> dict[str, int]:
    """Tool calls per tool over the ok rows (the paper's Table 1 counts)."""
    counts: Counter[str] = Counter()
    for calls in _passed(df)["tool_calls"].drop_nulls():
        counts.update({c["tool"] for c in calls})  # per sample: did it call the tool
    return dict(counts)


def failures(df: pl.DataFrame) -> dict[str, int]:
    f = df.filter(pl.col("status") == "failed")
    return {f"{s}:{r}": n for s, r, n in f.group_by("failure_stage", "failure").len().sort("len", descending=True).iter_rows()}


def check_counts(df: pl.DataFrame) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for checks in df["checks"].drop_nulls():
        counts.update(checks)
    return dict(counts)


def steps_histogram(df: pl.DataFrame) -> dict[int, int]:
    ok = _passed(df)
    return {int(k): int(v) for k, v in ok.group_by("steps").len().sort("steps").iter_rows()}


def summarise(rows: Mapping[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in rows.items()) or "none"


def funnel(foundation: pl.DataFrame, reflected: pl.DataFrame, rr: pl.DataFrame, orr: pl.DataFrame) -> dict[str, int]:
    """Rows at each stage: in -> rationale ok -> passed reflection -> RR / ORR."""
    rationale_ok = reflected.filter((pl.col("status") == "ok") | (pl.col("failure_stage") == "reflection")).height \
        if reflected.height else 0
    return {"in": foundation.height, "rationale": rationale_ok,
            "reflection": reflected.filter(pl.col("status") == "ok").height if reflected.height else 0,
            "rr": rr.height, "orr": orr.height}


# -------------------------------------------------------------------------- quality


def score_quality(df: pl.DataFrame, judge: Judge[Any], env: Environment, system: str | None = None) -> pl.DataFrame:
    """SPEC §2.6: a judge scores every passed dialogue 0-1 with reasons (stored, not filtered:
    the export's ``min_quality`` filters). The judge sees the RR dialogue (``turns``, with
    ``system`` as in :func:`rr_samples`). A judge's teacher requests go through the request
    cache; a judge failure leaves the score empty and says why."""
    system = rr_system({}) if system is None else system
    return records.conform(pl.DataFrame(run_loop(_score_all(df.to_dicts(), judge, env, system)),
                                        schema=records.SAMPLE_SCHEMA, strict=False))


async def _score_all(rows: list[dict[str, Any]], judge: Judge[Any], env: Environment,
                     system: str) -> list[dict[str, Any]]:
    gate, counted = shard_gate(env, len(rows))

    async def one(row: dict[str, Any]) -> dict[str, Any]:
        if row["status"] != "ok" or not row["trajectory"]:
            return row
        turns = protocol.render_rr(_with_system(row["trajectory"], system))
        async with gate:
            try:
                row["quality"], row["quality_reasons"], record = await _judged(judge, env, {**row, "turns": turns})
                if record is not None:
                    row["provenance"] = _provenance(row["provenance"], teacher_calls=[record])
            except TeacherError as exc:
                row["quality"], row["quality_reasons"] = None, f"judge failed: {exc}"
            except Exception as exc:  # a judge bug on one row leaves that row unscored, named
                row["quality"], row["quality_reasons"] = None, f"judge failed: {type(exc).__name__}: {exc}"
        return row

    return list(await asyncio.gather(*(counted(one(r)) for r in rows)))


async def _judged(judge: Judge[Any], env: Environment,
                  sample: dict[str, Any]) -> tuple[float, str, dict[str, Any] | None]:
    """Score and reasons of one sample, and the record of the teacher call behind them."""
    request = judge.request(sample)
    if request is None:  # a judge that scores by itself
        score, reasons = await asyncio.to_thread(judge.score, sample)
        return float(score), str(reasons), None
    reply, record = await ask(env, request)
    score, reasons = judge.parse(reply)
    return float(score), str(reasons), record
