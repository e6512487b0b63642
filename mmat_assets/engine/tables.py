"""Reading a project's stored tables (no Dagster needed): stage shards, exports, the model.

Every stage table is partitioned by shard under ``<root>/tables/<asset>/<shard>.parquet``;
exports and the tuned model are JSON documents beside them, and exports and models keep the
ids of the samples they hold (``sample_ids.parquet``). :class:`Tables` reads them lazily
and caches what it read; the helpers below decode the JSON columns every stage row carries.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
from upath import UPath

from mmat_assets.engine.leases import is_local, read_whole

#: Stage tables in the order a sample passes through them (partitioned by shard).
STAGE_TABLES = ("foundation_samples", "rationales", "reflections", "rr_samples", "orr_samples")
#: The ids of the samples an export (or a tuned model) holds, beside its files.
SAMPLE_IDS = "sample_ids.parquet"


class LineageError(LookupError):
    """A sample, export or model that cannot be found (the message says what exists)."""


def _parquet(path: UPath, columns: list[str] | None = None) -> pl.DataFrame:
    """One stored table (only ``columns`` when given): locally read in place, which reads only
    those columns; on S3 in one GET (see :func:`read_whole`)."""
    return pl.read_parquet(path.path if is_local(path) else read_whole(path), columns=columns)


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
            self._cache[key] = _parquet(self.tables / asset / f"{shard}.parquet")
        return self._cache[key]

    def ids(self, asset: str, shard: str) -> pl.DataFrame:
        """Only the ``sample_id`` column of one shard (cheap to scan every shard)."""
        if (asset, shard) in self._cache:
            return self._cache[(asset, shard)].select("sample_id")
        return _parquet(self.tables / asset / f"{shard}.parquet", ["sample_id"])

    def all(self, asset: str, columns: list[str] | None = None) -> pl.DataFrame:
        """Every shard of ``asset`` as one table (only ``columns`` when given)."""
        frames = []
        for shard in self.shards(asset):
            if columns is None:
                frames.append(self.shard(asset, shard))
            else:
                frames.append(_parquet(self.tables / asset / f"{shard}.parquet", columns))
        return pl.concat(frames, how="vertical_relaxed") if frames else pl.DataFrame()

    def json(self, *key: str) -> dict[str, Any] | None:
        path = self.tables.joinpath(*key[:-1], f"{key[-1]}.json")
        return json.loads(read_whole(path).decode("utf-8")) if path.exists() else None

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
        return Path(local_path(uri)).exists()


def tables_for(root: str, storage_options: Mapping[str, Any] | None = None) -> Tables:
    """The tables of a storage root (a directory or an ``s3://`` URL)."""
    return Tables(UPath(root, **dict(storage_options or {})))


# ----------------------------------------------------------------------- row fields


def provenance(row: Mapping[str, Any]) -> dict[str, Any]:
    """A stage row's ``provenance`` JSON (teacher calls, reflection findings...)."""
    return json.loads(row.get("provenance") or "{}")


def stamps(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The asset partitions that wrote the row (records.py ``lineage``), oldest first."""
    return json.loads(row.get("lineage") or "[]")


def local_path(uri: str) -> str:
    """A media URI as a path where it is a local file (``file://`` dropped)."""
    return uri[len("file://"):] if uri.startswith("file://") else uri


def parent(path: str | None) -> str | None:
    """The folder holding ``path`` (None for none)."""
    return str(Path(path).parent) if path else None


def model_ids_file(model: Mapping[str, Any]) -> str:
    """The sample-ids file a tuned model kept (beside ``mmat_lineage.json``)."""
    return str(model.get("sample_ids") or Path(model.get("model_dir") or model["checkpoint"]) / SAMPLE_IDS)


def read_sample_ids(path: str | None) -> dict[str, set[str]] | None:
    """``{sample_id: {formats}}`` of a sample-ids file; None when there is none (unknown)."""
    if not path or not Path(path).is_file():
        return None
    out: dict[str, set[str]] = defaultdict(set)
    for sid, fmt in pl.read_parquet(path, columns=["sample_id", "format"]).iter_rows():
        out[sid].add(fmt)
    return out


__all__ = [
    "SAMPLE_IDS",
    "STAGE_TABLES",
    "LineageError",
    "Tables",
    "local_path",
    "model_ids_file",
    "parent",
    "provenance",
    "read_sample_ids",
    "stamps",
    "tables_for",
]
