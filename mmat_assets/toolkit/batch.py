"""Turn-synchronous batches for a teacher behind a Batch API (OpenAI's ``/v1/batches``).

A teacher in batch mode hands each request body to the :class:`BatchCollector` of its event
loop (one per shard) and awaits the result. The collector holds requests until every row the
engine reported live (:meth:`~mmat_assets.contracts.Teacher.rows_live`) waits on one, or
until none has joined for ``collect_s``; then turn k of the whole shard leaves together:
written as JSONL (``custom_id`` = the request hash), split at the provider's limits, uploaded
and submitted, and polled with backoff. On completion the output and error files are read:
an answer resolves its request; an expired or failed item (or every item of a failed batch)
is submitted again in the next batch, at most ``resubmits`` times, then fails with the reason
``batch_expired`` or ``batch_failed``.

Resume. Before a batch is created, each item's submission is recorded in the shard's store
(the request cache) as ``batch:item:<custom_id>:<try>`` -> input file, in one write; once
created, ``batch:file:<file>`` -> batch id. A rerun asked the same request finds the record
and polls that batch instead of submitting again; a batch whose creation was never recorded
is looked up among the provider's batches by its input file before one is created. Records
are never rewritten, so segments merged in any order agree.

Progress. Each status poll that finds a change also hands the shard's batches (status and
request counts) to the store's ``note_status`` where it has one: the request cache writes
them next to its segments (:data:`STATUS_FILE`), where a build's progress view reads every
shard's with :func:`batch_progress_under`, from outside the runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from mmat_assets.contracts import TeacherError

log = logging.getLogger(__name__)

#: Batch statuses after which nothing changes any more.
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
#: Item status codes worth another submission (the provider's transient failures).
TRANSIENT = frozenset({408, 409, 429, 500, 502, 503, 504})
#: The name under which a shard's batch statuses are noted (the cache's ``<name>.status.json``).
STATUS_FILE = "batches"


class BatchStore(Protocol):
    """Where submissions are recorded: the shard's request cache fits."""

    def get(self, key: str) -> dict[str, Any] | None: ...

    def put_many(self, values: Mapping[str, Mapping[str, Any]]) -> None: ...

    # Optional: ``note_status(name, value)`` keeps the latest ``value`` under ``name`` for
    # readers outside the run (the request cache writes ``<name>.status.json``).


class BatchTransport(Protocol):
    """The provider's Batch API, as the collector uses it."""

    async def upload(self, data: bytes) -> str:
        """Upload a JSONL batch input file; its file id."""

    async def create(self, file_id: str) -> str:
        """Create a batch from an uploaded file; the batch id."""

    async def find(self, file_id: str) -> str | None:
        """The batch already created from ``file_id``, if any."""

    async def retrieve(self, batch_id: str) -> dict[str, Any]:
        """The batch object (``status``, ``output_file_id``, ``error_file_id``, ``errors``)."""

    async def content(self, file_id: str) -> bytes:
        """A file's bytes."""


@dataclass(frozen=True)
class BatchLimits:
    """How batches are cut, polled and retried."""

    max_requests: int = 50_000
    max_bytes: int = 200 * 1024 * 1024
    collect_s: float = 5.0
    poll_s: float = 15.0
    poll_max_s: float = 300.0
    resubmits: int = 2
    endpoint: str = "/v1/chat/completions"


@dataclass(frozen=True)
class ItemResult:
    """One request's answer in a batch output file: HTTP status and response body."""

    status_code: int
    body: dict[str, Any]


@dataclass
class _Item:
    custom_id: str
    line: bytes
    futures: list[asyncio.Future[ItemResult]] = field(default_factory=list)
    tries: int = 0


@dataclass
class BatchStats:
    """What a shard's batches did, for logs, progress and asset metadata."""

    batches: int = 0
    items: int = 0
    resubmitted: int = 0
    resumed: int = 0
    failed_items: int = 0
    #: items per batch, in submission order (one turn may need several at the limits)
    sizes: list[int] = field(default_factory=list)
    #: batch id -> last status seen
    status: dict[str, str] = field(default_factory=dict)

    def as_metadata(self) -> dict[str, Any]:
        return {"batches": self.batches, "batch_items": self.items, "batch_resubmitted": self.resubmitted,
                "batch_resumed": self.resumed, "batch_failed_items": self.failed_items,
                "batch_status": ", ".join(f"{k}: {n}" for k, n in sorted(Counter(self.status.values()).items()))
                or "none"}


def item_key(custom_id: str, tries: int) -> str:
    return f"batch:item:{custom_id}:{tries}"


def file_key(file_id: str) -> str:
    return f"batch:file:{file_id}"


def request_line(custom_id: str, body: Mapping[str, Any], endpoint: str) -> bytes:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": endpoint, "body": body},
                      ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


def split_lines(lines: list[bytes], max_requests: int, max_bytes: int) -> list[list[bytes]]:
    """Chunks of at most ``max_requests`` lines and ``max_bytes`` bytes (a longer single line
    goes alone: the provider then rejects that one batch, with its reason)."""
    chunks: list[list[bytes]] = []
    size = 0
    for line in lines:
        if not chunks or len(chunks[-1]) >= max_requests or size + len(line) > max_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append(line)
        size += len(line)
    return chunks


class BatchCollector:
    """The batch queue of one event loop (one shard); see the module docstring."""

    def __init__(self, transport: BatchTransport, limits: BatchLimits) -> None:
        self.transport = transport
        self.limits = limits
        self.store: BatchStore | None = None
        self.live: int | None = None
        self.stats = BatchStats()
        #: batch id -> {"seen": its status and request counts at the last change, "updated": when}
        self.progress: dict[str, dict[str, Any]] = {}
        self._pending: dict[str, _Item] = {}
        self._flying: dict[str, _Item] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ joining

    def set_live(self, live: int, store: BatchStore | None) -> None:
        """How many rows may still send a request; a turn leaves once all of them wait."""
        self.live = max(live, 0)
        if store is not None:
            self.store = store
        self._check()

    async def send(self, custom_id: str, body: Mapping[str, Any]) -> ItemResult:
        """Queue one request for the next batch; its result once that batch is done."""
        future: asyncio.Future[ItemResult] = asyncio.get_running_loop().create_future()
        same = self._pending.get(custom_id) or self._flying.get(custom_id)
        if same is not None:  # two rows asking the very same request share its answer
            same.futures.append(future)
        else:
            item = _Item(custom_id, request_line(custom_id, body, self.limits.endpoint), [future])
            self._pending[custom_id] = item
        self._check()
        return await future

    def _waiting(self) -> int:
        return sum(len(i.futures) for i in (*self._pending.values(), *self._flying.values()))

    def _check(self) -> None:
        if not self._pending:
            return
        if self.live is not None and self._waiting() >= self.live:
            self._flush()
            return
        # Rows the engine did not count (or still running tools) get collect_s to join.
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(self.limits.collect_s, self._flush)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        items = list(self._pending.values())
        self._pending.clear()
        if not items:
            return
        self._flying.update((i.custom_id, i) for i in items)
        task = asyncio.get_running_loop().create_task(self._submit(items))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ submitting

    async def _submit(self, items: list[_Item]) -> None:
        left = {i.custom_id: i for i in items}  # not yet followed by a poller
        try:
            resumed, fresh = await asyncio.to_thread(self._recorded, items)
            # a recorded input file (str) is polled again; fresh lines (bytes) are submitted
            groups: list[tuple[str | bytes, list[_Item]]] = list(resumed.items())
            by_line = {i.line: i for i in fresh}
            chunks = split_lines([i.line for i in fresh], self.limits.max_requests, self.limits.max_bytes)
            groups += [(b"".join(chunk), [by_line[line] for line in chunk]) for chunk in chunks]
            for source, group in groups:
                batch_id = (await self._batch_of(source, len(group)) if isinstance(source, str)
                            else await self._new_batch(source, group))
                self._follow_later(batch_id, group)
                for item in group:
                    left.pop(item.custom_id, None)
        except Exception as exc:  # a failed upload or creation fails what it carried, with why
            self._fail(left.values(), exc)

    def _recorded(self, items: list[_Item]) -> tuple[dict[str, list[_Item]], list[_Item]]:
        """Items a previous run already submitted (by input file), and the fresh ones."""
        resumed: dict[str, list[_Item]] = {}
        fresh: list[_Item] = []
        for item in items:
            record = None
            if self.store is not None:
                tries = item.tries
                while (found := self.store.get(item_key(item.custom_id, tries))) is not None:
                    record, item.tries = found, tries
                    tries += 1
            if record is not None:
                resumed.setdefault(str(record["file"]), []).append(item)
                self.stats.resumed += 1
            else:
                fresh.append(item)
        return resumed, fresh

    async def _batch_of(self, file_id: str, size: int) -> str:
        """The batch of a recorded input file: recorded, found at the provider, or created now."""
        record = self.store.get(file_key(file_id)) if self.store is not None else None
        if record is not None:
            return str(record["batch"])
        batch_id = await self.transport.find(file_id)
        if batch_id is None:
            batch_id = await self.transport.create(file_id)
            self._count(batch_id, size)
        await self._record({file_key(file_id): {"batch": batch_id}})
        return batch_id

    async def _new_batch(self, data: bytes, group: list[_Item]) -> str:
        file_id = await self.transport.upload(data)
        # Recorded before the batch exists: a run killed in between finds it by its file.
        await self._record({item_key(i.custom_id, i.tries): {"file": file_id} for i in group})
        batch_id = await self.transport.create(file_id)
        await self._record({file_key(file_id): {"batch": batch_id}})
        self._count(batch_id, len(group))
        log.info("batch %s submitted: %d requests", batch_id, len(group))
        return batch_id

    def _count(self, batch_id: str, size: int) -> None:
        self.stats.batches += 1
        self.stats.items += size
        self.stats.sizes.append(size)
        self.stats.status[batch_id] = "submitted"

    async def _record(self, values: dict[str, dict[str, Any]]) -> None:
        if self.store is not None:
            await asyncio.to_thread(self.store.put_many, values)

    # ------------------------------------------------------------------ polling

    def _follow_later(self, batch_id: str, group: list[_Item]) -> None:
        task = asyncio.get_running_loop().create_task(self._follow(batch_id, group))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _follow(self, batch_id: str, group: list[_Item]) -> None:
        try:
            info = await self._poll(batch_id)
            results = await self._results(info)
        except Exception as exc:
            self._fail(group, exc)
            return
        why = _batch_failure(info)
        for item in group:
            self._settle(item, results.get(item.custom_id), why)
        self._check()

    async def _poll(self, batch_id: str) -> dict[str, Any]:
        delay, started = self.limits.poll_s, time.monotonic()
        while True:
            info = await self.transport.retrieve(batch_id)
            status = str(info.get("status"))
            counts = info.get("request_counts") or {}
            if self.stats.status.get(batch_id) != status:
                log.info("batch %s: %s (%s/%s done, %.0fs)", batch_id, status, counts.get("completed", "?"),
                         counts.get("total", "?"), time.monotonic() - started)
                self.stats.status[batch_id] = status
            await self._note(batch_id, status, counts)
            if status in TERMINAL:
                return info
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, self.limits.poll_max_s)

    async def _note(self, batch_id: str, status: str, counts: Mapping[str, Any]) -> None:
        """Hand the shard's batches to the store's ``note_status`` when one of them changed."""
        seen = {"status": status, **{k: _int(counts.get(k)) for k in ("total", "completed", "failed")}}
        if self.progress.get(batch_id, {}).get("seen") == seen:
            return
        self.progress[batch_id] = {"seen": seen, "updated": time.time()}
        note = getattr(self.store, "note_status", None)
        if note is None:
            return
        snapshot = {b: {**p["seen"], "updated": p["updated"]} for b, p in self.progress.items()}
        try:
            await asyncio.to_thread(note, STATUS_FILE, {"batches": snapshot})
        except Exception as exc:  # progress is for people: a storage hiccup must not fail the shard
            log.warning("could not note the batch status: %s", exc)

    async def _results(self, info: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """custom_id -> its output or error line, from both files of a finished batch."""
        out: dict[str, dict[str, Any]] = {}
        for key in ("error_file_id", "output_file_id"):  # an answer wins over an error line
            file_id = info.get(key)
            if file_id:
                for line in (await self.transport.content(str(file_id))).splitlines():
                    if line.strip():
                        row = json.loads(line)
                        out[str(row.get("custom_id"))] = row
        return out

    def _settle(self, item: _Item, row: dict[str, Any] | None, batch_failure: str) -> None:
        response = (row or {}).get("response") or {}
        code = int(response.get("status_code") or 0)
        body = response.get("body")
        if code and isinstance(body, dict) and code not in TRANSIENT:
            self._flying.pop(item.custom_id, None)
            for future in item.futures:
                if not future.done():
                    future.set_result(ItemResult(code, body))
            return
        error = (row or {}).get("error") or {}
        code_name = str(error.get("code") or (f"http_{code}" if code else "") or batch_failure or "missing")
        detail = str(error.get("message") or batch_failure or "not in the batch's output or error file")
        self._retry(item, code_name, detail)

    def _retry(self, item: _Item, code: str, detail: str) -> None:
        self._flying.pop(item.custom_id, None)
        if item.tries < self.limits.resubmits:
            item.tries += 1
            self.stats.resubmitted += 1
            self._pending[item.custom_id] = item
            return
        reason = "batch_expired" if "expired" in code else "batch_failed"
        self._fail([item], TeacherError(reason, f"{code}: {detail} (after {item.tries + 1} submission(s))"))

    def _fail(self, items: Iterable[_Item], exc: BaseException) -> None:
        error = exc if isinstance(exc, TeacherError) else TeacherError("batch_failed", f"{type(exc).__name__}: {exc}")
        for item in items:
            self._flying.pop(item.custom_id, None)
            self.stats.failed_items += 1
            for future in item.futures:
                if not future.done():
                    future.set_exception(error)


def _batch_failure(info: Mapping[str, Any]) -> str:
    """Why a whole batch ended without answers ('' for a completed one)."""
    status = str(info.get("status"))
    if status == "completed":
        return ""
    errors = (info.get("errors") or {}).get("data") or []
    why = "; ".join(str(e.get("message") or e.get("code")) for e in errors if isinstance(e, dict))
    return f"batch_{status}" + (f": {why}" if why else "")


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


@dataclass
class BatchProgress:
    """The batches of a build's shards, as the progress view shows them."""

    #: status -> batches, over batches updated since the build started
    statuses: dict[str, int] = field(default_factory=dict)
    #: requests done (completed + failed) and in all, over the batches not yet finished
    done: int = 0
    total: int = 0

    def text(self) -> str:
        """``batches: 2 in_progress, 1 completed (1,200/5,000 requests in the open ones)``."""
        if not self.statuses:
            return ""
        parts = ", ".join(f"{n} {s}" for s, n in sorted(self.statuses.items()))
        open_ = f" ({self.done:,}/{self.total:,} requests in the open ones)" if self.total else ""
        return f"batches: {parts}{open_}"


def batch_progress_under(folder: Any, since: float = 0.0) -> BatchProgress:
    """Every shard's noted batch statuses under a request cache namespace's folder (a path
    or UPath: ``<root>/cache/teacher``), counting batches updated at or after ``since``."""
    out = BatchProgress()
    if hasattr(folder, "fs") and hasattr(folder.fs, "invalidate_cache"):
        folder.fs.invalidate_cache(folder.path)  # other machines write meanwhile
    try:
        shards = sorted(p for p in folder.iterdir() if p.is_dir())
    except (FileNotFoundError, NotADirectoryError):
        return out
    for shard in shards:
        try:
            noted = json.loads((shard / f"{STATUS_FILE}.status.json").read_text(encoding="utf-8"))
            batches = noted["batches"].values()
        except (OSError, ValueError, KeyError, AttributeError, TypeError):
            continue  # not noted yet, or replaced as it was read: the next refresh shows it
        for b in batches:
            if not isinstance(b, dict) or float(b.get("updated") or 0) < since:
                continue
            status = str(b.get("status"))
            out.statuses[status] = out.statuses.get(status, 0) + 1
            if status not in TERMINAL:
                out.done += _int(b.get("completed")) + _int(b.get("failed"))
                out.total += _int(b.get("total"))
    return out


__all__ = ["STATUS_FILE", "BatchCollector", "BatchLimits", "BatchProgress", "BatchStats", "BatchStore",
           "BatchTransport", "ItemResult", "batch_progress_under", "file_key", "item_key", "request_line",
           "split_lines"]
