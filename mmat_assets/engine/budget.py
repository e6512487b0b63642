"""The build's spending cap (``stages.budget_usd``, ``mmat build --budget``).

Spend is what the request caches recorded: the ``cost_usd`` of every answer stored in the
teacher namespace, over every shard and every process that writes there, deduplicated by
request hash (an answer stored in a segment and still published as an answer object is
one answer). It is read from the storage root, where every claimed answer is published as
it arrives (:mod:`mmat_assets.engine.cache`), so processes on other shards and other
machines count. A process re-reads it at most every ``refresh_s`` and adds its own answers
as they come in between, so its own spend is never stale.

:meth:`Budget.allows` is asked before each new (uncached) request. Once the cap is
reached no new request is sent; requests already in flight finish and are stored, so the
overshoot is at most what the requests in flight cost. A refused request raises
:class:`BudgetExhausted`; the row ends ``budget_exhausted``, not failed, and a rerun with a
higher cap resumes it from the cache without repeating a request.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from upath import UPath

from mmat_assets.contracts import TeacherError
from mmat_assets.engine.cache import ResultCache
from mmat_assets.engine.leases import read_whole

#: The TeacherError reason, row failure and row status of a request the cap refused.
BUDGET_REASON = "budget_exhausted"
#: Exit code of a build stopped by its budget (``mmat build``).
BUDGET_EXIT_CODE = 3


def row_status(failure: str | None) -> str:
    """A stage row's status: ``ok``; ``budget_exhausted`` where the cap stopped it (the
    rationale's reason, or a judge request refused in reflection); else ``failed``."""
    if not failure:
        return "ok"
    return BUDGET_REASON if failure in (BUDGET_REASON, f"teacher_{BUDGET_REASON}") else "failed"


class BudgetExhausted(TeacherError):
    """The budget was spent before this request could be sent; nothing was sent."""

    def __init__(self, cap_usd: float, spent_usd: float) -> None:
        super().__init__(BUDGET_REASON, f"budget of ${cap_usd:.4f} reached (${spent_usd:.4f} recorded); "
                         "raise stages.budget_usd (mmat build --budget) and rerun to resume")


class Budget:
    """The cap, and what the request caches of all shards have recorded against it."""

    def __init__(self, cap_usd: float, cache: ResultCache | None, refresh_s: float = 2.0) -> None:
        self.cap_usd = cap_usd
        self.cache = cache
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._recorded = recorded_spend(cache)
        self._read_at = time.monotonic()
        self._since_read = 0.0  # own answers stored since the last read
        #: requests this process was refused
        self.refused = 0

    @property
    def spent_usd(self) -> float:
        with self._lock:
            return self._recorded + self._since_read

    def allows(self) -> bool:
        """Whether a new request may be sent now (re-reads the caches when due)."""
        if time.monotonic() - self._read_at >= self.refresh_s:
            recorded = recorded_spend(self.cache)
            with self._lock:
                self._recorded, self._since_read, self._read_at = recorded, 0.0, time.monotonic()
        if self.spent_usd < self.cap_usd:
            return True
        with self._lock:
            self.refused += 1
        return False

    def check(self) -> None:
        """Raise :class:`BudgetExhausted` unless a new request may be sent."""
        if not self.allows():
            raise BudgetExhausted(self.cap_usd, self.spent_usd)

    def charge(self, usd: float) -> None:
        """Count an answer this process just stored."""
        with self._lock:
            self._since_read += max(float(usd), 0.0)



def recorded_spend(cache: ResultCache | None) -> float:
    """USD of every answer recorded in ``cache``'s namespace, all shards, deduplicated.

    With a storage root: its segments and published answer objects of every shard, plus
    this cache's own local file (answers not yet published when leases are off). Without
    one: the local files of the namespace in this cache's work directory."""
    costs: dict[str, float] = {}
    if cache is None:  # nothing recorded anywhere: only this process's own tally counts
        return 0.0
    if cache.remote is not None:
        for shard in _dirs(cache.remote.parent):
            for segment in _files(shard, ".sqlite"):
                costs.update(_segment_costs(segment))
            for answer in _files(shard / "answers", ".json"):
                costs.update(_answer_cost(answer))
        costs.update(_local_costs(cache.local_path))
    else:
        for local in sorted(cache.local_path.parent.glob("*.sqlite")):
            costs.update(_local_costs(local))
    return sum(costs.values())


def spend_under(folder: UPath) -> float:
    """USD of every answer recorded under a request cache namespace's folder on the storage
    root (``<root>/cache/teacher``): every shard's segments and published answer objects,
    deduplicated; what a build's progress view shows, read from outside the workers."""
    costs: dict[str, float] = {}
    for shard in _dirs(folder):
        for segment in _files(shard, ".sqlite"):
            costs.update(_segment_costs(segment))
        for answer in _files(shard / "answers", ".json"):
            costs.update(_answer_cost(answer))
    return sum(costs.values())


def _dirs(folder: UPath) -> Iterator[UPath]:
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        if hasattr(folder, "fs") and not isinstance(folder, Path):
            folder.fs.invalidate_cache(folder.path)  # other machines write meanwhile
        yield from sorted(p for p in folder.iterdir() if p.is_dir())


def _files(folder: UPath, suffix: str) -> list[UPath]:
    try:
        return sorted(p for p in folder.iterdir() if p.name.endswith(suffix))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _cost(value: str | bytes) -> float:
    try:
        return float(json.loads(value).get("cost_usd") or 0.0)
    except (ValueError, TypeError, AttributeError):
        return 0.0


def _answer_cost(path: UPath) -> dict[str, float]:
    try:
        return {path.name.removesuffix(".json"): _cost(read_whole(path))}
    except FileNotFoundError:  # folded into a segment meanwhile: counted from there
        return {}


def _segment_costs(segment: UPath) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "segment.sqlite"
        try:
            local.write_bytes(read_whole(segment))
        except FileNotFoundError:  # compacted away after the listing
            return {}
        return _local_costs(local)


def _local_costs(path: Path) -> dict[str, float]:
    if not path.exists():
        return {}
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return {key: _cost(value) for key, value in db.execute("SELECT key, value FROM entries")}
    except sqlite3.Error:
        return {}
    finally:
        db.close()


def spend_metadata(df: Any, budget: Budget | None) -> dict[str, Any]:
    """What a stage asset shows about money: the teacher's dollars for its rows, dollars per
    accepted (ok) sample, the rows the cap stopped, and the cap with the spend recorded."""
    import polars as pl

    from mmat_assets.engine.stages import teacher_totals

    ok = df.filter(pl.col("status") == "ok").height if df.height else 0
    stopped = df.filter(pl.col("status") == BUDGET_REASON).height if df.height else 0
    usd = teacher_totals(df)["cost_usd"] if df.height else 0.0
    out: dict[str, Any] = {"usd": round(usd, 6), "usd_per_accepted_sample": round(usd / ok, 6) if ok else 0.0,
                           f"rows_{BUDGET_REASON}": stopped}
    if budget is not None:
        out |= {"budget_usd": budget.cap_usd, "budget_spent_usd": round(budget.spent_usd, 6)}
    return out


__all__ = ["BUDGET_EXIT_CODE", "row_status", "BUDGET_REASON", "Budget", "BudgetExhausted", "recorded_spend", "spend_metadata",
           "spend_under"]
