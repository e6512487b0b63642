"""Foundation stage: one asset per configured source, then the sharded sample table.

No `from __future__ import annotations` here: Dagster reads the context annotations.
"""


import traceback
import warnings
from collections.abc import Iterator
from typing import Any, Callable

import dagster as dg
import polars as pl

from mmat_assets import checks
from mmat_assets.assets._shared import recorded_version, shard_output
from mmat_assets.config import ProjectConfig, SourceConfig
from mmat_assets.engine import foundation as engine
from mmat_assets.engine.images import ImageLimits
from mmat_assets.engine.preview import counts_markdown, samples_markdown
from mmat_assets.engine.stages import stamp_lineage
from mmat_assets.plugins import Registry
from mmat_assets.resources import StorageResource
from mmat_assets.versions import frame_version

GROUP = "foundation"
ACCOUNTED_CHECK = "rows_accounted_for"
#: Bump when Foundation's own logic changes the rows it writes.
ENGINE_VERSION = "1"


def shard_keys(n: int) -> list[str]:
    width = len(str(max(n - 1, 0)))
    return [f"{i:0{width}d}" for i in range(n)]


def shards_partitions(cfg: ProjectConfig) -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition(shard_keys(cfg.foundation.shards))


# Backfill policies on assets are a Dagster beta parameter, used knowingly: say it once, here.
warnings.filterwarnings("ignore", message="Parameter `backfill_policy` of function `asset`")


def shards_backfill_policy(cfg: ProjectConfig) -> dg.BackfillPolicy:
    """A backfill of the shard assets runs ``foundation.shards_per_run`` shards per run: 500
    shards are ⌈500/k⌉ runs, each paying a run's start-up once."""
    return dg.BackfillPolicy.multi_run(cfg.foundation.shards_per_run)


def _limits(cfg: ProjectConfig) -> ImageLimits:
    f = cfg.foundation
    return ImageLimits(f.max_image_pixels, f.max_image_side, f.min_image_side)


#: The equation the ``rows_accounted_for`` check of every source asserts.
ROWS_EQUATION = "rows read = kept + quarantined + dropped duplicates + dropped by quota"


def _source_metadata(ing: engine.Ingested, kept: pl.DataFrame, counts: dict[str, int],
                     storage: StorageResource, cfg: ProjectConfig) -> dict[str, Any]:
    media = storage.media()
    return {
        **counts,
        "dagster/row_count": kept.height,
        "rows_by_subset": dg.MetadataValue.md(counts_markdown(kept, ["subset", "license"], "Rows by subset")),
        "quarantined_by_reason": dg.MetadataValue.md(
            counts_markdown(ing.quarantine, ["reason"], "Quarantined rows by reason")),
        "preview": dg.MetadataValue.md(samples_markdown(kept, media.read, cfg.foundation.preview_rows)),
    }


def source_asset(name: str, scfg: SourceConfig, cfg: ProjectConfig, registry: Registry) -> dg.AssetsDefinition:
    """``source_samples/<name>`` (and its quarantine) for one configured source."""
    impl = registry.get("source", scfg.plugin)
    key = dg.AssetKey(["source_samples", name])

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
        check_specs=[dg.AssetCheckSpec(ACCOUNTED_CHECK, asset=key,
                                       description=f"Nothing read is lost: {ROWS_EQUATION}.")],
    )
    def _source(context: dg.AssetExecutionContext,
                storage: StorageResource) -> Iterator[dg.Output[pl.DataFrame] | dg.AssetCheckResult]:
        source = registry.create("source", scfg.plugin, scfg.options, base_dir=cfg.base_dir)
        try:
            ing = engine.ingest(source, name, storage.media(), _limits(cfg))
        except engine.SourceFailed as exc:
            # Fail the asset, loudly; the message names the source (the innermost error is
            # what a summary shows), the reader's traceback goes along as metadata.
            trace = "".join(traceback.format_exception(exc.__cause__ or exc))
            raise dg.Failure(description=str(exc), metadata={"traceback": dg.MetadataValue.text(trace)}) from None
        prepared = engine.prepare_source_counted(ing.samples, scfg.quota, cfg.foundation.seed,
                                                 cfg.foundation.shards)
        kept, counts = prepared.samples, engine.row_accounting(ing, prepared)
        context.log.info(f"{name}: {counts}")
        yield dg.Output(kept, "samples", data_version=dg.DataVersion(frame_version(kept)),
                        metadata=_source_metadata(ing, kept, counts, storage, cfg))
        yield dg.Output(ing.quarantine, "quarantine", data_version=dg.DataVersion(frame_version(ing.quarantine)),
                        metadata={"dagster/row_count": ing.quarantine.height})
        outcome = checks.rows_accounted_for(counts)
        yield dg.AssetCheckResult(asset_key=key, check_name=ACCOUNTED_CHECK, passed=outcome.passed,
                                  metadata=outcome.metadata, severity=dg.AssetCheckSeverity.ERROR)

    return _source


def foundation_asset(cfg: ProjectConfig) -> dg.AssetsDefinition:
    """``foundation_samples``: every source's rows for one shard, deduplicated across sources."""
    ins = {f"src_{n}": dg.AssetIn(key=["source_samples", n]) for n in cfg.sources}

    @dg.asset(
        name="foundation_samples",
        group_name=GROUP,
        partitions_def=shards_partitions(cfg),
        backfill_policy=shards_backfill_policy(cfg),
        ins=ins,
        code_version=ENGINE_VERSION,
        kinds={"polars"},
    )
    def foundation_samples(context: dg.AssetExecutionContext, storage: StorageResource,
                           **sources: pl.DataFrame) -> dg.Output[Any]:
        """The QA samples of one shard, from every configured source.

        Shards are assigned by image content hash, so all questions about one image share a
        shard (its tool results are computed once). Rows are in the record schema of
        ``mmat_assets.records``; images are references into the media store. A backfill
        runs ``foundation.shards_per_run`` shards in one run, each written as its own partition.
        """
        def one(partition: str) -> tuple[pl.DataFrame, dict[str, Any]]:
            shard = int(partition)
            df = engine.foundation_shard(sources.values(), shard)
            from_sources = sum(src.filter(pl.col("shard") == shard).height for src in sources.values())
            key = context.asset_key
            read = {name[len("src_"):]: src for name, src in sources.items()}
            df = stamp_lineage(df, key.to_user_string(), partition,
                               context.assets_def.code_versions_by_key.get(key),
                               {f"source_samples/{n}": recorded_version(context, ["source_samples", n], None, src)
                                for n, src in read.items()})
            return df, {
                "dagster/row_count": df.height,
                "shard": shard,
                "rows_from_sources": from_sources,
                "rows_dropped_duplicate_across_sources": from_sources - df.height,
                "rows_by_source": dg.MetadataValue.md(counts_markdown(df, ["source", "subset"], "Rows by source")),
                "preview": dg.MetadataValue.md(
                    samples_markdown(df, storage.media().read, cfg.foundation.preview_rows)),
            }

        return shard_output(context, one)

    return foundation_samples


def _result(outcome: checks.Outcome) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=outcome.passed, metadata=outcome.metadata,
                               severity=dg.AssetCheckSeverity.ERROR)


def _each_shard(frames: dict[str, pl.DataFrame], validate: Callable[[pl.DataFrame], checks.Outcome]
                ) -> dg.AssetCheckResult:
    """One check over the shards a run covers: one shard's verdict as is; a batched run's
    passes when every shard's does, its metadata naming the shards that failed."""
    outcomes = {shard: validate(df) for shard, df in sorted(frames.items())}
    if len(outcomes) == 1:
        return _result(next(iter(outcomes.values())))
    failed = [shard for shard, o in outcomes.items() if not o.passed]
    first = outcomes[failed[0]].metadata if failed else {}
    return _result(checks.Outcome(not failed, {**first, "shards": ", ".join(outcomes),
                                               "failed_shards": ", ".join(failed) or "none"}))


def foundation_checks(cfg: ProjectConfig) -> list[dg.AssetChecksDefinition]:
    """Schema, unique ids, licence and image references of every Foundation shard (a batched
    run's shards are checked together: one verdict for the run)."""
    parts = shards_partitions(cfg)
    key = dg.AssetKey("foundation_samples")

    @dg.asset_check(asset=key, partitions_def=parts, description="Columns and types match the record schema.")
    def schema(foundation_samples: dict[str, pl.DataFrame]) -> dg.AssetCheckResult:
        return _each_shard(foundation_samples, checks.schema_matches)

    @dg.asset_check(asset=key, partitions_def=parts, description="sample_id is unique.")
    def unique_sample_ids(foundation_samples: dict[str, pl.DataFrame]) -> dg.AssetCheckResult:
        return _each_shard(foundation_samples, checks.unique_ids)

    @dg.asset_check(asset=key, partitions_def=parts, description="Every row names its licence.")
    def licence_present(foundation_samples: dict[str, pl.DataFrame]) -> dg.AssetCheckResult:
        return _each_shard(foundation_samples, checks.licence_present)

    @dg.asset_check(asset=key, partitions_def=parts, description="Every image reference resolves.")
    def images_resolve(foundation_samples: dict[str, pl.DataFrame], storage: StorageResource) -> dg.AssetCheckResult:
        exists = storage.media().exists
        return _each_shard(foundation_samples, lambda df: checks.images_resolve(df, exists))

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

