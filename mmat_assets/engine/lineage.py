"""Row-level lineage and audits, read from the stored tables alone (no Dagster needed).

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

import json
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
from upath import UPath

from mmat_assets.engine import stages
from mmat_assets.engine.export import is_non_commercial
from mmat_assets.versions import frame_version

#: Stage tables in the order a sample passes through them (partitioned by shard).
STAGE_TABLES = ("foundation_samples", "rationales", "reflections", "rr_samples", "orr_samples")
SAMPLE_IDS = "sample_ids.parquet"
Progress = Callable[[str], None]


class LineageError(LookupError):
    """A sample, export or model that cannot be found (the message says what exists)."""


@dataclass
class Tables:
    """The stored tables of one project profile (``<root>/tables``), read lazily and cached."""

    root: UPath
    _cache: dict[tuple[str, str], pl.DataFrame] = field(default_factory=dict)
    _listed: dict[str, list[str]] = field(default_factory=dict)

    @property
    def tables(self) -> UPath:
        return self.root / "tables"

    def shards(self, asset: str) -> list[str]:
        if asset not in self._listed:  # one listing per table (an S3 LIST each)
            d = self.tables / asset
            self._listed[asset] = sorted(p.name[: -len(".parquet")] for p in d.iterdir()
                                         if p.name.endswith(".parquet")) if d.exists() else []
        return self._listed[asset]

    def shard(self, asset: str, shard: str) -> pl.DataFrame:
        key = (asset, shard)
        if key not in self._cache:
            with (self.tables / asset / f"{shard}.parquet").open("rb") as f:
                self._cache[key] = pl.read_parquet(f)
        return self._cache[key]

    def ids(self, asset: str, shard: str) -> pl.DataFrame:
        """Only the ``sample_id`` column of one shard (cheap to scan every shard)."""
        if (asset, shard) in self._cache:
            return self._cache[(asset, shard)].select("sample_id")
        with (self.tables / asset / f"{shard}.parquet").open("rb") as f:
            return pl.read_parquet(f, columns=["sample_id"])

    def all(self, asset: str, columns: list[str] | None = None) -> pl.DataFrame:
        """Every shard of ``asset`` as one table (only ``columns`` when given)."""
        frames = []
        for shard in self.shards(asset):
            if columns is None:
                frames.append(self.shard(asset, shard))
            else:
                with (self.tables / asset / f"{shard}.parquet").open("rb") as f:
                    frames.append(pl.read_parquet(f, columns=columns))
        return pl.concat(frames, how="vertical_relaxed") if frames else pl.DataFrame()

    def json(self, *key: str) -> dict[str, Any] | None:
        path = self.tables.joinpath(*key[:-1], f"{key[-1]}.json")
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None

    def exports(self) -> dict[str, dict[str, Any]]:
        d = self.tables / "exports"
        if not d.exists():
            return {}
        out = {}
        for p in sorted(d.iterdir()):
            if p.name.endswith(".json"):
                out[p.name[: -len(".json")]] = json.loads(p.read_text(encoding="utf-8"))
        return out

    def model(self) -> dict[str, Any] | None:
        return self.json("tuned_model")

    def exists(self, uri: str) -> bool:
        """Whether a media URI resolves (with this root's storage options, e.g. an endpoint)."""
        if "://" in uri and not uri.startswith("file://"):
            return UPath(uri, **self.root.storage_options).exists()
        return Path(_local(uri)).exists()


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


def _prov(row: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(row.get("provenance") or "{}")


def _stamps(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The asset partitions that wrote the row (records.py ``lineage``), oldest first."""
    return json.loads(row.get("lineage") or "[]")


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
        "images": [_local(i["uri"]) for i in row["images"] or []],
        "tool_calls": list(row.get("tool_calls") or []), "dialogues": dialogues,
    }


def _local(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


# ------------------------------------------------------------------------- lineage


def lineage(tables: Tables, sample_id: str) -> dict[str, Any]:
    """The full chain of one sample, backward to its source row and forward to exports and
    models; each asset's recorded data version is compared with the table as it is now."""
    full, shard, rows = find_sample(tables, sample_id)
    row = _latest(rows)
    prov = _prov(row)
    return {
        "sample_id": full,
        "source": {k: row[k] for k in ("source", "dataset", "subset", "source_row_id", "license")}
        | {"non_commercial": is_non_commercial(row["license"]), "question": row["question"], "answer": row["answer"]},
        "images": [{"sha256": i["sha256"], "path": _local(i["uri"]), "width": i["width"], "height": i["height"],
                    "exists": tables.exists(i["uri"])} for i in row["images"] or []],
        "shard": shard,
        "status": row.get("status"), "failure": row.get("failure"), "failure_stage": row.get("failure_stage"),
        "tool_calls": list(row.get("tool_calls") or []),
        "teacher_calls": prov.get("teacher_calls", []),
        "reflection": {"checks": list(row.get("checks") or []), "reflected": row.get("reflected"),
                       "findings": prov.get("findings", [])},
        "assets": _asset_chain(tables, shard, rows, _stamps(row)),
        "forward": _forward(tables, full),
    }


def _asset_chain(tables: Tables, shard: str, rows: Mapping[str, pl.DataFrame],
                 stamps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Asset partitions that touched the sample: recorded versions, and the current ones."""
    recorded: dict[str, str] = {}
    code: dict[str, str | None] = {}
    for entry in stamps:
        code[entry["asset"]] = entry.get("code_version")
        recorded.update(entry.get("inputs", {}))
    if "orr_samples" in rows:
        for entry in _stamps(rows["orr_samples"].row(0, named=True)):
            code.setdefault(entry["asset"], entry.get("code_version"))
    chain = []
    for asset in sorted(a for a in recorded if a.startswith("source_samples/")):
        path = tables.tables / f"{asset}.parquet"
        current = None
        if path.exists():
            with path.open("rb") as f:
                current = frame_version(pl.read_parquet(f))
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
        ids = _ids(manifest.get("sample_ids"))
        formats = sorted(ids.get(sample_id, ())) if ids is not None else []
        exports.append({"export": f"exports/{name}", "data_version": manifest.get("data_version"),
                        "included": bool(formats) if ids is not None else None, "formats": formats,
                        "ids_file": manifest.get("sample_ids")})
    model = tables.model()
    if model:
        ids = _ids(_model_ids(model))
        known = ids is not None
        models.append({"model": "tuned_model", "checkpoint": model["checkpoint"], "export": model.get("export"),
                       "export_data_version": model.get("export_data_version"), "data": model.get("data"),
                       "included": sample_id in ids if known else None,
                       "trained_on": model.get("data") in ids.get(sample_id, set()) if known else None,
                       "ids_file": _model_ids(model)})
    return {"exports": exports, "models": models}


def _model_ids(model: Mapping[str, Any]) -> str:
    """The sample-ids file a tuned model kept (beside ``mmat_lineage.json``)."""
    return str(model.get("sample_ids") or Path(model.get("model_dir") or model["checkpoint"]) / SAMPLE_IDS)


def _parent(path: str | None) -> str | None:
    return str(Path(path).parent) if path else None


def _ids(path: str | None) -> dict[str, set[str]] | None:
    """``{sample_id: {formats}}`` of a sample-ids file; None when there is none (unknown)."""
    if not path or not Path(path).is_file():
        return None
    out: dict[str, set[str]] = defaultdict(set)
    for sid, fmt in pl.read_parquet(path, columns=["sample_id", "format"]).iter_rows():
        out[sid].add(fmt)
    return out


# --------------------------------------------------------------------------- audit


def resolve_target(tables: Tables, target: str) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
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


def audit(tables: Tables, target: str, progress: Progress | None = None) -> dict[str, Any]:
    """The audit of a tuned model or an export in the shape :mod:`audit_render` draws."""
    say = progress or (lambda _msg: None)
    kind, manifest, model = resolve_target(tables, target)
    ids_path = _model_ids(model) if model else manifest.get("sample_ids")
    if model and not (ids_path and Path(ids_path).is_file()):  # a model from before models kept their ids
        ids_path = manifest.get("sample_ids")
    ids = _ids(ids_path)
    if not ids:
        raise LineageError(f"no sample ids for {target!r} (looked in {ids_path}); rebuild the export")
    export_version = manifest.get("data_version")
    if model:  # what the model saw: its format of the export, at the version it trained on
        ids = {sid: {model.get("data")} for sid, formats in ids.items() if model.get("data") in formats}
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
    out = {
        "target": {"kind": kind, "name": "tuned_model" if model else f"exports/{name}",
                   "path": model["checkpoint"] if model else _parent(manifest.get("sample_ids")) or ""},
        "export": {"name": name, "asset": f"exports/{name}", "data_version": export_version,
                   "rows": manifest.get("rows", {}), "rejected": manifest.get("rejected", 0),
                   "path": _parent(manifest.get("sample_ids")) or ""},
        "model": _model_section(model) if model else None,
        "shards": _shards(tables, samples, ids),
        "sources": _sources(samples),
        **_calls(samples),
        "rates": _rates(samples, by_stage["reflections"]),
        "funnel": _funnel(by_stage, ids, model.get("data") if model else None),
        "failures": stages.failures(by_stage["reflections"]) if by_stage["reflections"].height else {},
        "steps_per_sample": {str(k): v for k, v in sorted(Counter(samples["steps"].fill_null(0).to_list()).items())},
        "tool_calls_per_tool": _tool_calls_per_tool(samples),
        "missing_rows": len(ids) - samples.height,
    }
    out["totals"]["rows"] = sum(len(f) for f in ids.values())
    return out


def _one_per_sample(by_stage: Mapping[str, pl.DataFrame], wanted: pl.Series) -> pl.DataFrame:
    """One row per exported sample (its RR row, else its ORR row): the stats count samples."""
    frames = [by_stage[a] for a in ("rr_samples", "orr_samples") if by_stage[a].height]
    if not frames:
        return pl.DataFrame(schema={"sample_id": pl.String})
    rows = pl.concat(frames, how="vertical_relaxed").filter(pl.col("sample_id").is_in(wanted.implode()))
    return rows.unique("sample_id", keep="first", maintain_order=True)


def _model_section(model: Mapping[str, Any]) -> dict[str, Any]:
    return {"checkpoint": model.get("checkpoint"), "trainer": model.get("trainer"), "student": model.get("student"),
            "steps": model.get("steps"), "training_config": model.get("training_config", {}),
            "code_version": model.get("code_version"), "export_data_version": model.get("export_data_version")}


def _shards(tables: Tables, samples: pl.DataFrame, ids: Mapping[str, set[str]]) -> list[dict[str, Any]]:
    out = []
    if not samples.height:
        return out
    per_shard = Counter(str(s) for s in samples["shard"].to_list())
    width = max((len(s) for s in tables.shards("rr_samples")), default=1)
    for shard_int in sorted({int(s) for s in per_shard}):
        shard = f"{shard_int:0{width}d}"
        versions: dict[str, str] = {}
        for row in samples.filter(pl.col("shard") == shard_int).head(1).iter_rows(named=True):
            for entry in _stamps(row):
                versions.update(entry.get("inputs", {}))
        for asset in ("rr_samples", "orr_samples"):
            if shard in tables.shards(asset):
                versions[asset] = frame_version(tables.shard(asset, shard))
        out.append({"shard": shard, "rows": per_shard[str(shard_int)], "data_versions": versions})
    return out


def _sources(samples: pl.DataFrame) -> list[dict[str, Any]]:
    if not samples.height:
        return []
    out = []
    grouped = samples.group_by("source", "dataset", "license").agg(pl.len().alias("rows"),
                                                                    pl.col("subset").unique().sort().alias("subsets"))
    for r in grouped.sort("source", "license").iter_rows(named=True):
        out.append({"source": r["source"], "dataset": r["dataset"], "subsets": r["subsets"], "license": r["license"],
                    "rows": r["rows"], "non_commercial": is_non_commercial(r["license"] or "")})
    return out


def _calls(samples: pl.DataFrame) -> dict[str, Any]:
    teachers: dict[tuple[str, str], dict[str, Any]] = {}
    tools: dict[str, dict[str, Any]] = {}
    for row in samples.iter_rows(named=True):
        for c in _prov(row).get("teacher_calls", []):
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
    teacher_rows = [{**t, "prompt_versions": sorted(t["prompt_versions"]), "cost_usd": round(t["cost_usd"], 6)}
                    for _, t in sorted(teachers.items())]
    tool_rows = [{**t, "versions": sorted(t["versions"])} for _, t in sorted(tools.items())]
    pt = sum(t["prompt_tokens"] for t in teacher_rows)
    ct = sum(t["completion_tokens"] for t in teacher_rows)
    totals = {"rows": 0, "samples": samples.height, "prompt_tokens": pt, "completion_tokens": ct, "tokens": pt + ct,
              "cost_usd": round(sum(t["cost_usd"] for t in teacher_rows), 6),
              "teacher_calls": sum(t["calls"] for t in teacher_rows), "tool_calls": sum(t["calls"] for t in tool_rows)}
    return {"teachers": teacher_rows, "tools": tool_rows, "totals": totals}


def _rates(samples: pl.DataFrame, reflections: pl.DataFrame) -> dict[str, float]:
    reflected = samples["reflected"].fill_null(False).sum() if samples.height else 0
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


def tables_for(root: str, storage_options: Mapping[str, Any] | None = None) -> Tables:
    """The tables of a storage root (a directory or an ``s3://`` URL)."""
    return Tables(UPath(root, **dict(storage_options or {})))


__all__ = ["LineageError", "Tables", "audit", "find_sample", "lineage", "resolve_target", "show", "tables_for"]

