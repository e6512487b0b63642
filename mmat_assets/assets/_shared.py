"""What the shard-partitioned stage assets share: the teacher resource and the loop's
environment (teacher, tools, retriever, caches) for one shard.
No `from __future__ import annotations` here: Dagster reads resource annotations.
"""

import json
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import dagster as dg
from pydantic import Field

from mmat_assets.config import ProjectConfig
from mmat_assets.engine.cache import ResultCache
from mmat_assets.engine.rationale import Environment, StageSettings
from mmat_assets.engine.reflection import Declarations
from mmat_assets.engine.tools import available_tools, configured_retrievers
from mmat_assets.plugins import Registry
from mmat_assets.resources import StorageResource


class TeacherResource(dg.ConfigurableResource):
    """The configured teacher; its API key arrives through ``dg.EnvVar``, never as config text."""

    name: str = Field(description="Configured teacher name.")
    plugin: str = Field(description="Registered teacher implementation.")
    options_json: str = Field(default="{}", description="Teacher options as JSON (no secrets).")
    api_key: str | None = Field(default=None, description="API key (from an environment variable).")

    def create(self, registry: Registry, cfg: ProjectConfig) -> Any:
        options = json.loads(self.options_json)
        if self.api_key:
            options["api_key"] = self.api_key
        return registry.create("teacher", self.plugin, options, base_dir=cfg.base_dir)


def recorded_version(context: dg.AssetExecutionContext, key: list[str], partition: str | None,
                     frame: Any) -> str:
    """The data version Dagster recorded for an input table this step read, or its content
    hash if none is recorded (big tables read by many steps are not hashed again each time)."""
    from mmat_assets.versions import frame_version

    record = context.instance.get_latest_data_version_record(dg.AssetKey(key), False, partition)
    mat = record.asset_materialization if record else None
    version = mat.tags.get("dagster/data_version") if mat and mat.tags else None
    return version or frame_version(frame)


def tool_keys(cfg: ProjectConfig, registry: Registry) -> list[dg.AssetKey]:
    """The ``tools/<name>`` assets of every registered or configured tool."""
    tools = set(registry.role("tool")) | {k for k, v in cfg.tools.items() if v.enabled}
    return [dg.AssetKey(["tools", t]) for t in sorted(tools)]


def stage_deps(cfg: ProjectConfig, registry: Registry) -> list[dg.AssetKey]:
    """Tool and retriever assets a rationale depends on: upgrading one marks it stale."""
    keys = tool_keys(cfg, registry)
    if cfg.stages.retriever:
        keys.append(dg.AssetKey(["retrievers", cfg.stages.retriever]))
    return keys


@contextmanager
def shard_environment(cfg: ProjectConfig, registry: Registry, storage: StorageResource, teacher: TeacherResource,
                      shard: str) -> Iterator[Environment]:
    """Teacher, available tools, retriever and the shard's caches; caches flushed on exit."""
    t = teacher.create(registry, cfg)
    tools = available_tools(registry, cfg, {teacher.name: t})
    retriever = _retriever(cfg, registry, storage)
    root = storage.path("cache")
    caches = {ns: ResultCache(root, ns, shard, lease_s=cfg.stages.lease_s, lease_wait_s=cfg.stages.lease_wait_s)
              for ns in ("tools", "retrieval", "teacher")}
    media = storage.media()
    s = cfg.stages
    env = Environment(t, teacher.name, tools, retriever, caches["tools"], caches["retrieval"], caches["teacher"],
                      media.local_path, StageSettings(s.max_steps, s.rag_k, s.concurrency, s.tool_concurrency,
                                    budget_usd=s.budget_usd),
                      declarations=Declarations.from_registry(registry, cfg))
    try:
        yield env
    finally:
        for cache in caches.values():
            cache.close()


def _retriever(cfg: ProjectConfig, registry: Registry, storage: StorageResource) -> Any:
    """The configured retriever, pointed at the index its ``retrievers/<name>`` asset built."""
    from mmat_assets.assets.retrievers import index_dir

    name = cfg.stages.retriever
    if not name:
        return None
    found = configured_retrievers(registry, cfg, index_root=index_dir(storage, name)[0].parent).get(name)
    if found is None or found[0] is None or not found[1].ok:
        reason = found[1].reason if found else "not configured"
        raise RuntimeError(f"retriever {name!r} is not usable: {reason}")
    return found[0]


def shard_output(context: dg.AssetExecutionContext,
                 one: Callable[[str], tuple[Any, dict[str, Any]]]) -> dg.Output[Any]:
    """The output of a shard asset's run: ``one(shard)`` (a table and its metadata) for each
    shard the run covers. One shard: its table, as a run of one shard has always written it. A
    batched run (``BackfillPolicy.multi_run``): ``{shard: table}``, each stored as its own
    partition with its own metadata; Dagster records one data version for the whole run, the
    hash of the shards' versions."""
    from mmat_assets.versions import doc_version, frame_version

    tables = {shard: one(shard) for shard in context.partition_keys}
    if len(tables) == 1:
        ((df, meta),) = tables.values()
        return dg.Output(df, metadata=meta, data_version=dg.DataVersion(frame_version(df)))
    for shard, (_, meta) in tables.items():
        context.add_asset_metadata(meta, partition_key=shard)
    versions = {shard: frame_version(df) for shard, (df, _) in tables.items()}
    return dg.Output({shard: df for shard, (df, _) in tables.items()},
                     data_version=dg.DataVersion(doc_version(versions)))


def cache_metadata(env: Environment) -> dict[str, Any]:
    out = {}
    for ns, cache in (("tools", env.tool_cache), ("retrieval", env.retrieval_cache), ("teacher", env.request_cache)):
        if cache is not None:
            out[f"cache_{ns}_hits"] = cache.stats.hits
            out[f"cache_{ns}_misses"] = cache.stats.misses
    return out | env.teacher.shard_metadata(env.request_cache)
