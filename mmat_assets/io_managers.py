"""A polars Parquet IO manager on ``dg.UPathIOManager`` (local paths and ``s3://``).

Tables and documents are written atomically, so builds that write the same asset at once
leave one whole file (the last to finish), never a mix; and a table is read in one request,
so a reader gets one whole version even while another build's copy lands.

dagster-polars is not used: its 0.27 line passes arguments polars 2.x removed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, get_origin

import dagster as dg
import polars as pl
from upath import UPath

from mmat_assets.engine.leases import atomic_write, atomic_writer, read_whole


class PolarsParquetIOManager(dg.UPathIOManager):
    """Stores each asset (or partition) as one Parquet file; loads DataFrame or LazyFrame."""

    extension = ".parquet"

    def dump_to_path(self, context: dg.OutputContext, obj: pl.DataFrame, path: UPath) -> None:
        if obj is None:
            return
        if isinstance(obj, pl.LazyFrame):
            obj = obj.collect()
        # Whole or not at all: a concurrent build writing the same table, or a reader, never
        # meets half a file (a unique temporary name, then a rename; one PUT on S3).
        with atomic_writer(path) as f:
            obj.write_parquet(f, compression="zstd", statistics=True)

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        # A run covering several shards (a batched backfill) hands over {shard: table}: each
        # is stored as its own partition, where a run of that one shard would store it.
        if not (isinstance(obj, Mapping) and context.has_asset_partitions):
            return super().handle_output(context, obj)
        paths = self._get_paths_for_partitions(context)
        if len(paths) == 1:
            return super().handle_output(context, next(iter(obj.values())))
        for partition, path in paths.items():
            self.make_directory(path.parent)
            self.dump_to_path(context=context, obj=obj[partition], path=path)
            # each shard's materialization names its own file, as a run of that shard alone does
            context.step_context.add_asset_metadata(
                {"path": dg.MetadataValue.path(str(path)), **self.get_metadata(context, obj[partition])},
                asset_key=context.asset_key, partition_key=partition)
        return None

    def load_from_path(self, context: dg.InputContext, path: UPath) -> pl.DataFrame | pl.LazyFrame:
        # One GET of the whole object: an S3 file handle reads in ranges pinned to the version
        # it opened, and fails ("no longer exists") when a concurrent build replaces the table.
        frame = pl.read_parquet(read_whole(path))
        if context.dagster_type.typing_type is pl.LazyFrame:
            return frame.lazy()
        return frame

    def load_partitions(self, context: dg.InputContext) -> Any:
        # Dagster hands over one partition as a bare value and several as a dict; a step that
        # declares a dict of shards must get one even when the project has a single shard.
        loaded = super().load_partitions(context)
        keys = context.asset_partition_keys
        if len(keys) == 1 and get_origin(context.dagster_type.typing_type) in (dict, Mapping):
            return {keys[0]: loaded}
        return loaded

    def get_metadata(self, context: dg.OutputContext, obj: Any) -> dict[str, dg.MetadataValue]:
        if isinstance(obj, pl.DataFrame):
            return {"dagster/row_count": dg.MetadataValue.int(obj.height)}
        return {}


class JsonIOManager(dg.UPathIOManager):
    """Small JSON documents (manifests, paths, reports) next to the tables."""

    extension = ".json"

    def dump_to_path(self, context: dg.OutputContext, obj: Any, path: UPath) -> None:
        import json

        atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode("utf-8"))

    def load_from_path(self, context: dg.InputContext, path: UPath) -> Any:
        import json

        return json.loads(read_whole(path).decode("utf-8"))
