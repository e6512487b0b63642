"""Foundation stage: one asset per configured source, then the sharded sample table.

No `from __future__ import annotations` here: Dagster reads the context annotations.
"""


import warnings
from typing import Any

import dagster as dg
import polars as pl

from mmat_assets import checks
from mmat_assets.assets._shared import recorded_version
from mmat_assets.config import ProjectConfig, SourceConfig
from mmat_assets.engine import foundation as engine
from mmat_assets.engine.images import ImageLimits
from mmat_assets.engine.preview import counts_markdown, samples_markdown
from mmat_assets.engine.stages import stamp_lineage
from mmat_assets.plugins import Registry
from mmat_assets.resources import StorageResource
from mmat_assets.versions import frame_version

GROUP = "foundation"
#: Bump when Foundation's own logic changes the rows it writes.
ENGINE_VERSION = "1"


def shard_keys(n: int) -> list[str]:
    width = len(str(max(n - 1, 0)))
    return [f"{i:0{width}d}" for i in range(n)]


def shards_partitions(cfg: ProjectConfig) -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition(shard_keys(cfg.foundation.shards))


def _limits(cfg: ProjectConfig) -> ImageLimits:
    f = cfg.foundation
    return ImageLimits(f.max_image_pixels, f.max_image_side, f.min_image_side)


def _source_metadata(ing: engine.Ingested, kept: pl.DataFrame, storage: StorageResource,
                     cfg: ProjectConfig) -> dict[str, Any]:
    media = storage.media()
    return {
        "rows_read": ing.counts["read"],
        "rows_quarantined": ing.counts["quarantined"],
        "rows_dropped_duplicate_or_quota": ing.samples.height - kept.height,
        "dagster/row_count": kept.height,
        "rows_by_subset": dg.MetadataValue.md(counts_markdown(kept, ["subset", "license"], "Rows by subset")),
        "quarantined_by_reason": dg.MetadataValue.md(
            counts_markdown(ing.quarantine, ["reason"], "Quarantined rows by reason")),
        "preview": dg.MetadataValue.md(samples_markdown(kept, media.read, cfg.foundation.preview_rows)),
    }


def source_asset(name: str, scfg: SourceConfig, cfg: ProjectConfig, registry: Registry) -> dg.AssetsDefinition:
    """``source_samples/<name>`` (and its quarantine) for one configured source."""
    impl = registry.get("source", scfg.plugin)

    @dg.multi_asset(
        name=f"source_{name}",
        outs={
            "samples": dg.AssetOut(key=["source_samples", name], group_name=GROUP, kinds={"polars"},
                                   code_version=f"{impl.cls.version}+{ENGINE_VERSION}",
                                   description=f"Rows of source {name!r} ({impl.cls.description}), "
                                   "normalised, deduplicated, quota-sampled, shard assigned.",
                                   metadata={"plugin": impl.plugin, "reader": impl.name}),
            "quarantine": dg.AssetOut(key=["quarantine", "source", name], group_name=GROUP, kinds={"polars"},
                                      code_version=f"{impl.cls.version}+{ENGINE_VERSION}",
                                      description=f"Rows of source {name!r} that could not be used, "
                                      "each with its reason."),
        },
    )
    def _source(context: dg.AssetExecutionContext, storage: StorageResource):
        source = registry.create("source", scfg.plugin, scfg.options)
        source.base_dir = cfg.base_dir
        ing = engine.ingest(source, name, storage.media(), _limits(cfg))
        kept = engine.prepare_source(ing.samples, scfg.quota, cfg.foundation.seed, cfg.foundation.shards)
        context.log.info(f"{name}: {ing.counts} -> kept {kept.height}")
        yield dg.Output(kept, "samples", data_version=dg.DataVersion(frame_version(kept)),
                        metadata=_source_metadata(ing, kept, storage, cfg))
        yield dg.Output(ing.quarantine, "quarantine", data_version=dg.DataVersion(frame_version(ing.quarantine)),
                        metadata={"dagster/row_count": ing.quarantine.height})

    return _source


def foundation_asset(cfg: ProjectConfig) -> dg.AssetsDefinition:
    """``foundation_samples``: every source's rows for one shard, deduplicated across sources."""
    ins = {f"src_{n}": dg.AssetIn(key=["source_samples", n]) for n in cfg.sources}

    @dg.asset(
        name="foundation_samples",
        group_name=GROUP,
        partitions_def=shards_partitions(cfg),
        ins=ins,
        code_version=ENGINE_VERSION,
        kinds={"polars"},
    )
    def foundation_samples(context: dg.AssetExecutionContext, storage: StorageResource,
                           **sources: pl.DataFrame) -> dg.Output[pl.DataFrame]:
        """The QA samples of one shard, from every configured source.

        Shards are assigned by image content hash, so all questions about one image share a
        shard (its tool results are computed once). Rows are in the record schema of
        ``mmat_assets.records``; images are references into the media store.
        """
        shard = int(context.partition_key)
        df = engine.foundation_shard(sources.values(), shard)
        key = context.asset_key
        read = {name[len("src_"):]: src for name, src in sources.items()}
        df = stamp_lineage(df, key.to_user_string(), context.partition_key,
                           context.assets_def.code_versions_by_key.get(key),
                           {f"source_samples/{n}": recorded_version(context, ["source_samples", n], None, src)
                            for n, src in read.items()})
        meta = {
            "dagster/row_count": df.height,
            "shard": shard,
            "rows_by_source": dg.MetadataValue.md(counts_markdown(df, ["source", "subset"], "Rows by source")),
            "preview": dg.MetadataValue.md(
                samples_markdown(df, storage.media().read, cfg.foundation.preview_rows)),
        }
        return dg.Output(df, metadata=meta, data_version=dg.DataVersion(frame_version(df)))

    return foundation_samples


def _result(outcome: checks.Outcome) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=outcome.passed, metadata=outcome.metadata,
                               severity=dg.AssetCheckSeverity.ERROR)


def foundation_checks(cfg: ProjectConfig) -> list[dg.AssetChecksDefinition]:
    """Schema, unique ids, licence and image references of every Foundation shard."""
    parts = shards_partitions(cfg)
    key = dg.AssetKey("foundation_samples")

    @dg.asset_check(asset=key, partitions_def=parts, description="Columns and types match the record schema.")
    def schema(foundation_samples: pl.DataFrame) -> dg.AssetCheckResult:
        return _result(checks.schema_matches(foundation_samples))

    @dg.asset_check(asset=key, partitions_def=parts, description="sample_id is unique.")
    def unique_sample_ids(foundation_samples: pl.DataFrame) -> dg.AssetCheckResult:
        return _result(checks.unique_ids(foundation_samples))

    @dg.asset_check(asset=key, partitions_def=parts, description="Every row names its licence.")
    def licence_present(foundation_samples: pl.DataFrame) -> dg.AssetCheckResult:
        return _result(checks.licence_present(foundation_samples))

    @dg.asset_check(asset=key, partitions_def=parts, description="Every image reference resolves.")
    def images_resolve(foundation_samples: pl.DataFrame, storage: StorageResource) -> dg.AssetCheckResult:
        return _result(checks.images_resolve(foundation_samples, storage.media().exists))

    return [schema, unique_sample_ids, licence_present, images_resolve]


def build(cfg: ProjectConfig, registry: Registry) -> tuple[list[dg.AssetsDefinition], list[dg.AssetChecksDefinition]]:
    """Every Foundation asset and check for this configuration."""
    assets = [source_asset(n, s, cfg, registry) for n, s in cfg.sources.items()]
    if not cfg.sources:
        return assets, []
    assets.append(foundation_asset(cfg))
    with warnings.catch_warnings():
        # per-shard checks are a Dagster preview feature, used knowingly; say it once, here
        warnings.filterwarnings("ignore", message="Specifying a partitions_def on an AssetCheckSpec")
        return assets, foundation_checks(cfg)

