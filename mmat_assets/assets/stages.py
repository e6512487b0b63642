"""Rationale → Reflection → Integration: shard-partitioned assets, one group per stage.

``rationales`` (group ``rationale``) runs the teacher loop with tools and retrieval;
``reflections`` (group ``reflection``) checks and repairs the dialogues; ``rr_samples`` and
``orr_samples`` (group ``integration``) render what passed, and ``dialogue_files`` writes
them as JSONL with the yield funnel. Failed rows stay in the stage tables with their
reason and stage; only ``ok`` rows reach RR/ORR.
No `from __future__ import annotations` here: Dagster reads the context annotations.
"""

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import dagster as dg
import polars as pl

from mmat_assets import protocol
from mmat_assets.assets._shared import TeacherResource, cache_metadata, shard_environment, shard_output, stage_deps
from mmat_assets.assets.foundation import shards_backfill_policy, shards_partitions
from mmat_assets.config import ProjectConfig
from mmat_assets.contracts import Tool
from mmat_assets.deploy import TEACHER_POOL
from mmat_assets.engine import charts, reflection, stages
from mmat_assets.engine.budget import spend_metadata
from mmat_assets.engine.leases import atomic_writer
from mmat_assets.engine.preview import counts_markdown
from mmat_assets.engine.tools import available_tools, tool_prompt
from mmat_assets.plugins import Registry
from mmat_assets.resources import StorageResource
from mmat_assets.versions import doc_version, frame_version

#: Bump a number when that stage's own logic changes the rows it writes.
OWN_VERSIONS = {"rationales": "1", "reflections": "1", "rr_samples": "1", "orr_samples": "1", "dialogue_files": "1"}


@dataclass(frozen=True)
class Prompts:
    """The prompts that list the tools a build offers: the teacher's tool list and the RR
    and ORR system prompts stored with every dialogue."""

    tools: str
    rr: str
    orr: str

    @classmethod
    def of(cls, tools: Mapping[str, Tool[Any]]) -> "Prompts":
        return cls(tool_prompt(tools), stages.rr_system(tools), stages.orr_system(tools))


def _stage_teacher(cfg: ProjectConfig, registry: Registry) -> Any:
    """The stage's teacher built from the config (None when it cannot be created here)."""
    name = cfg.stages.teacher
    entry = cfg.teachers.get(name)
    plugin = entry.plugin if entry and entry.plugin else name
    try:
        return registry.create("teacher", plugin, entry.options if entry else None, base_dir=cfg.base_dir)
    except Exception:  # an unknown or misconfigured teacher fails the stage itself, by name
        return None


def offered_tools(cfg: ProjectConfig, registry: Registry) -> dict[str, Tool[Any]]:
    """The tools this build offers the teacher: enabled, created and available here, with
    the stage's teacher attached, as the shard environment builds them."""
    teacher = _stage_teacher(cfg, registry)
    return available_tools(registry, cfg, {cfg.stages.teacher: teacher} if teacher is not None else {})


def code_versions(cfg: ProjectConfig, registry: Registry, prompts: Prompts | None = None) -> dict[str, str]:
    """Each stage asset's own code version: its logic, and for the teacher-driven stages the
    prompt (or judge prompt) version and the teacher implementation's version; for the
    rationales and the RR/ORR samples a hash of the prompt that lists the build's tools, so
    adding, removing or changing a tool shows them stale. Upstream versions are chained on
    by the definitions (mmat_assets.versions)."""
    prompts = prompts or Prompts.of(offered_tools(cfg, registry))
    entry = cfg.teachers.get(cfg.stages.teacher)
    plugin = entry.plugin if entry and entry.plugin else cfg.stages.teacher
    teacher = f"{plugin}-{registry.version('teacher', plugin)}"  # unregistered: reported when it runs
    out = dict(OWN_VERSIONS)
    out["rationales"] += f"+{protocol.PROMPT_VERSION}+{teacher}+tools-{_short_hash(prompts.tools)}"
    out["reflections"] += f"+{reflection.JUDGE_VERSION}+{teacher}"
    if cfg.stages.judge:  # the quality judge scores in the reflection stage
        out["reflections"] += f"+{cfg.stages.judge}-{registry.version('judge', cfg.stages.judge)}"
    out["rr_samples"] += f"+system-{_short_hash(prompts.rr)}"
    out["orr_samples"] += f"+system-{_short_hash(prompts.orr)}"
    return out


def _short_hash(text: str) -> str:
    return doc_version(text)[:8]


def _md_counts(counts: dict[Any, int], key: str, title: str) -> dg.MetadataValue:
    lines = [f"**{title}**", "", f"| {key} | rows |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in counts.items()] or ["| (none) | 0 |"]
    return dg.MetadataValue.md("\n".join(lines))


def _dialogue_preview(df: pl.DataFrame, n: int) -> str:
    parts = []
    for row in df.head(n).iter_rows(named=True):
        turns = row["turns"] or []
        body = "\n\n".join(f"**{t['role']}**: {t['content'][:700]}" for t in turns if t["role"] != "system")
        parts.append(f"#### `{row['sample_id']}` ({row['source']}, {row['license']})\n\n{body}")
    return "\n\n---\n\n".join(parts) or "(no samples)"


def _stamped(context: dg.AssetExecutionContext, shard: str, df: pl.DataFrame,
             inputs: dict[str, pl.DataFrame]) -> pl.DataFrame:
    """``df`` with this asset partition's lineage entry on every row (see stages.stamp_lineage)."""
    key = context.asset_key
    return stages.stamp_lineage(df, key.to_user_string(), shard, context.assets_def.code_versions_by_key.get(key),
                                {name: frame_version(frame) for name, frame in inputs.items()})


def rationale_assets(cfg: ProjectConfig, registry: Registry, versions: Mapping[str, str]) -> list[dg.AssetsDefinition]:
    parts = shards_partitions(cfg)

    @dg.asset(partitions_def=parts, backfill_policy=shards_backfill_policy(cfg),
              group_name="rationale", code_version=versions["rationales"], pool=TEACHER_POOL,
              deps=stage_deps(cfg, registry), kinds={"polars"})
    def rationales(context: dg.AssetExecutionContext, foundation_samples: dict[str, pl.DataFrame],
                   storage: StorageResource, teacher: TeacherResource) -> dg.Output[Any]:
        """Multi-turn teacher rationales (SPEC §2.2) with real tool calls, one row per sample.

        The teacher sees image, question and gold answer and writes JSON steps; the engine
        runs the named tools (through the shard's result cache) and the retriever, feeds the
        results back, until final_answer or the step limit. Every teacher request is cached
        by its full hash as it is answered, so a killed run resumes without repeating one.
        """
        def progress(done: int, total: int) -> None:
            if done == total or done % max(1, total // 10) == 0:
                context.log.info(f"rationales: {done}/{total} samples")

        def one(shard: str) -> tuple[pl.DataFrame, dict[str, Any]]:
            samples = foundation_samples[shard]
            with shard_environment(cfg, registry, storage, teacher, shard) as env:
                df = _stamped(context, shard, stages.run_rationales(samples, env, progress),
                              {"foundation_samples": samples})
                return df, {"dagster/row_count": df.height, "ok": df.filter(pl.col("status") == "ok").height,
                            "tools_offered": ", ".join(sorted(env.tools)) or "none",
                            "failures": _md_counts(stages.failures(df), "stage:reason", "Failures"),
                            "tool_calls_per_tool": _md_counts(stages.tool_counts(df), "tool",
                                                              "Samples calling each tool"),
                            **stages.teacher_totals(df), **cache_metadata(env),
                            **spend_metadata(df, env.budget)}

        return shard_output(context, one)

    return [rationales]


def reflection_assets(cfg: ProjectConfig, registry: Registry, versions: Mapping[str, str],
                      prompts: Prompts) -> list[dg.AssetsDefinition]:
    parts = shards_partitions(cfg)

    @dg.asset(partitions_def=parts, backfill_policy=shards_backfill_policy(cfg),
              group_name="reflection", code_version=versions["reflections"], pool=TEACHER_POOL,
              kinds={"polars"})
    def reflections(context: dg.AssetExecutionContext, rationales: dict[str, pl.DataFrame],
                    storage: StorageResource, teacher: TeacherResource) -> dg.Output[Any]:
        """Reflection (SPEC §2.4): deterministic checks (arithmetic, conclusion vs gold,
        unsupported claims), then the teacher's math-gap and cheating judges where needed;
        fixes inserted as a reflection turn; which check fired is recorded on the row."""
        def one(shard: str) -> tuple[pl.DataFrame, dict[str, Any]]:
            with shard_environment(cfg, registry, storage, teacher, shard) as env:
                df = stages.run_reflections(rationales[shard], env)
                judge = _judge(cfg, registry, env)
                if judge is not None:
                    df = stages.score_quality(df, judge, env, prompts.rr)
                df = _stamped(context, shard, df, {"rationales": rationales[shard]})
                return df, {"dagster/row_count": df.height, "passed": df.filter(pl.col("status") == "ok").height,
                            "reflected": df.filter(pl.col("reflected").fill_null(False)).height,
                            "quality_mean": float(df.select(pl.col("quality").mean()).item() or 0.0) if judge is not None else 0.0,
                            "checks_fired": _md_counts(stages.check_counts(df), "check", "Reflection checks fired"),
                            "failures": _md_counts(stages.failures(df), "stage:reason", "Failures"),
                            **stages.teacher_totals(df), **cache_metadata(env),
                            **spend_metadata(df, env.budget)}

        return shard_output(context, one)

    return [reflections]


def _judge(cfg: ProjectConfig, registry: Registry, env: Any) -> Any:
    """The configured quality judge, with the shard's teacher to ask; None when not configured."""
    if not cfg.stages.judge:
        return None
    judge = registry.create("judge", cfg.stages.judge, base_dir=cfg.base_dir)
    judge.attach_teachers({env.teacher_name: env.teacher})
    avail = judge.availability()
    if not avail.ok:
        raise RuntimeError(f"judge {cfg.stages.judge!r} is not usable: {avail.reason}")
    return judge


def integration_assets(cfg: ProjectConfig, versions: Mapping[str, str], prompts: Prompts) -> list[dg.AssetsDefinition]:
    parts = shards_partitions(cfg)
    n_preview = cfg.stages.preview_rows

    @dg.asset(partitions_def=parts, backfill_policy=shards_backfill_policy(cfg),
              group_name="integration", code_version=versions["rr_samples"],
              kinds={"polars"})
    def rr_samples(context: dg.AssetExecutionContext, reflections: dict[str, pl.DataFrame]) -> dg.Output[Any]:
        """RR dialogues (SPEC §2.3): one assistant turn per step in tag format, tool results
        as user turns, the summary request and the bare gold answer; system prompt first."""
        def one(shard: str) -> tuple[pl.DataFrame, dict[str, Any]]:
            df = _stamped(context, shard, stages.rr_samples(reflections[shard], prompts.rr),
                          {"reflections": reflections[shard]})
            return df, {"dagster/row_count": df.height,
                        "preview": dg.MetadataValue.md(_dialogue_preview(df, n_preview))}

        return shard_output(context, one)

    @dg.asset(partitions_def=parts, backfill_policy=shards_backfill_policy(cfg),
              group_name="integration", code_version=versions["orr_samples"],
              kinds={"polars"})
    def orr_samples(context: dg.AssetExecutionContext, reflections: dict[str, pl.DataFrame]) -> dg.Output[Any]:
        """ORR samples (SPEC §2.5): question plus every tool output in one user turn, all
        thoughts joined and the answer in one assistant turn; RAG text left out."""
        def one(shard: str) -> tuple[pl.DataFrame, dict[str, Any]]:
            df = _stamped(context, shard, stages.orr_samples(reflections[shard], prompts.orr),
                          {"reflections": reflections[shard]})
            return df, {"dagster/row_count": df.height,
                        "used_rag": df.filter(pl.col("used_rag").fill_null(False)).height,
                        "preview": dg.MetadataValue.md(_dialogue_preview(df, n_preview))}

        return shard_output(context, one)

    @dg.asset(group_name="integration", code_version=OWN_VERSIONS["dialogue_files"], kinds={"json"},
              ins={"foundation": dg.AssetIn("foundation_samples"), "reflected": dg.AssetIn("reflections"),
                   "rr": dg.AssetIn("rr_samples"), "orr": dg.AssetIn("orr_samples")})
    def dialogue_files(context: dg.AssetExecutionContext, storage: StorageResource,
                       foundation: dict[str, pl.DataFrame], reflected: dict[str, pl.DataFrame],
                       rr: dict[str, pl.DataFrame], orr: dict[str, pl.DataFrame]) -> dg.MaterializeResult:
        """All shards' RR and ORR samples as JSONL (messages + provenance per line), and the
        yield funnel: in → rationale → passed reflection → RR/ORR (the paper's Table 1 too)."""
        all_f, all_r = stages.concat_shards(foundation), stages.concat_shards(reflected)
        all_rr, all_orr = stages.concat_shards(rr), stages.concat_shards(orr)
        paths = {}
        for name, df in (("rr", all_rr), ("orr", all_orr)):
            path = storage.path("datasets", f"{name}.jsonl")
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_writer(path, encoding="utf-8") as f:  # concurrent builds: one whole file wins
                for row in df.iter_rows(named=True):
                    f.write(json.dumps(_jsonl_row(row), ensure_ascii=False) + "\n")
            paths[name] = str(path)
        funnel = stages.funnel(all_f, all_r, all_rr, all_orr)
        steps, tools = stages.steps_histogram(all_r), stages.tool_counts(all_r)
        summary = (f"RR: {paths['rr']}\nORR: {paths['orr']}\nfunnel: "
                   + " -> ".join(f"{k} {v}" for k, v in funnel.items()))
        context.log.info(summary)
        version = doc_version({"rr": frame_version(all_rr), "orr": frame_version(all_orr)})
        return dg.MaterializeResult(data_version=dg.DataVersion(version), metadata={
            "rr_path": dg.MetadataValue.path(paths["rr"]), "orr_path": dg.MetadataValue.path(paths["orr"]),
            "funnel": _md_counts(funnel, "stage", "Yield funnel"),
            "funnel_chart": dg.MetadataValue.md(charts.markdown_chart(charts.funnel_svg(funnel), "Yield funnel")),
            "steps_per_sample": _md_counts(steps, "steps", "Steps per RR sample"),
            "steps_chart": dg.MetadataValue.md(charts.markdown_chart(
                charts.bar_chart_svg({str(k): v for k, v in steps.items()}, "RR samples by steps", horizontal=False),
                "Steps per RR sample")),
            "tool_calls_per_tool": _md_counts(tools, "tool", "Samples calling each tool"),
            "tool_calls_chart": dg.MetadataValue.md(charts.markdown_chart(
                charts.bar_chart_svg(tools, "Samples calling each tool"), "Samples calling each tool")),
            "checks_fired": _md_counts(stages.check_counts(all_r), "check", "Reflection checks fired"),
            "failures": _md_counts(stages.failures(all_r), "stage:reason", "Failures"),
            "rows_by_licence": dg.MetadataValue.md(counts_markdown(all_rr, ["source", "license"], "RR rows by licence")),
            "mmat/summary": summary, **stages.teacher_totals(all_r),
        })

    return [rr_samples, orr_samples, dialogue_files]


def _jsonl_row(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["sample_id"], "messages": row["turns"], "images": [i["uri"] for i in row["images"] or []],
            "source": row["source"], "subset": row["subset"], "source_row_id": row["source_row_id"],
            "license": row["license"], "used_rag": row["used_rag"], "checks": row["checks"],
            "reflected": row["reflected"], "shard": row["shard"]}


def build(cfg: ProjectConfig, registry: Registry) -> list[dg.AssetsDefinition]:
    if not cfg.sources:
        return []
    prompts = Prompts.of(offered_tools(cfg, registry))  # one look at the tools per definitions load
    versions = code_versions(cfg, registry, prompts)
    return (rationale_assets(cfg, registry, versions) + reflection_assets(cfg, registry, versions, prompts)
            + integration_assets(cfg, versions, prompts))
