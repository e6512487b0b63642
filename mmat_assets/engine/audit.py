"""Audits of an export or a tuned model, computed from the stored tables alone.

An audit says what went into the data a model trained on (or an export holds): the data
version, the shards and their versions, the sources with their licences (non-commercial
flagged), the teachers and tools with their versions, tokens and cost, the reflection and
failure rates and the yield funnel. :func:`audit` returns it as an :class:`Audit`, the
typed document :mod:`~mmat_assets.engine.audit_render` draws as text, JSON or HTML.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypedDict, cast

import polars as pl

from mmat_assets.engine import stages
from mmat_assets.engine.tables import (LineageError, Tables, model_ids_file, parent, provenance,
                                       read_sample_ids, stamps)
from mmat_assets.toolkit.export import is_non_commercial
from mmat_assets.versions import frame_version

#: Told what the audit is doing, and about anything a reader should know (``note: …``).
Progress = Callable[[str], None]
#: What an audit is of.
Kind = Literal["model", "export"]


# ------------------------------------------------------------------------------ model


class TargetInfo(TypedDict):
    """What was audited."""

    kind: Kind
    name: str  #: ``tuned_model`` or ``exports/<exporter>``
    path: str  #: the checkpoint folder, or the export folder


class ExportInfo(TypedDict):
    """The export the target is (or the model trained on)."""

    name: str  #: the exporter
    asset: str  #: ``exports/<exporter>``
    data_version: str | None  #: for a model: the version it trained on
    rows: dict[str, int]  #: records per format
    rejected: int  #: records pre-flight kept out
    path: str


class ModelInfo(TypedDict):
    """The tuned model, as its lineage record names it."""

    checkpoint: str | None
    trainer: str | None
    student: str | None
    steps: int | None
    training_config: dict[str, Any]
    code_version: str | None
    export_data_version: str | None


class ShardInfo(TypedDict):
    """One shard's share of the audited samples."""

    shard: str  #: zero-padded as in the table names
    rows: int
    data_versions: dict[str, str]  #: asset -> data version (recorded inputs, current RR/ORR)


class SourceInfo(TypedDict):
    """Samples per source and licence."""

    source: str
    dataset: str
    subsets: list[str]
    license: str
    rows: int
    non_commercial: bool


class TeacherInfo(TypedDict):
    """Calls to one teacher model."""

    teacher: str
    model: str
    prompt_versions: list[str]
    calls: int
    cached_calls: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float


class ToolInfo(TypedDict):
    """Calls to one tool."""

    tool: str
    versions: list[str]
    calls: int
    errors: int


class Totals(TypedDict):
    """Sums over the audit."""

    rows: int  #: records (a sample in two formats counts twice)
    samples: int
    prompt_tokens: int
    completion_tokens: int
    tokens: int
    cost_usd: float
    teacher_calls: int
    tool_calls: int


class Rates(TypedDict):
    """Fractions 0..1."""

    reflection_rate: float  #: of the audited samples, those reflected
    failure_rate: float  #: of the reflection rows, those failed


class Audit(TypedDict):
    """An audit; every key is present, lists and mappings may be empty. A number that is
    None is unknown (the cost of an unpriced model, say)."""

    target: TargetInfo
    export: ExportInfo
    model: ModelInfo | None  #: None when the target is an export
    shards: list[ShardInfo]
    sources: list[SourceInfo]
    teachers: list[TeacherInfo]
    tools: list[ToolInfo]
    totals: Totals
    rates: Rates
    funnel: dict[str, int]  #: stage -> rows, in pipeline order; the first is what was read
    failures: dict[str, int]  #: ``stage:reason`` -> samples
    steps_per_sample: dict[str, int]  #: steps (as a string: "2", "3", ...) -> samples
    tool_calls_per_tool: dict[str, int]  #: tool -> calls
    missing_rows: int  #: exported samples no longer in the stage tables


# ------------------------------------------------------------------------------ audit


def resolve_target(tables: Tables, target: str) -> tuple[Kind, dict[str, Any], dict[str, Any] | None]:
    """``(kind, export manifest, model record or None)`` of ``tuned_model``, a checkpoint
    folder, ``exports/<name>`` or ``<name>``."""
    exports = tables.exports()
    model = tables.model()
    t = target.strip().rstrip("/")
    model_dirs = {Path(model[k]).resolve() for k in ("checkpoint", "model_dir") if model and model.get(k)}
    if t in ("tuned_model", "model") or Path(t).resolve() in model_dirs or (Path(t) / "mmat_lineage.json").is_file():
        if (Path(t) / "mmat_lineage.json").is_file():
            model = json.loads((Path(t) / "mmat_lineage.json").read_text(encoding="utf-8"))
        if not model:
            raise LineageError("no tuned model has been built (materialize tuned_model first)")
        name = str(model.get("export", "")).split("/")[-1]
        manifest = exports.get(name)
        if manifest is None:
            raise LineageError(f"the model was trained on {model.get('export')!r}, which is not in {tables.tables}")
        return "model", manifest, model
    name = t.split("/")[-1]
    if name in exports:
        return "export", exports[name], None
    known = [f"exports/{n}" for n in exports] + (["tuned_model"] if model else [])
    raise LineageError(f"no model or export {target!r}; known: {', '.join(known) or 'none (build one first)'}")


def audit(tables: Tables, target: str, progress: Progress | None = None) -> Audit:
    """The audit of a tuned model or an export, as :mod:`~mmat_assets.engine.audit_render` draws it."""
    say = progress or (lambda _msg: None)
    kind, manifest, model = resolve_target(tables, target)
    ids_path = model_ids_file(model) if model else manifest.get("sample_ids")
    if model and not (ids_path and Path(ids_path).is_file()):  # a model from before models kept their ids
        ids_path = manifest.get("sample_ids")
    ids = read_sample_ids(ids_path)
    if not ids:
        raise LineageError(f"no sample ids for {target!r} (looked in {ids_path}); rebuild the export")
    export_version = manifest.get("data_version")
    if model:  # what the model saw: its format of the export, at the version it trained on
        ids = {sid: {model["data"]} for sid, formats in ids.items() if model.get("data") in formats}
        if model.get("export_data_version") != export_version:
            say(f"note: the export was rebuilt since the model trained (model: {model.get('export_data_version')}, "
                f"export now: {export_version}); using the ids the model kept")
        export_version = model.get("export_data_version")
    say("reading stage tables")
    by_stage = {"foundation_samples": tables.all("foundation_samples", ["sample_id"]),
                "reflections": tables.all("reflections", ["sample_id", "status", "failure", "failure_stage"]),
                "rr_samples": tables.all("rr_samples"), "orr_samples": tables.all("orr_samples")}
    say("computing the audit")
    wanted = pl.Series("sample_id", sorted(ids))
    samples = _one_per_sample(by_stage, wanted)
    if not samples.height:
        raise LineageError(f"none of the {len(ids)} samples of {target!r} are in the RR/ORR tables under "
                           f"{tables.tables} (rebuilt or removed since?)")
    name = str(manifest.get("exporter", ""))
    teachers, tools, totals = _calls(samples)
    totals["rows"] = sum(len(f) for f in ids.values())
    return {
        "target": {"kind": kind, "name": "tuned_model" if model else f"exports/{name}",
                   "path": model["checkpoint"] if model else parent(manifest.get("sample_ids")) or ""},
        "export": {"name": name, "asset": f"exports/{name}", "data_version": export_version,
                   "rows": manifest.get("rows", {}), "rejected": manifest.get("rejected", 0),
                   "path": parent(manifest.get("sample_ids")) or ""},
        "model": _model_section(model) if model else None,
        "shards": _shards(tables, samples, ids),
        "sources": _sources(samples),
        "teachers": teachers,
        "tools": tools,
        "totals": totals,
        "rates": _rates(samples, by_stage["reflections"]),
        "funnel": _funnel(by_stage, ids, model.get("data") if model else None),
        "failures": stages.failures(by_stage["reflections"]) if by_stage["reflections"].height else {},
        "steps_per_sample": {str(k): v for k, v in sorted(Counter(samples["steps"].fill_null(0).to_list()).items())},
        "tool_calls_per_tool": _tool_calls_per_tool(samples),
        "missing_rows": len(ids) - samples.height,
    }


def _one_per_sample(by_stage: Mapping[str, pl.DataFrame], wanted: pl.Series) -> pl.DataFrame:
    """One row per exported sample (its RR row, else its ORR row): the stats count samples."""
    frames = [by_stage[a] for a in ("rr_samples", "orr_samples") if by_stage[a].height]
    if not frames:
        return pl.DataFrame(schema={"sample_id": pl.String})
    rows = pl.concat(frames, how="vertical_relaxed").filter(pl.col("sample_id").is_in(wanted.implode()))
    return rows.unique("sample_id", keep="first", maintain_order=True)


def _model_section(model: Mapping[str, Any]) -> ModelInfo:
    return {"checkpoint": model.get("checkpoint"), "trainer": model.get("trainer"), "student": model.get("student"),
            "steps": model.get("steps"), "training_config": model.get("training_config", {}),
            "code_version": model.get("code_version"), "export_data_version": model.get("export_data_version")}


def _shards(tables: Tables, samples: pl.DataFrame, ids: Mapping[str, set[str]]) -> list[ShardInfo]:
    out: list[ShardInfo] = []
    if not samples.height:
        return out
    per_shard = Counter(str(s) for s in samples["shard"].to_list())
    width = max((len(s) for s in tables.shards("rr_samples")), default=1)
    for shard_int in sorted({int(s) for s in per_shard}):
        shard = f"{shard_int:0{width}d}"
        versions: dict[str, str] = {}
        for row in samples.filter(pl.col("shard") == shard_int).head(1).iter_rows(named=True):
            for entry in stamps(row):
                versions.update(entry.get("inputs", {}))
        for asset in ("rr_samples", "orr_samples"):
            if shard in tables.shards(asset):
                versions[asset] = frame_version(tables.shard(asset, shard))
        out.append({"shard": shard, "rows": per_shard[str(shard_int)], "data_versions": versions})
    return out


def _sources(samples: pl.DataFrame) -> list[SourceInfo]:
    if not samples.height:
        return []
    out: list[SourceInfo] = []
    grouped = samples.group_by("source", "dataset", "license").agg(pl.len().alias("rows"),
                                                                    pl.col("subset").unique().sort().alias("subsets"))
    for r in grouped.sort("source", "license").iter_rows(named=True):
        out.append({"source": r["source"], "dataset": r["dataset"], "subsets": r["subsets"], "license": r["license"],
                    "rows": r["rows"], "non_commercial": is_non_commercial(r["license"] or "")})
    return out


def _calls(samples: pl.DataFrame) -> tuple[list[TeacherInfo], list[ToolInfo], Totals]:
    """Teacher and tool calls of the samples, summed per teacher/model and per tool."""
    teachers: dict[tuple[str, str], dict[str, Any]] = {}
    tools: dict[str, dict[str, Any]] = {}
    for row in samples.iter_rows(named=True):
        for c in provenance(row).get("teacher_calls", []):
            t = teachers.setdefault((str(c.get("teacher", "")), str(c.get("model", ""))), {
                "teacher": str(c.get("teacher", "")), "model": str(c.get("model", "")), "prompt_versions": set(),
                "calls": 0, "cached_calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0})
            t["prompt_versions"].add(str(c.get("prompt_version", "")))
            t["calls"] += 1
            t["cached_calls"] += bool(c.get("cached"))
            t["prompt_tokens"] += int(c.get("prompt_tokens") or 0)
            t["completion_tokens"] += int(c.get("completion_tokens") or 0)
            t["cost_usd"] += float(c.get("cost_usd") or 0.0)
        for c in row.get("tool_calls") or []:
            t = tools.setdefault(c["tool"], {"tool": c["tool"], "versions": set(), "calls": 0, "errors": 0})
            t["versions"].add(str(c["version"]))
            t["calls"] += 1
            t["errors"] += bool(c.get("error"))
    teacher_rows = [cast(TeacherInfo, {**t, "prompt_versions": sorted(t["prompt_versions"]),
                                        "cost_usd": round(t["cost_usd"], 6)}) for _, t in sorted(teachers.items())]
    tool_rows = [cast(ToolInfo, {**t, "versions": sorted(t["versions"])}) for _, t in sorted(tools.items())]
    pt = sum(t["prompt_tokens"] for t in teacher_rows)
    ct = sum(t["completion_tokens"] for t in teacher_rows)
    totals: Totals = {"rows": 0, "samples": samples.height, "prompt_tokens": pt, "completion_tokens": ct,
                      "tokens": pt + ct, "cost_usd": round(sum(t["cost_usd"] for t in teacher_rows), 6),
                      "teacher_calls": sum(t["calls"] for t in teacher_rows),
                      "tool_calls": sum(t["calls"] for t in tool_rows)}
    return teacher_rows, tool_rows, totals


def _rates(samples: pl.DataFrame, reflections: pl.DataFrame) -> Rates:
    reflected = int(samples["reflected"].fill_null(False).sum()) if samples.height else 0
    failed = reflections.filter(pl.col("status") == "failed").height if reflections.height else 0
    return {"reflection_rate": round(reflected / samples.height, 4) if samples.height else 0.0,
            "failure_rate": round(failed / reflections.height, 4) if reflections.height else 0.0}


def _funnel(by_stage: Mapping[str, pl.DataFrame], ids: Mapping[str, set[str]],
            trained: str | None) -> dict[str, int]:
    """Rows at each stage, then what the export holds (or, for a model, what it trained on)."""
    f = by_stage["foundation_samples"]
    counts = stages.funnel(f, by_stage["reflections"], by_stage["rr_samples"], by_stage["orr_samples"]) \
        if by_stage["reflections"].height else {"in": f.height}
    for fmt in (trained,) if trained else ("rr", "orr"):
        counts[f"trained on ({fmt})" if trained else f"exported {fmt}"] = \
            sum(1 for formats in ids.values() if fmt in formats)
    return counts


def _tool_calls_per_tool(samples: pl.DataFrame) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for calls in samples["tool_calls"].drop_nulls() if samples.height else []:
        counts.update(c["tool"] for c in calls)
    return dict(counts.most_common())


__all__ = [
    "Audit",
    "ExportInfo",
    "ModelInfo",
    "Rates",
    "ShardInfo",
    "SourceInfo",
    "TargetInfo",
    "TeacherInfo",
    "ToolInfo",
    "Totals",
    "audit",
    "resolve_target",
]
