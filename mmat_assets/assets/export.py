"""Export group: one asset per exporter over every shard's RR and ORR samples.

Each export filters the samples, runs pre-flight on every record (structure, and the
trainer's encoder for the configured student), writes only records that pass, lists
the rejected ones with reasons, and records a content-hash data version that the exporter's
dataset card quotes. The folder is relocatable: its ``manifest.json`` names files relative
to the folder and no local path (the asset's own output, which stays in this project, keeps
local paths for lineage and training). The asset check
``preflight_clean`` fails when any record would have been dropped or bent by a trainer.
No `from __future__ import annotations` here: Dagster reads the context annotations.
"""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl

from mmat_assets.assets._shared import recorded_version
from mmat_assets.config import ProjectConfig
from mmat_assets.contracts import Trainer
from mmat_assets.engine import export as ex
from mmat_assets.engine import stages
from mmat_assets.plugins import Registry
from mmat_assets.resources import StorageResource

GROUP = "export"


def export_dir(storage: StorageResource, name: str) -> Path:
    """Exports are written locally (trainers read local files); S3 roots get a local mirror."""
    root = storage.path("exports", name)
    return Path(root.path) if root.protocol in ("", "file", "local") else Path(".mmat-exports").resolve() / name


#: The ids of the exported samples, beside the exporter's files (forward lineage).
SAMPLE_IDS = "sample_ids.parquet"


def write_sample_ids(path: Path, records: dict[str, list[ex.Record]]) -> Path:
    """``sample_id, format, shard`` of every exported record: which samples an export holds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"sample_id": r.id, "format": fmt, "shard": r.meta.get("shard")}
            for fmt, recs in records.items() for r in recs]
    pl.DataFrame(rows, schema={"sample_id": pl.String, "format": pl.String, "shard": pl.Int32}).write_parquet(path)
    return path


MANIFEST = "manifest.json"


def portable_manifest(manifest: dict[str, Any], out: Path) -> dict[str, Any]:
    """The manifest as written in the export folder: files relative to it, no local path."""
    student = manifest.get("student")
    if student and Path(student).is_absolute():  # a local folder: its name says which student
        student = Path(student).name
    return {**manifest, "files": {k: ex.relative_to(v, out) for k, v in manifest["files"].items()},
            "sample_ids": ex.relative_to(manifest["sample_ids"], out), "student": student}


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """An export folder's manifest with its files resolved against the folder (None: none)."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text(encoding="utf-8"))
    files = {k: str(folder / v) for k, v in manifest.get("files", {}).items()}
    ids = manifest.get("sample_ids")
    return {**manifest, "files": files, "sample_ids": str(folder / ids) if ids else ids}


def _context(rr: pl.DataFrame, ref: pl.DataFrame, foundation_rows: int) -> dict[str, Any]:
    teachers = sorted({c.get("model", "") for p in ref["provenance"].drop_nulls()
                       for c in json.loads(p).get("teacher_calls", [])} - {""}) if ref.height else []
    tools = {}
    for calls in rr["tool_calls"].drop_nulls():
        for c in calls:
            tools[c["tool"]] = c["version"]
    counts = stages.funnel(pl.DataFrame({"x": [0] * foundation_rows}), ref, rr, rr)
    counts.pop("orr", None)
    return {"teachers": teachers, "tool_versions": tools, "stage_counts": counts,
            "rr_system": stages.system_prompt(rr)}


def configured_trainer(cfg: ProjectConfig, registry: Registry) -> Trainer:
    """The trainer the config names: it trains the student, so it also knows how to build,
    encode for and run it."""
    trainer: Trainer = registry.create("trainer", cfg.training.trainer, cfg.training.options,
                                       base_dir=cfg.base_dir)
    return trainer


def encoder_for(cfg: ProjectConfig, registry: Registry, student_dir: str | None) -> ex.Encoder | None:
    """The trainer's record encoder for pre-flight (None when no student is configured)."""
    if not cfg.export.student or student_dir is None:
        return None
    return configured_trainer(cfg, registry).encoder(student_dir, cfg.export.max_length)


def _exporter_asset(cfg: ProjectConfig, registry: Registry, name: str) -> dg.AssetsDefinition:
    impl = registry.get("exporter", name)

    @dg.asset(key=["exports", name], group_name=GROUP, code_version=impl.cls.version, kinds={"json"},
              io_manager_key="json_io_manager",
              ins={"rr": dg.AssetIn("rr_samples"), "orr": dg.AssetIn("orr_samples"),
                   "reflected": dg.AssetIn("reflections"), "student": dg.AssetIn("student_base")},
              check_specs=[dg.AssetCheckSpec("preflight_clean", asset=["exports", name],
                                             description="No record would be dropped or bent by the trainer.")],
              description=f"{impl.cls.description} Pre-flighted against the student's template; filtered by config.")
    def _asset(context: dg.AssetExecutionContext, storage: StorageResource, rr: dict[str, pl.DataFrame],
               orr: dict[str, pl.DataFrame], reflected: dict[str, pl.DataFrame],
               student: dict[str, Any]) -> Iterator[dg.Output[dict[str, Any]] | dg.AssetCheckResult]:
        frames = {"rr": stages.concat_shards(rr), "orr": stages.concat_shards(orr)}
        filt = ex.ExportFilter.model_validate(cfg.export.filter)
        media = storage.media()
        encode = encoder_for(cfg, registry, student.get("path"))
        records: dict[str, list[ex.Record]] = {}
        rejected: list[ex.Rejected] = []
        for fmt in cfg.export.formats:
            rows = ex.apply_filter(frames[fmt], filt)
            ok, bad = ex.preflight((ex.to_record(r, media.local_path) for r in rows.iter_rows(named=True)), encode)
            records[fmt], rejected = ok, rejected + bad
        out = export_dir(storage, name)
        all_ref = stages.concat_shards(reflected)
        ctx = {**_context(frames["rr"], all_ref, all_ref.height), "orr_system": stages.system_prompt(frames["orr"])}
        version = ex.export_version(name, impl.cls.version, records, ctx)
        exporter = registry.create("exporter", name, base_dir=cfg.base_dir)
        written = exporter.export(records, out, {**ctx, "data_version": version})
        ex.write_jsonl(out / "rejected.jsonl", (r.__dict__ for r in rejected))
        ids_file = write_sample_ids(out / SAMPLE_IDS, records)
        manifest = {"exporter": name, "data_version": version, "files": written, "rows": {k: len(v) for k, v in records.items()},
                    "sample_ids": str(ids_file),
                    "inputs": {a: {k: recorded_version(context, [a], k, v) for k, v in sorted(parts.items())}
                               for a, parts in (("rr_samples", rr), ("orr_samples", orr))},
                    "rejected": len(rejected), "filter": filt.model_dump(), "max_length": cfg.export.max_length,
                    "student": student.get("path"), "licences": ex.licence_counts([r for v in records.values() for r in v])}
        (out / MANIFEST).write_text(json.dumps(portable_manifest(manifest, out), indent=2), encoding="utf-8")
        reasons: dict[str, int] = {}
        for r in rejected:
            reasons[r.reason] = reasons.get(r.reason, 0) + 1
        yield dg.Output(manifest, data_version=dg.DataVersion(version), metadata={
            "path": dg.MetadataValue.path(str(out)), "data_version": version,
            **{f"rows_{k}": len(v) for k, v in records.items()}, "rejected": len(rejected),
            "rejected_by_reason": dg.MetadataValue.json(reasons),
            "licences": dg.MetadataValue.json(manifest["licences"]),
            "mmat/summary": f"export {name}: {out} (data version {version}; "
                            + ", ".join(f"{k} {len(v)}" for k, v in records.items()) + f"; rejected {len(rejected)})",
        })
        yield dg.AssetCheckResult(check_name="preflight_clean", passed=not rejected,
                                  severity=dg.AssetCheckSeverity.ERROR,
                                  metadata={"rejected": len(rejected), "by_reason": dg.MetadataValue.json(reasons),
                                            "examples": dg.MetadataValue.json([r.__dict__ for r in rejected[:5]])})

    return _asset


def build(cfg: ProjectConfig, registry: Registry) -> list[dg.AssetsDefinition]:
    if not cfg.sources:
        return []
    names = cfg.export.exporters if cfg.export.exporters is not None else sorted(registry.role("exporter"))
    return [_exporter_asset(cfg, registry, n) for n in names]
