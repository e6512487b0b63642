"""Data versions and code versions: what makes staleness in the Dagster UI true.

**Data versions are content hashes**, computed with :mod:`hashlib` (Python's ``hash()``
differs between processes): a table's version is the sha256 of its schema and its rows as
NDJSON, a JSON document's the sha256 of its canonical JSON, a folder of files the sha256 of
names and bytes. Re-materializing an asset that produces the same content keeps its version, so
nothing downstream turns stale for nothing.

**Code versions chain.** Each asset declares its own code version (its logic, the plugin
versions it runs, the prompt version). :func:`chain_code_versions` then rewrites every
asset's code version to ``own+h`` where ``h`` hashes the chained versions of its upstream
assets. Changing a tool's version or a prompt therefore gives exactly the assets
downstream of it a new code version (Dagster shows them stale at once), and leaves every
other asset as it was.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl

#: Facts about one run, not about the data, in a row's provenance JSON: whether a teacher
#: answer came from the request cache. A resumed run gives the same rows with other flags,
#: and must keep the data version (or everything downstream would turn stale for nothing).
RUN_FLAGS = r'"cached": (?:true|false)(?:, )?'

#: The per-row lineage stamps (records.py): left out of table versions, or one new source
#: row would change every shard's version through the source version each row records.
LINEAGE_COLUMN = "lineage"

#: Hex digits kept of a sha256 (64 bits: no collision in any project's lifetime of versions).
DIGITS = 16


class _HashSink(io.RawIOBase):
    """A write-only file that hashes what is written (no copy of the table in memory)."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.sha.update(b)
        return len(b)


def frame_version(df: pl.DataFrame) -> str:
    """Content hash of a table: schema and values, independent of memory layout.

    Values are hashed as NDJSON, not as Arrow IPC: IPC bytes of string-view columns depend
    on how their buffers happen to be laid out (a gathered frame and the same frame read
    back from Parquet differ), NDJSON only on the values.
    """
    if LINEAGE_COLUMN in df.columns:  # where rows came from is not what they hold
        df = df.drop(LINEAGE_COLUMN)
    sink = _HashSink()
    sink.sha.update(str(df.schema).encode())
    if df.schema.get("provenance") == pl.String:
        df = df.with_columns(pl.col("provenance").str.replace_all(RUN_FLAGS, ""))
    with io.BufferedWriter(sink) as out:  # a binary file object, as write_ndjson takes
        df.write_ndjson(out)
    return sink.sha.hexdigest()[:DIGITS]


#: Keys that measure a run (how long it took), not what it produced.
TIMING_KEYS = frozenset({"seconds", "latency_s", "wall_s", "build_s", "embed_s", "tokens_per_s"})


def _without(obj: Any, keys: Collection[str]) -> Any:
    if isinstance(obj, Mapping):
        return {k: _without(v, keys) for k, v in obj.items() if k not in keys}
    if isinstance(obj, list | tuple):
        return [_without(v, keys) for v in obj]
    return obj


def doc_version(obj: Any, ignore: Collection[str] = ()) -> str:
    """Content hash of a JSON-able document (keys sorted, so order does not matter); keys in
    ``ignore`` are left out at every depth (e.g. :data:`TIMING_KEYS`)."""
    if ignore:
        obj = _without(obj, ignore)
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:DIGITS]


def files_version(paths: Iterable[Path | str]) -> str:
    """Content hash of files: each one's name and bytes, in name order."""
    sha = hashlib.sha256()
    for p in sorted(Path(x) for x in paths):
        sha.update(p.name.encode())
        sha.update(b"\0")
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                sha.update(block)
    return sha.hexdigest()[:DIGITS]


def tree_version(root: Path) -> str:
    """Content hash of every file under ``root`` (relative paths and bytes)."""
    sha = hashlib.sha256()
    for p in sorted(x for x in root.rglob("*") if x.is_file()):
        sha.update(str(p.relative_to(root)).encode())
        sha.update(b"\0")
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                sha.update(block)
    return sha.hexdigest()[:DIGITS]


def chained(own: str, upstream: Sequence[str]) -> str:
    """``own`` alone for a root asset, else ``own+`` a hash of the upstream versions."""
    if not upstream:
        return own
    return f"{own}+{hashlib.sha256('|'.join(sorted(upstream)).encode()).hexdigest()[:8]}"


def chain_code_versions(assets: Sequence[Any]) -> list[Any]:
    """Every ``dg.AssetsDefinition`` with its code versions chained through its upstream.

    An asset without a declared code version counts as version ``0``. Upstream keys that are
    not defined here (external assets) are left out of the chain.
    """
    specs = {s.key: s for a in assets for s in a.specs}
    deps = {k: [d.asset_key for d in s.deps if d.asset_key in specs] for k, s in specs.items()}
    done: dict[Any, str] = {}

    def version(key: Any, seen: frozenset[Any] = frozenset()) -> str:
        if key not in done:
            if key in seen:
                raise ValueError(f"dependency cycle through {key.to_user_string()}")
            ups = [version(d, seen | {key}) for d in deps[key]]
            done[key] = chained(specs[key].code_version or "0", ups)
        return done[key]

    for key in specs:
        version(key)
    return [a.map_asset_specs(lambda s: s.replace_attributes(code_version=done[s.key])) for a in assets]


def descendants(assets: Sequence[Any], roots: Iterable[Any]) -> set[Any]:
    """Keys downstream of ``roots`` (inclusive) in the graph of ``assets``."""
    children: dict[Any, set[Any]] = {}
    for a in assets:
        for s in a.specs:
            for d in s.deps:
                children.setdefault(d.asset_key, set()).add(s.key)
    out, todo = set(), list(roots)
    while todo:
        k = todo.pop()
        if k not in out:
            out.add(k)
            todo.extend(children.get(k, ()))
    return out

