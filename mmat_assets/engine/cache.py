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
With ``root=None`` the cache is the local file alone. Without a ``work_dir`` the local file
lies in the system's temp folder, named by the storage root and the root's identity (a random
id written once to ``<root>/.store-id``): a store deleted and made again at the same place
starts empty instead of getting the old store's answers back from a file left behind.

Paid work once. :meth:`ResultCache.claim` (and :meth:`~ResultCache.aclaim`) is how paid work
goes through the cache: a miss is *claimed* with a lease (:mod:`mmat_assets.engine.leases`)
under ``<root>/<namespace>/<shard>/leases/`` (beside the local file when ``root`` is None)
before the work is done. The holder stores the answer locally and publishes it at once
as one small object, ``<root>/<namespace>/<shard>/answers/<key>.json`` (written whole),
before it releases the lease; a process that finds the claim live polls until the answer
object appears (or the lease expires and it takes the work over). A process that wins a
lease first looks again for the answer object and for segments it has not merged: the
answer may have landed just before. Answer objects are deleted only once a segment
holding them is uploaded (at ``close()``, and for other runs' answers at compaction), so
S3 still holds a few objects per shard at rest. Processes on one machine that share the
local file see each other's answers there at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from upath import UPath

from mmat_assets.engine.leases import (LEASE_S, WAIT_S, Lease, Leases, atomic_write, create_exclusive, is_local,
                                       lease_store, poll_delays, read_whole)

T = TypeVar("T")
#: What a claimed computation returns: its result, and the value to store (None: not cached).
Computed = tuple[T, Mapping[str, Any] | None]

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
    #: answers another process computed while this one waited on its claim
    waited: int = 0
    published: int = 0


class ResultCache:
    """A key -> JSON value store for one (namespace, shard); see the module docstring."""

    def __init__(self, root: str | Path | UPath | None, namespace: str, shard: int | str = 0,
                 work_dir: str | Path | None = None, flush_interval_s: float = 60.0,
                 compact_over: int = 8, leases: bool = True, lease_s: float = LEASE_S,
                 lease_wait_s: float = WAIT_S) -> None:
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
        self.lease_wait_s = lease_wait_s
        self.leases = Leases(lease_store(self._lease_dir()), lease_s) if leases else None
        #: lease and answer calls go over the network: async callers run them in a thread
        self._remote_io = self.remote is not None and not is_local(self.remote)
        self._published: set[str] = set()
        self._merged: set[str] = set()
        #: local storage roots: plain paths for the per-claim calls (pathlib would cost more)
        self._local_shard = self.remote.path if self.remote is not None and is_local(self.remote) else None
        self._listed_at: int | None = None  # the shard folder's mtime when its segments were last merged
        self._db = self._connect(self.local_path)
        self._recover()
        self._load_remote()

    # ------------------------------------------------------------------ public API

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored value of ``key`` (counted as a hit), or None (a miss)."""
        return self._count(self._lookup(key))

    def claim(self, key: str, compute: Callable[[], Computed[T]]) -> tuple[dict[str, Any] | None, T | None]:
        """``(stored value, None)`` if ``key`` is answered, here or by another process (waiting
        for a live claim on it); else ``(None, result)`` after running ``compute`` under this
        process's lease and storing and publishing its value (unless that is None)."""
        hit = self._lookup(key)
        if hit is not None or self.leases is None:
            return self._count(hit), (None if hit is not None else self._store(key, compute()))
        delays, first = poll_delays(self.lease_wait_s), True
        while True:
            lease, found = self._attempt(key, first)
            if found is not None:
                return self._count(found), None
            if lease is not None:
                try:
                    self._count(None)
                    return None, self._store(key, compute(), lease)
                finally:
                    self.leases.release(lease)
            first = False
            time.sleep(next(delays))

    async def aclaim(self, key: str, compute: Callable[[], Awaitable[Computed[T]]]
                     ) -> tuple[dict[str, Any] | None, T | None]:
        """:meth:`claim` for a coroutine; waits without blocking the event loop."""
        hit = self._lookup(key)
        if hit is not None or self.leases is None:
            return self._count(hit), (None if hit is not None else self._store(key, await compute()))
        delays, first = poll_delays(self.lease_wait_s), True
        while True:
            lease, found = await self._io(self._attempt, key, first)
            if found is not None:
                return self._count(found), None
            if lease is not None:
                try:
                    self._count(None)
                    computed = await compute()
                    return None, await self._io(self._store, key, computed, lease)
                finally:
                    await self._io(self.leases.release, lease)
            first = False
            await asyncio.sleep(next(delays))

    def put(self, key: str, value: Mapping[str, Any]) -> None:
        """Store ``value`` under ``key``; committed locally at once."""
        self._put_json(key, canonical_json(dict(value)))

    def _put_json(self, key: str, text: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO entries (key, value, created, segment) VALUES (?,?,?,?)",
                (key, text, time.time(), self.segment),
            )
            self._db.commit()
            self.stats.writes += 1
            self._unflushed += 1
            due = time.monotonic() - self._last_flush >= self.flush_interval_s
            if self.remote is not None and due:
                self.flush()

    def put_many(self, values: Mapping[str, Mapping[str, Any]]) -> None:
        """Store several values in one commit (all or none survive a kill), and upload
        this run's segment at once: they are records a rerun elsewhere must find."""
        with self._lock:
            now = time.time()
            self._db.executemany(
                "INSERT OR REPLACE INTO entries (key, value, created, segment) VALUES (?,?,?,?)",
                [(k, canonical_json(dict(v)), now, self.segment) for k, v in values.items()])
            self._db.commit()
            self.stats.writes += len(values)
            self._unflushed += len(values)
            self.flush()

    def note_status(self, name: str, value: Mapping[str, Any]) -> None:
        """Keep ``value`` as this shard's latest ``<name>.status.json`` beside its segments,
        for readers outside the run (a build's progress view); overwritten each time, never
        merged, and nothing without a storage root."""
        if self.remote is not None:
            atomic_write(self.remote / f"{name}.status.json", canonical_json(dict(value)).encode())

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
        if self.leases is not None:
            self.leases.close()
        with self._lock:
            self.flush()
            if self.remote is not None:
                self._drop_answers(self._own_published())
                self._db.execute("UPDATE entries SET segment = NULL WHERE segment = ?",
                                 (self.segment,))
                self._db.commit()
            self._db.close()

    def __enter__(self) -> ResultCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ claims

    def _lookup(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM entries WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def _count(self, value: dict[str, Any] | None) -> dict[str, Any] | None:
        with self._lock:
            if value is None:
                self.stats.misses += 1
            else:
                self.stats.hits += 1
        return value

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        # Local lease and answer calls take microseconds: a thread hop would cost more.
        return await asyncio.to_thread(fn, *args) if self._remote_io else fn(*args)

    def _attempt(self, key: str, first: bool) -> tuple[Lease | None, dict[str, Any] | None]:
        """One look: (our lease, None) to do the work, (None, answer), or (None, None) to wait."""
        assert self.leases is not None
        if not first:
            found = self._read_answer(key)
            if found is not None:
                self.stats.waited += 1
                return None, found
        lease = self.leases.acquire(key)
        if lease is None:
            return None, None
        try:
            found = self._answered_elsewhere(key)
        except BaseException:
            self.leases.release(lease)
            raise
        if found is not None:
            self.leases.release(lease)
            self.stats.waited += 1
            return None, found
        return lease, None

    def _answered_elsewhere(self, key: str) -> dict[str, Any] | None:
        """The answer another process stored since our first look (we hold the lease now)."""
        found = self._read_answer(key)  # without an answer object it looks in the local file
        if found is None and self.remote is not None and self._segments_changed():
            self._refresh_segments()  # its answer object may already be folded into a segment
            found = self._lookup(key)
        return found

    def _segments_changed(self) -> bool:
        """Whether segments may have come or gone since we merged: locally the shard folder's
        mtime says so for the price of a stat; on S3 only a listing can tell."""
        if self._local_shard is None:
            return True
        try:
            stamp = os.stat(self._local_shard).st_mtime_ns
        except FileNotFoundError:
            return False
        changed, self._listed_at = stamp != self._listed_at, stamp
        return changed

    def _read_answer(self, key: str) -> dict[str, Any] | None:
        if self.remote is None:
            return self._lookup(key)  # the local file is the shared store
        try:
            if self._local_shard is not None:
                with open(os.path.join(self._local_shard, "answers", key + ".json"), "rb") as f:
                    data = f.read()
            else:
                data = read_whole(self._answer_path(key))
        except FileNotFoundError:
            return self._lookup(key)  # a process sharing our local file may have stored it
        value = json.loads(data)
        self._insert(key, value)
        return value

    def _publish(self, key: str, data: bytes) -> None:
        """Write the answer object whole (a unique temporary name, then a rename; one PUT on S3)."""
        if self._local_shard is None:
            atomic_write(self._answer_path(key), data)
            return
        folder = os.path.join(self._local_shard, "answers")
        tmp = os.path.join(folder, f".{key}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileNotFoundError:
            os.makedirs(folder, exist_ok=True)
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, os.path.join(folder, key + ".json"))

    def _store(self, key: str, computed: Computed[T], lease: Lease | None = None) -> T:
        """Keep a claimed computation's value, locally and as its answer object; its result.
        Under ``lease`` on a local root, the lease file itself becomes the answer object."""
        result, value = computed
        if value is not None:
            text = canonical_json(dict(value))  # encoded once for the row and the answer object
            self._put_json(key, text)
            if self.remote is not None and self.leases is not None:
                data = text.encode("utf-8")
                if not (lease is not None and self._local_shard is not None and self.leases.release_as(
                        lease, data, os.path.join(self._local_shard, "answers", key + ".json"))):
                    self._publish(key, data)
                with self._lock:
                    self._published.add(key)
                    self.stats.published += 1
        return result

    def _insert(self, key: str, value: Mapping[str, Any]) -> None:
        """Keep another run's answer here too; our segment carries it from now on."""
        with self._lock:
            cur = self._db.execute(
                "INSERT OR IGNORE INTO entries (key, value, created, segment) VALUES (?,?,?,?)",
                (key, canonical_json(dict(value)), time.time(), self.segment))
            self._db.commit()
            self._unflushed += cur.rowcount

    def _answer_path(self, key: str) -> UPath:
        assert self.remote is not None
        return self.remote / "answers" / f"{key}.json"

    def _lease_dir(self) -> Path | UPath:
        if self.remote is not None:
            return self.remote / "leases"
        return self.local_path.with_name(f"{self.shard}.leases")

    def _own_published(self) -> list[str]:
        """Answer objects this run wrote whose rows its last upload holds."""
        mine = {r[0] for r in self._db.execute("SELECT key FROM entries WHERE segment = ?", (self.segment,))}
        return sorted(self._published & mine)

    def _drop_answers(self, keys: list[str]) -> None:
        for key in keys:  # safe only once an uploaded segment holds them: see the module doc
            with contextlib.suppress(FileNotFoundError):
                self._answer_path(key).unlink()

    # ------------------------------------------------------------------ local file

    def _local_path(self, work_dir: str | Path | None) -> Path:
        if work_dir is None:
            # Named by the storage root and its identity: a store deleted and made again at the
            # same place must not get the old one's answers back from a work file left behind.
            identity = store_id(self.remote.parent.parent) if self.remote is not None else ""
            tag = hashlib.sha256(f"{self.remote}\0{identity}".encode()).hexdigest()[:12]
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
        """Upload rows another run on this machine wrote but never flushed (it was killed,
        or it is still running and shares the local file).

        The rows become this run's, uploaded in its segment: uploading them under the
        other run's segment name would race with that run's own next upload of the name.
        """
        if self.remote is None:
            return
        with self._lock:
            cur = self._db.execute(
                "UPDATE entries SET segment = ? WHERE segment IS NOT NULL AND segment != ?",
                (self.segment, self.segment))
            self._db.commit()
            if cur.rowcount:
                self._upload_segment(self.segment)

    def _segments(self) -> list[UPath]:
        assert self.remote is not None
        if not is_local(self.remote):
            self.remote.fs.invalidate_cache(self.remote.path)  # other machines upload meanwhile
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

    def _refresh_segments(self) -> None:
        """Merge segments uploaded since we last looked; look again if one was compacted away."""
        for _ in range(3):
            fresh = [s for s in self._segments() if s.name not in self._merged]
            gone = [s for s in fresh if not self._merge_segment(s)]
            if not gone:
                return

    def _merge_segment(self, segment: UPath) -> bool:
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "segment.sqlite"
            try:
                local.write_bytes(read_whole(segment))  # a segment its run re-uploads meanwhile
            except FileNotFoundError:
                return False  # compacted away by another run after we listed it
            with self._lock:
                self._db.execute("ATTACH DATABASE ? AS seg", (str(local),))
                try:
                    cur = self._db.execute(
                        "INSERT OR IGNORE INTO entries (key, value, created, segment) "
                        "SELECT key, value, created, NULL FROM seg.entries")
                    self.stats.loaded += cur.rowcount
                    self._db.commit()
                finally:
                    self._db.execute("DETACH DATABASE seg")
                self._merged.add(segment.name)
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
            atomic_write(self.remote / f"{segment}.sqlite", local.read_bytes())
        self._merged.add(f"{segment}.sqlite")  # our own rows: never downloaded back
        self.stats.uploads += 1
        return True

    def _upload_segment(self, segment: str) -> None:
        self._upload(segment, only=segment)

    def _compact(self, merged: list[UPath]) -> None:
        """Replace many segments by one holding every row; upload first, delete after.

        Answer objects left by runs that never uploaded a segment (killed) are folded in and
        deleted too.
        """
        name = f"{self.segment}-compact"
        answers = [k for k in self._answer_keys() if self._lookup(k) is not None or self._read_answer(k)]
        if not self._upload(name, only=None):
            return
        for seg in merged:
            with contextlib.suppress(FileNotFoundError):  # another run compacted it first
                seg.unlink()
        self._drop_answers(answers)

    def _answer_keys(self) -> list[str]:
        assert self.remote is not None
        folder = self.remote / "answers"
        if not is_local(folder):
            folder.fs.invalidate_cache(folder.path)
        try:
            return sorted(p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json"))
        except (FileNotFoundError, NotADirectoryError):
            return []


def store_id(root: UPath) -> str:
    """The identity of the storage root ``root``: a random id kept in ``<root>/.store-id``,
    written once by whoever comes first (an exclusive create, a conditional put on S3)."""
    marker = root / ".store-id"
    try:
        return read_whole(marker).decode("ascii").strip()
    except FileNotFoundError:
        create_exclusive(marker, uuid.uuid4().hex.encode("ascii"))  # False: another process was first
    return read_whole(marker).decode("ascii").strip()


def _as_upath(root: str | Path | UPath) -> UPath:
    return root if isinstance(root, UPath) else UPath(str(root))


def claim_or_wait(cache: ResultCache | None, key: str, compute: Callable[[], Computed[T]]
                  ) -> tuple[dict[str, Any] | None, T | None]:
    """:meth:`ResultCache.claim`, or just ``compute`` when there is no cache."""
    return cache.claim(key, compute) if cache is not None else (None, compute()[0])


async def aclaim_or_wait(cache: ResultCache | None, key: str, compute: Callable[[], Awaitable[Computed[T]]]
                         ) -> tuple[dict[str, Any] | None, T | None]:
    """:meth:`ResultCache.aclaim`, or just ``compute`` when there is no cache."""
    return await cache.aclaim(key, compute) if cache is not None else (None, (await compute())[0])


__all__ = ["CacheStats", "Computed", "ResultCache", "aclaim_or_wait", "cache_key", "canonical_json",
           "claim_or_wait"]
