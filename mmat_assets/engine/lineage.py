"""Row-level lineage, read from the stored tables alone (no Dagster needed).

Every stage row carries what produced it: source dataset, subset, row id and licence,
image hashes, each tool call (tool, version, arguments, cache key, result) and each
teacher call (model, prompt version, request hash, tokens, cost) in ``tool_calls`` and
``provenance``, the reflection checks in ``checks``, and in ``lineage`` the asset
partitions that wrote it with their code versions and the data versions of what they read.
Exports list their sample ids (``sample_ids.parquet``) and tuned models keep a copy, so a
sample's lineage runs backward to its source row and forward to every export and model
holding it. Data versions here are the same content hashes Dagster records
(:mod:`mmat_assets.versions`), recomputed from the tables.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import polars as pl

from mmat_assets.engine.tables import (STAGE_TABLES, LineageError, Tables, local_path, model_ids_file,
                                       provenance, read_sample_ids, stamps, tables_for)
from mmat_assets.engine.leases import read_whole
from mmat_assets.toolkit.export import is_non_commercial
from mmat_assets.versions import frame_version

# --------------------------------------------------------------------------- finding


def find_sample(tables: Tables, sample_id: str) -> tuple[str, str, dict[str, pl.DataFrame]]:
    """``(full id, shard, {stage table: that sample's rows})`` for an id or a unique prefix.

    The prefix must be unique across every shard; only the ``sample_id`` column is read
    to find it, then the one shard that holds it.
    """
    sample_id = sample_id.strip()
    if len(sample_id) < 4:
        raise LineageError("give at least 4 characters of a sample id")
    for asset in ("foundation_samples", "rationales", "reflections", "rr_samples"):
        shards = tables.shards(asset)
        if not shards:
            continue
        hits: dict[str, str] = {}
        for shard in shards:
            for full in tables.ids(asset, shard).filter(pl.col("sample_id").str.starts_with(sample_id))["sample_id"]:
                hits.setdefault(full, shard)
        if len(hits) > 1:
            shown = ", ".join(sorted(hits)[:10]) + (" …" if len(hits) > 10 else "")
            raise LineageError(f"{sample_id!r} matches {len(hits)} samples ({shown}); give more of the id")
        if hits:
            (full, shard), = hits.items()
            rows = {}
            for stage in STAGE_TABLES:
                if shard in tables.shards(stage):
                    part = tables.shard(stage, shard).filter(pl.col("sample_id") == full)
                    if part.height:
                        rows[stage] = part
            return full, shard, rows
        break  # the earliest stage built holds every sample that any later one does
    built = [a for a in STAGE_TABLES if tables.shards(a)]
    where = f"tables under {tables.tables}" + (f" (built: {', '.join(built)})" if built else " (nothing built yet)")
    raise LineageError(f"no sample {sample_id!r} in the {where}")


def _latest(rows: Mapping[str, pl.DataFrame]) -> dict[str, Any]:
    """The sample's most processed row (what later stages saw)."""
    for stage in ("rr_samples", "reflections", "rationales", "foundation_samples"):
        if stage in rows:
            return rows[stage].row(0, named=True)
    raise LineageError("sample has no rows")


# --------------------------------------------------------------------------- show


def show(tables: Tables, sample_id: str) -> dict[str, Any]:
    """The sample's dialogues (RR and ORR) as stored, with its tool calls and image paths."""
    full, shard, rows = find_sample(tables, sample_id)
    row = _latest(rows)
    dialogues = {}
    for fmt, stage in (("rr", "rr_samples"), ("orr", "orr_samples")):
        if stage in rows:
            dialogues[fmt] = list(rows[stage].row(0, named=True)["turns"] or [])
    return {
        "sample_id": full, "shard": shard, "source": row["source"], "subset": row["subset"],
        "source_row_id": row["source_row_id"], "license": row["license"], "question": row["question"],
        "answer": row["answer"], "status": row.get("status"), "failure": row.get("failure"),
        "failure_detail": row.get("failure_detail"),
        "images": [local_path(i["uri"]) for i in row["images"] or []],
        "tool_calls": list(row.get("tool_calls") or []), "dialogues": dialogues,
    }


# ------------------------------------------------------------------------- lineage


def lineage(tables: Tables, sample_id: str) -> dict[str, Any]:
    """The full chain of one sample, backward to its source row and forward to exports and
    models; each asset's recorded data version is compared with the table as it is now."""
    full, shard, rows = find_sample(tables, sample_id)
    row = _latest(rows)
    prov = provenance(row)
    return {
        "sample_id": full,
        "source": {k: row[k] for k in ("source", "dataset", "subset", "source_row_id", "license")}
        | {"non_commercial": is_non_commercial(row["license"]), "question": row["question"], "answer": row["answer"]},
        "images": [{"sha256": i["sha256"], "path": local_path(i["uri"]), "width": i["width"], "height": i["height"],
                    "exists": tables.exists(i["uri"])} for i in row["images"] or []],
        "shard": shard,
        "status": row.get("status"), "failure": row.get("failure"), "failure_stage": row.get("failure_stage"),
        "tool_calls": list(row.get("tool_calls") or []),
        "teacher_calls": prov.get("teacher_calls", []),
        "reflection": {"checks": list(row.get("checks") or []), "reflected": row.get("reflected"),
                       "findings": prov.get("findings", [])},
        "assets": _asset_chain(tables, shard, rows, stamps(row)),
        "forward": _forward(tables, full),
    }


def _asset_chain(tables: Tables, shard: str, rows: Mapping[str, pl.DataFrame],
                 written_by: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Asset partitions that touched the sample: recorded versions, and the current ones."""
    recorded: dict[str, str] = {}
    code: dict[str, str | None] = {}
    for entry in written_by:
        code[entry["asset"]] = entry.get("code_version")
        recorded.update(entry.get("inputs", {}))
    if "orr_samples" in rows:
        for entry in stamps(rows["orr_samples"].row(0, named=True)):
            code.setdefault(entry["asset"], entry.get("code_version"))
    chain = []
    for asset in sorted(a for a in recorded if a.startswith("source_samples/")):
        path = tables.tables / f"{asset}.parquet"
        current = None
        if path.exists():
            current = frame_version(pl.read_parquet(read_whole(path)))
        chain.append({"asset": asset, "partition": None, "code_version": code.get(asset), "data_version": current,
                      "recorded_data_version": recorded[asset], "changed_since": recorded[asset] != current})
    for asset in STAGE_TABLES:
        if asset not in rows:
            continue
        current = frame_version(tables.shard(asset, shard))
        chain.append({"asset": asset, "partition": shard, "code_version": code.get(asset),
                      "data_version": current, "recorded_data_version": recorded.get(asset),
                      "changed_since": recorded.get(asset) not in (None, current)})
    return chain


def _forward(tables: Tables, sample_id: str) -> dict[str, Any]:
    """Exports and models holding the sample; ``included`` is None when their id list is
    missing (an export from before ids were kept, or built on another machine)."""
    exports, models = [], []
    for name, manifest in tables.exports().items():
        ids = read_sample_ids(manifest.get("sample_ids"))
        formats = sorted(ids.get(sample_id, ())) if ids is not None else []
        exports.append({"export": f"exports/{name}", "data_version": manifest.get("data_version"),
                        "included": bool(formats) if ids is not None else None, "formats": formats,
                        "ids_file": manifest.get("sample_ids")})
    model = tables.model()
    if model:
        ids = read_sample_ids(model_ids_file(model))
        models.append({"model": "tuned_model", "checkpoint": model["checkpoint"], "export": model.get("export"),
                       "export_data_version": model.get("export_data_version"), "data": model.get("data"),
                       "included": sample_id in ids if ids is not None else None,
                       "trained_on": model.get("data") in ids.get(sample_id, set()) if ids is not None else None,
                       "ids_file": model_ids_file(model)})
    return {"exports": exports, "models": models}


__all__ = ["LineageError", "Tables", "find_sample", "lineage", "show", "tables_for"]
