"""Result cache for tool calls and retrieval, per (namespace, shard), local or on S3.

Design. Foundation puts every question about one image in one shard, so a shard's tool
results are only ever wanted by the run that processes that shard: the cache is split
the same way. A run opens ``ResultCache(root, namespace, shard)``; it works against one
local SQLite file (``<work_dir>/<namespace>/<shard>.sqlite``) and commits every write at
once, so a killed run keeps what it finished. The storage root (a directory or an
``s3://`` prefix, e.g. ``StorageResource.path("cache")``) holds *segments*:
``<root>/<namespace>/<shard>/<segment>.sqlite``, one per run that wrote something, each
uploaded whole (write-then-rename locally, one PUT on S3). Opening downloads and merges the
shard's segments; ``flush()`` (also at most every ``flush_interval_s`` while writing, and
on ``close()``) uploads this run's new rows as its own segment. Writers never touch each other's
segments, so many machines can work at once without losing a row; a shard with more than
``compact_over`` segments is compacted by whoever opens it (new merged segment first, then
the merged ones deleted), so S3 holds a few objects per shard instead of one per result.
Rows left unflushed by a killed run on the same machine are uploaded on the next open.
Errors are never cached: a failure may be transient, and a retry must be able to succeed.
With ``root=None`` the cache is the local file alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from upath import UPath

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    created REAL NOT NULL,
    segment TEXT
);
"""


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no spaces: equal arguments give equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=str)


def cache_key(name: str, version: str, args: Mapping[str, Any], image_sha256: str = "",
              options: Mapping[str, Any] | None = None) -> str:
    """sha256 of (name, version, canonical args, image hash, options).

    Options are part of the key because they change what a component returns (another
    detector model, another corpus); the component version covers changes to its code.
    """
    parts = [name, version, canonical_json(dict(args)), image_sha256,
             canonical_json(dict(options or {}))]
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()


@dataclass
class CacheStats:
    """Counters of one open cache."""

    hits: int = 0
    misses: int = 0
    writes: int = 0
    loaded: int = 0
    segments_read: int = 0
    uploads: int = 0


class ResultCache:
    """A key -> JSON value store for one (namespace, shard); see the module docstring."""

    def __init__(self, root: str | Path | UPath | None, namespace: str, shard: int | str = 0,
                 work_dir: str | Path | None = None, flush_interval_s: float = 60.0,
                 compact_over: int = 8) -> None:
        self.namespace = namespace
        self.shard = str(shard)
        self.remote = _as_upath(root) / namespace / self.shard if root is not None else None
        # Time-based, not per write: each upload re-sends the run's whole segment.
        self.flush_interval_s = flush_interval_s
        self.compact_over = compact_over
        self.segment = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:12]}"
        self.stats = CacheStats()
        self._lock = threading.RLock()
        self._unflushed = 0
        self._last_flush = time.monotonic()
        self.local_path = self._local_path(work_dir)
        self._db = self._connect(self.local_path)
        self._recover()
        self._load_remote()

    # ------------------------------------------------------------------ public API

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored value of ``key`` (counted as a hit), or None (a miss)."""
        with self._lock:
            row = self._db.execute("SELECT value FROM entries WHERE key = ?", (key,)).fetchone()
            if row is None:
                self.stats.misses += 1
                return None
            self.stats.hits += 1
            return json.loads(row[0])

    def put(self, key: str, value: Mapping[str, Any]) -> None:
        """Store ``value`` under ``key``; committed locally at once."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO entries (key, value, created, segment) VALUES (?,?,?,?)",
                (key, canonical_json(dict(value)), time.time(), self.segment),
            )
            self._db.commit()
            self.stats.writes += 1
            self._unflushed += 1
            due = time.monotonic() - self._last_flush >= self.flush_interval_s
            if self.remote is not None and due:
                self.flush()

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0])

    def flush(self) -> None:
        """Upload this run's rows as its segment (overwriting its previous upload)."""
        with self._lock:
            if self.remote is not None and self._unflushed:
                self._upload_segment(self.segment)
            self._unflushed = 0
            self._last_flush = time.monotonic()

    def close(self) -> None:
        """Flush, mark this run's rows as stored, and close the local file."""
        with self._lock:
            self.flush()
            if self.remote is not None:
                self._db.execute("UPDATE entries SET segment = NULL WHERE segment = ?",
                                 (self.segment,))
                self._db.commit()
            self._db.close()

    def __enter__(self) -> ResultCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ local file

    def _local_path(self, work_dir: str | Path | None) -> Path:
        if work_dir is None:
            tag = hashlib.sha256(str(self.remote).encode()).hexdigest()[:12]
            work_dir = Path(tempfile.gettempdir()) / "mmat-cache" / tag
        path = Path(work_dir) / self.namespace / f"{self.shard}.sqlite"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        # One connection shared by the tool threads, guarded by our lock; WAL so another
        # process on the same shard can read while we write.
        db = sqlite3.connect(str(path), check_same_thread=False, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(SCHEMA)
        return db

    # ------------------------------------------------------------------ remote segments

    def _recover(self) -> None:
        """Upload rows a killed earlier run on this machine wrote but never flushed."""
        if self.remote is None:
            return
        left = [r[0] for r in self._db.execute(
            "SELECT DISTINCT segment FROM entries WHERE segment IS NOT NULL AND segment != ?",
            (self.segment,))]
        for segment in left:
            self._upload_segment(segment)
            self._db.execute("UPDATE entries SET segment = NULL WHERE segment = ?", (segment,))
        self._db.commit()

    def _segments(self) -> list[UPath]:
        assert self.remote is not None
        try:
            return sorted(p for p in self.remote.iterdir() if p.name.endswith(".sqlite"))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _load_remote(self) -> None:
        if self.remote is None:
            return
        segments = self._segments()
        merged = [s for s in segments if self._merge_segment(s)]
        self.stats.segments_read = len(merged)
        if len(merged) > self.compact_over:
            self._compact(merged)

    def _merge_segment(self, segment: UPath) -> bool:
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "segment.sqlite"
            try:
                local.write_bytes(segment.read_bytes())
            except FileNotFoundError:
                return False  # compacted away by another run after we listed it
            self._db.execute("ATTACH DATABASE ? AS seg", (str(local),))
            try:
                cur = self._db.execute(
                    "INSERT OR IGNORE INTO entries (key, value, created, segment) "
                    "SELECT key, value, created, NULL FROM seg.entries")
                self.stats.loaded += cur.rowcount
                self._db.commit()
            finally:
                self._db.execute("DETACH DATABASE seg")
        return True

    def _export(self, path: Path, segment: str | None) -> int:
        """Write rows of ``segment`` (or every row when None) into a fresh SQLite file."""
        path.unlink(missing_ok=True)
        self._db.execute("ATTACH DATABASE ? AS out", (str(path),))
        try:
            self._db.execute("CREATE TABLE out.entries (key TEXT PRIMARY KEY, value TEXT NOT NULL, "
                             "created REAL NOT NULL, segment TEXT)")
            where, params = ("WHERE segment = ?", (segment,)) if segment else ("", ())
            cur = self._db.execute(
                f"INSERT INTO out.entries SELECT key, value, created, NULL FROM entries {where}",
                params)
            self._db.commit()
            return cur.rowcount
        finally:
            self._db.execute("DETACH DATABASE out")

    def _upload(self, segment: str, only: str | None) -> bool:
        assert self.remote is not None
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "out.sqlite"
            if self._export(local, only) == 0:
                return False
            _atomic_write(self.remote / f"{segment}.sqlite", local.read_bytes())
        self.stats.uploads += 1
        return True

    def _upload_segment(self, segment: str) -> None:
        self._upload(segment, only=segment)

    def _compact(self, merged: list[UPath]) -> None:
        """Replace many segments by one holding every row; upload first, delete after."""
        name = f"{self.segment}-compact"
        if not self._upload(name, only=None):
            return
        for seg in merged:
            with contextlib.suppress(FileNotFoundError):  # another run compacted it first
                seg.unlink()


def _as_upath(root: str | Path | UPath) -> UPath:
    return root if isinstance(root, UPath) else UPath(str(root))


def _atomic_write(path: UPath, data: bytes) -> None:
    """Write whole: rename from a part file locally; one PUT (already atomic) on S3."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.protocol in ("", "file", "local"):
        part = path.with_name(path.name + ".part")
        part.write_bytes(data)
        part.rename(path)
    else:
        path.write_bytes(data)


__all__ = ["CacheStats", "ResultCache", "cache_key", "canonical_json"]
