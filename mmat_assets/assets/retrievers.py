"""Retrievers group: one asset per configured retriever, ``retrievers/<name>``.

An index-backed retriever builds its index (``Retriever.build``) under the storage root at
``retrievers/<name>``; an unchanged corpus, model and options reuse the index already
there. A remote search builds nothing. LanceDB needs a local directory here, so for an ``s3://`` root the
index is built in a local directory and the metadata says where. Row count, build time and
a few probe queries (latency, top titles) are recorded as metadata.
No `from __future__ import annotations` here: Dagster reads the context annotations.
"""

import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg

from mmat_assets.config import ComponentConfig, ProjectConfig
from mmat_assets.engine.tools import configured_retrievers
from mmat_assets.plugins import Registry
from mmat_assets.resources import StorageResource
from mmat_assets.versions import TIMING_KEYS, doc_version

PROBE_QUERIES = (
    "Who painted A Sunday Afternoon on the Island of La Grande Jatte?",
    "Which planet is known as the Red Planet?",
    "What is the capital city of Japan?",
)


def index_dir(storage: StorageResource, name: str) -> tuple[Path, str]:
    """Local directory for the index of ``name``, and a note when it is not the storage root."""
    target = storage.path("retrievers", name)
    if target.protocol in ("", "file", "local"):
        return Path(target.path), ""
    local = Path(tempfile.gettempdir()) / "mmat-retrievers" / name
    return local, f"storage root is remote ({target}); index built locally at {local}"


def probe_retriever(retriever: Any, queries: tuple[str, ...] = PROBE_QUERIES,
                    k: int = 3) -> list[dict[str, Any]]:
    """Each probe query's latency and top titles, or its error."""
    rows = []
    for query in queries:
        start = time.perf_counter()
        try:
            titles, error = [p.title for p in retriever.search(query, k)], None
        except Exception as exc:
            titles, error = [], f"{type(exc).__name__}: {exc}"
        rows.append({"query": query, "latency_s": round(time.perf_counter() - start, 4),
                     "top": titles, "error": error})
    return rows


def retriever_report(cfg: ProjectConfig, registry: Registry, name: str,
                     workdir: Path) -> dict[str, Any]:
    """Build (if the retriever builds) and probe one retriever (pure: no Dagster)."""
    retriever, avail = configured_retrievers(registry, cfg)[name]
    report: dict[str, Any] = {"retriever": name, "version": getattr(retriever, "version", None),
                              "available": avail.ok, "reason": avail.reason, "build": {},
                              "probes": []}
    if retriever is None or not avail.ok:
        return report
    start = time.perf_counter()
    built = dict(retriever.build(workdir))
    if built:  # an index was built (or reused): a remote search reports nothing
        report["build"] = {**built, "wall_s": round(time.perf_counter() - start, 2)}
    report["probes"] = probe_retriever(retriever)
    return report


def report_version(report: Mapping[str, Any]) -> str:
    """The data version of a retriever asset: its version, the index it built (fingerprint,
    rows) and which probes failed; not timings, reuse, or the probes' hits (a web search
    need not answer the same twice)."""
    build = {k: v for k, v in report["build"].items() if k != "reused"}
    probes = [{"query": p["query"], "failed": bool(p["error"])} for p in report["probes"]]
    return doc_version({**report, "build": build, "probes": probes}, TIMING_KEYS)


def _metadata(report: Mapping[str, Any], note: str) -> dict[str, Any]:
    build = report["build"]
    latencies = [p["latency_s"] for p in report["probes"] if not p["error"]]
    return {
        "version": str(report["version"]),
        "available": report["available"],
        "reason": report["reason"] or "-",
        "dagster/row_count": int(build.get("rows", 0)),
        "build_s": float(build.get("build_s", 0.0)),
        "index_reused": bool(build.get("reused", False)),
        "index_dir": note or "-",
        "build": dg.MetadataValue.json(dict(build)),
        "probes": dg.MetadataValue.json(report["probes"]),
        "probe_latency_s_max": max(latencies) if latencies else 0.0,
    }


def _retriever_asset(cfg: ProjectConfig, registry: Registry, name: str,
                     entry: ComponentConfig) -> dg.AssetsDefinition:
    @dg.asset(
        name=name, key_prefix=["retrievers"], group_name="retrievers",
        code_version=registry.version("retriever", entry.plugin or name),
        description=f"Retriever {name!r}: its search index and probe queries.",
        kinds={"lancedb"} if (entry.plugin or name) == "lancedb" else {"python"},
    )
    def _asset(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        workdir, note = index_dir(storage, name)
        report = retriever_report(cfg, registry, name, workdir)
        if not report["available"]:
            context.log.warning(f"retriever {name} is unavailable: {report['reason']}")
        return dg.MaterializeResult(metadata=_metadata(report, note or str(workdir)),
                                    data_version=dg.DataVersion(report_version(report)))

    return _asset


def build_retriever_assets(cfg: ProjectConfig, registry: Registry) -> list[dg.AssetsDefinition]:
    """One ``retrievers/<name>`` asset per enabled entry of ``retrievers`` in the config.

    Only configured ones: building an index can take minutes (the default Wikipedia corpus
    embeds ~10,000 summaries), so a project opts in by naming the retriever.
    """
    return [_retriever_asset(cfg, registry, name, entry)
            for name, entry in sorted(cfg.retrievers.items()) if entry.enabled]


__all__ = ["build_retriever_assets", "index_dir", "probe_retriever", "retriever_report"]
