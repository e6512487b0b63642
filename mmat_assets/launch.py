"""``mmat build --launch``: the selection as a Dagster backfill, run by the daemon.

The backfill goes to the instance (``$DAGSTER_HOME``); the daemon's backfill loop turns it
into runs (the shard assets' ``BackfillPolicy`` puts ``foundation.shards_per_run`` shards in
one run), the run coordinator queues them (one run per shard at a time: the tag limits in
mmat's ``dagster.yaml``) and the instance's run launcher starts them (locally one subprocess
per run; on a cluster whatever the instance configures), each run executing its steps in that
one process (``deployment.executor``, mmat_assets.deploy). This process only follows: it
polls the backfill and its runs and folds each finished run into the same summary an
in-process build makes. It can detach at any time (Ctrl-C) and attach again (``--follow``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg

from mmat_assets.runner import BuildError, BuildProgress, PreparedBuild, RunRecord, _Build, _label, spend_reader

#: The daemon loops a backfill needs: one turns it into runs, one dequeues them.
NEEDED_DAEMONS = ("BACKFILL", "QUEUED_RUN_COORDINATOR")
#: A daemon whose last heartbeat is older than this is taken for gone (they beat every 30 s).
HEARTBEAT_TOLERANCE_S = 120.0
#: The composition root a daemon serves the project's definitions from.
DEFINITIONS = Path(__file__).resolve().parents[1] / "definitions.py"


def missing_daemons(instance: dg.DagsterInstance, now: float | None = None) -> list[str]:
    """The daemon loops a backfill needs that have not beaten lately (none: a daemon runs)."""
    from dagster._core.run_coordinator import QueuedRunCoordinator

    needed = [d for d in NEEDED_DAEMONS
              if d != "QUEUED_RUN_COORDINATOR" or isinstance(instance.run_coordinator, QueuedRunCoordinator)]
    beats = instance.get_daemon_heartbeats()
    now = time.time() if now is None else now
    return [d for d in needed if d not in beats or now - beats[d].timestamp > HEARTBEAT_TOLERANCE_S]


def _no_daemon_error(instance: dg.DagsterInstance, config: Path, missing: list[str]) -> BuildError:
    return BuildError(f"--launch needs a Dagster daemon on this instance (DAGSTER_HOME={instance.root_directory}), "
                      f"and none is running ({', '.join(missing)} silent): start one with "
                      f"`MMAT_CONFIG={config.resolve()} DAGSTER_HOME={instance.root_directory} dagster-daemon run "
                      f"-f {DEFINITIONS}` (or `make ui`), or build in this process without --launch")


def submit(prepared: PreparedBuild, config: Path, title: str | None = None) -> str:
    """Add the prepared selection to the instance as one asset backfill; its id."""
    from dagster._core.definitions.assets.graph.asset_graph_subset import AssetGraphSubset
    from dagster._core.definitions.events import AssetKeyPartitionKey
    from dagster._core.execution.backfill import PartitionBackfill
    from dagster._core.utils import make_new_backfill_id

    instance = prepared.instance
    missing = missing_daemons(instance)
    if missing:
        raise _no_daemon_error(instance, config, missing)
    targets = {AssetKeyPartitionKey(key, part) for sl in prepared.slices for key in sl.keys for part in sl.partitions}
    subset = AssetGraphSubset.from_asset_partition_set(targets, prepared.graph)
    backfill = PartitionBackfill.from_asset_graph_subset(
        backfill_id=make_new_backfill_id(), backfill_timestamp=time.time(), tags={"mmat/command": "build --launch"},
        dynamic_partitions_store=instance, asset_graph_subset=subset, title=title, description=None,
        run_config=None)
    instance.add_backfill(backfill)
    return backfill.backfill_id


def cancel(instance: dg.DagsterInstance, backfill_id: str) -> None:
    """Ask the daemon to cancel a backfill: no new runs; queued and running ones canceled."""
    from dagster._core.execution.backfill import BulkActionStatus

    backfill = instance.get_backfill(backfill_id)
    if backfill is None:
        raise BuildError(f"no backfill {backfill_id!r} on this instance (DAGSTER_HOME={instance.root_directory})")
    if backfill.status in (BulkActionStatus.REQUESTED, BulkActionStatus.FAILING):
        instance.update_backfill(backfill.with_status(BulkActionStatus.CANCELING))


def run_record(instance: dg.DagsterInstance, run: dg.DagsterRun) -> RunRecord:
    """A finished run's record, read from the event log, as an in-process run's would be."""
    events = [e.dagster_event for e in instance.all_logs(run.run_id) if e.dagster_event is not None]
    record = RunRecord.of(events)
    if run.status != dg.DagsterRunStatus.SUCCESS and not record.failures:
        # the run never got to a step (the launcher failed, it was canceled): still a failure
        why = next((e.message for e in reversed(events) if e.is_run_failure and e.message), None)
        record.failures.append(("", f"run {run.run_id[:8]} {run.status.value.lower()}" + (f": {why}" if why else ""),
                                False))
    return record


def _part(run: dg.DagsterRun) -> str | None:
    """The shard (or shards, 'first-last') a run covered; None when unpartitioned."""
    tags = run.tags
    if "dagster/partition" in tags:
        return tags["dagster/partition"]
    start, end = tags.get("dagster/asset_partition_range_start"), tags.get("dagster/asset_partition_range_end")
    if start is None:
        return None
    return start if start == end else f"{start}-{end}"


class Follower:
    """Folds a backfill's finished runs, once each, into a build tally."""

    def __init__(self, prepared: PreparedBuild, backfill_id: str, progress: BuildProgress) -> None:
        self.prepared, self.backfill_id, self.progress = prepared, backfill_id, progress
        self.build = _Build(prepared.defs, prepared.graph, prepared.instance, progress)
        self.order = {k: i for i, k in enumerate(prepared.graph.toposorted_asset_keys)}
        self.folded: set[str] = set()
        backfill = prepared.instance.get_backfill(backfill_id)
        if backfill is None:
            raise BuildError(f"no backfill {backfill_id!r} on this instance "
                             f"(DAGSTER_HOME={prepared.instance.root_directory})")
        self.selection = sorted(backfill.asset_selection or (), key=lambda k: self.order.get(k, 0))
        for key in self.selection:  # the summary lists assets in graph order, as a build's does
            self.build._entry(key.to_user_string())
        progress.start(0)

    def runs(self) -> list[dg.DagsterRun]:
        from dagster._core.storage.tags import BACKFILL_ID_TAG

        runs = self.prepared.instance.get_runs(filters=dg.RunsFilter(tags={BACKFILL_ID_TAG: self.backfill_id}))
        return sorted(runs, key=lambda r: (_part(r) or "", r.run_id))

    def poll(self) -> bool:
        """Fold the runs finished since the last poll; True once the backfill and all its runs are done."""
        from dagster._core.execution.backfill import BulkActionStatus

        backfill = self.prepared.instance.get_backfill(self.backfill_id)
        runs = self.runs()
        self.progress.set_total(len(runs))
        for run in runs:
            if run.is_finished and run.run_id not in self.folded:
                self._fold(run)
        active = (BulkActionStatus.REQUESTED, BulkActionStatus.CANCELING, BulkActionStatus.FAILING)
        return backfill is not None and backfill.status not in active and all(r.is_finished for r in runs)

    def _fold(self, run: dg.DagsterRun) -> None:
        self.folded.add(run.run_id)
        keys = sorted(run.asset_selection or (), key=lambda k: self.order.get(k, 0))
        record, part = run_record(self.prepared.instance, run), _part(run)
        self.build.runs += 1
        self.build._tally(record, keys, part)
        self.progress.step(_label(keys, part), record.rows, bool(record.failures), record.accepted)

    def summary(self) -> dict[str, Any]:
        from dagster._core.execution.backfill import BulkActionStatus

        backfill = self.prepared.instance.get_backfill(self.backfill_id)
        for key in self.selection:  # targeted, yet neither written nor failed by any run
            entry = self.build._entry(key.to_user_string())
            if not (entry["partitions"] or entry["errors"] or entry["skipped"]):
                self.build._skip([key], None, "not run by the backfill")
        out = self.build.summary(self.prepared.max_failure_rate)
        if backfill is not None and backfill.status in (BulkActionStatus.FAILED, BulkActionStatus.CANCELED):
            why = backfill.error.message.strip().splitlines()[0] if backfill.error else ""
            out["causes"].append(f"the backfill {backfill.status.value.lower()}" + (f": {why}" if why else ""))
            out["ok"] = False
        return {**out, "backfill": self.backfill_id}


def follow(prepared: PreparedBuild, backfill_id: str, progress: BuildProgress, poll_s: float = 2.0,
           sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Follow a backfill to its end; the summary of all its runs."""
    follower = Follower(prepared, backfill_id, progress)
    reader = spend_reader(prepared.defs)
    if reader is not None:
        progress.watch_spend(reader)
    while not follower.poll():
        sleep(poll_s)
    return {**follower.summary(), **progress.spend()}
