"""A polars Parquet IO manager on ``dg.UPathIOManager`` (local paths and ``s3://``).

dagster-polars is not used: its 0.27 line passes arguments polars 2.x removed.
"""

from __future__ import annotations

from typing import Any

import dagster as dg
import polars as pl
from upath import UPath


class PolarsParquetIOManager(dg.UPathIOManager):
    """Stores each asset (or partition) as one Parquet file; loads DataFrame or LazyFrame."""

    extension = ".parquet"

    def dump_to_path(self, context: dg.OutputContext, obj: pl.DataFrame, path: UPath) -> None:
        if obj is None:
            return
        if isinstance(obj, pl.LazyFrame):
            obj = obj.collect()
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            obj.write_parquet(f, compression="zstd", statistics=True)

    def load_from_path(self, context: dg.InputContext, path: UPath) -> pl.DataFrame | pl.LazyFrame:
        with path.open("rb") as f:
            frame = pl.read_parquet(f)
        if context.dagster_type.typing_type is pl.LazyFrame:
            return frame.lazy()
        return frame

    def get_metadata(self, context: dg.OutputContext, obj: Any) -> dict[str, dg.MetadataValue]:
        if isinstance(obj, pl.DataFrame):
            return {"dagster/row_count": dg.MetadataValue.int(obj.height)}
        return {}


class JsonIOManager(dg.UPathIOManager):
    """Small JSON documents (manifests, paths, reports) next to the tables."""

    extension = ".json"

    def dump_to_path(self, context: dg.OutputContext, obj: Any, path: UPath) -> None:
        import json

        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str), encoding="utf-8")

    def load_from_path(self, context: dg.InputContext, path: UPath) -> Any:
        import json

        return json.loads(path.read_text(encoding="utf-8"))
