"""Materialize a selection through Dagster, one run per stage slice and shard.

The same definitions and the same Dagster instance (``$DAGSTER_HOME``) as the UI: a
build from the command line shows up in the UI's history, and staleness agrees.
Consecutive assets of one partitioning go in one run: the unpartitioned ones together,
and every shard-partitioned stage for one shard together (one run per shard).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import dagster as dg
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


#: The asset the main job builds, with everything upstream of it: the first that exists.
MAIN_TARGETS = ("evaluation_report", "dialogue_files")  # the main job builds both and what they need
#: Dagster's own step logs go to the run history (and the UI), not over the progress view.
QUIET = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}


@dataclass
class Slice:
    """A run to launch: some asset keys, and the partition keys to run them for."""

    keys: list[dg.AssetKey]
    partitions: list[str | None] = field(default_factory=lambda: [None])


def plan(graph: Any, selected: set[dg.AssetKey], choose: Callable[[list[str]], list[str]]) -> list[Slice]:
    """Group the selection, in topological order, into slices of one partitioning each."""
    slices: list[Slice] = []
    current_def: Any = object()
    for key in graph.toposorted_asset_keys:
        if key not in selected:
            continue
        pdef = graph.get(key).partitions_def
        if slices and pdef == current_def:
            slices[-1].keys.append(key)
            continue
        parts: list[str | None] = [None] if pdef is None else list(choose(list(pdef.get_partition_keys())))
        slices.append(Slice([key], parts))
        current_def = pdef
    return slices


class BuildProgress:
    """A live progress view of a build (runs done, current slice, rows, failures)."""

    def __init__(self, console: Console, enabled: bool = True) -> None:
        self.enabled = enabled
        self.rows = 0
        self.failures = 0
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("rows {task.fields[rows]}  failures {task.fields[failures]}"),
            TimeElapsedColumn(), console=console, disable=not enabled,
        )
        self._task: Any = None

    def __enter__(self) -> BuildProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self._progress.__exit__(et, ev, tb)

    def start(self, total: int) -> None:
        self._task = self._progress.add_task("build", total=total, rows=0, failures=0)

    def step(self, label: str, rows: int, failed: bool) -> None:
        self.rows += rows
        self.failures += int(failed)
        self._progress.update(self._task, advance=1, description=label, rows=self.rows, failures=self.failures)
        console = self._progress.console
        if self.enabled and not console.is_terminal:  # logs and CI: a line per run instead of a live bar
            task = self._progress.tasks[0]
            console.print(f"[{int(task.completed)}/{int(task.total or 0)}] {label}: rows {self.rows}, "
                          f"failures {self.failures}, {task.elapsed or 0:.0f} s")


def _rows(result: dg.ExecuteInProcessResult) -> dict[str, int]:
    rows: dict[str, int] = {}
    for ev in result.get_asset_materialization_events():
        mat = ev.event_specific_data.materialization
        count = mat.metadata.get("dagster/row_count")
        if count is not None:
            key = mat.asset_key.to_user_string()
            rows[key] = rows.get(key, 0) + int(count.value)
    return rows


def _root_cause(err: Any) -> str:
    """The innermost error's message: what a user can act on, not the framework's wrapper."""
    while err is not None and getattr(err, "cause", None) is not None:
        err = err.cause
    if err is None or not err.message:
        return "failed"
    return " ".join(err.message.split())


def _notes(result: dg.ExecuteInProcessResult) -> list[str]:
    """Summaries assets want a person to read at the end of a build (paths, funnels)."""
    out = []
    for ev in result.get_asset_materialization_events():
        note = ev.event_specific_data.materialization.metadata.get("mmat/summary")
        if note is not None:
            out.append(str(note.value))
    return out


def _errors(result: dg.ExecuteInProcessResult) -> list[tuple[str, str]]:
    """(step key, message) of every failed step, and of every step skipped because of one."""
    out = [(ev.step_key or "", _root_cause(ev.step_failure_data.error))
           for ev in result.all_events if ev.is_step_failure]
    out += [(ev.step_key or "", "skipped: an upstream step failed") for ev in result.all_events if ev.is_step_skipped]
    return out


def selected_keys(graph: Any, select: str | None) -> set[dg.AssetKey]:
    """The assets a build materializes: ``select`` (a Dagster selection string), or the main
    job: the evaluation report, the dialogue files and everything they need."""
    if select:
        selection = dg.AssetSelection.from_string(select)
    else:
        targets = [dg.AssetKey(t) for t in MAIN_TARGETS if dg.AssetKey(t) in graph.get_all_asset_keys()]
        selection = dg.AssetSelection.assets(*targets).upstream() if targets else dg.AssetSelection.all()
    selection = selection.required_multi_asset_neighbors()  # a source's samples and quarantine go together
    return set(selection.resolve(graph))


def run_build(config: Path, profile: str, select: str | None,
              choose: Callable[[list[str]], list[str]], progress: BuildProgress) -> dict[str, Any]:
    """Materialize ``select`` (all assets when None); return a summary of what happened."""
    from mmat_assets.assets import definitions_from_file

    defs = definitions_from_file(config, profile)
    graph = defs.resolve_asset_graph()
    selected = selected_keys(graph, select)
    slices = plan(graph, selected, choose)
    assets = list(defs.assets or []) + list(defs.asset_checks or [])
    build = _Build(defs, assets, graph, dg.DagsterInstance.get(), progress)
    progress.start(sum(len(s.partitions) for s in slices))
    for sl in slices:
        for part in sl.partitions:
            build.run(sl.keys, part)
    return build.summary()


class _Build:
    """Runs slices and keeps the tally: rows and errors per asset, failed checks."""

    def __init__(self, defs: dg.Definitions, assets: list[Any], graph: Any,
                 instance: dg.DagsterInstance, progress: BuildProgress) -> None:
        self.defs, self.assets, self.graph, self.instance, self.progress = defs, assets, graph, instance, progress
        self.entries: dict[str, dict[str, Any]] = {}
        self.failed_checks: list[str] = []
        self.notes: list[str] = []
        self.failed_unpartitioned: set[dg.AssetKey] = set()
        self.failed = self.runs = 0
        #: step (op) name -> asset keys it writes, to name the asset behind a failed step
        self.step_assets = {a.node_def.name: list(a.keys) for a in defs.assets or [] if hasattr(a, "node_def")}

    def _entry(self, name: str) -> dict[str, Any]:
        return self.entries.setdefault(name, {"asset": name, "partitions": 0, "rows": 0, "errors": []})

    def run(self, keys: list[dg.AssetKey], part: str | None) -> None:
        label = ", ".join(k.to_user_string() for k in keys[:2]) + (" ..." if len(keys) > 2 else "")
        label = f"{label} [{part}]" if part else label
        blocked = sorted({p.to_user_string() for k in keys for p in self.graph.get(k).parent_keys
                          if p in self.failed_unpartitioned})
        if blocked:  # its inputs do not exist: running it would only repeat the upstream failure
            for key in keys:
                self._entry(key.to_user_string())["errors"].append(
                    f"[{part}] skipped: upstream failed ({', '.join(blocked)})" if part else
                    f"skipped: upstream failed ({', '.join(blocked)})")
            self.progress.step(label, 0, True)
            return
        result = dg.materialize(self.assets, selection=keys, partition_key=part, instance=self.instance,
                                resources=self.defs.resources, raise_on_error=False, run_config=QUIET)
        self.runs += 1
        rows, errors = _rows(result), _errors(result)
        self.notes += _notes(result)
        for key in keys:
            entry = self._entry(key.to_user_string())
            entry["partitions"] += 1
            entry["rows"] += rows.get(key.to_user_string(), 0)
        for step, message in errors:
            for key in self.step_assets.get(step.split("[")[0], keys):
                if key in keys:
                    self._entry(key.to_user_string())["errors"].append(f"[{part}] {message}" if part else message)
                    if part is None:
                        self.failed_unpartitioned.add(key)
        self.failed += len(errors)
        self.failed_checks += [f"{e.asset_key.to_user_string()}:{e.check_name} [{part}]"
                               for e in result.get_asset_check_evaluations() if not e.passed]
        self.progress.step(label, sum(rows.values()), bool(errors))

    def summary(self) -> dict[str, Any]:
        return {"assets": list(self.entries.values()), "failed": self.failed,
                "failed_checks": self.failed_checks, "runs": self.runs, "notes": self.notes}
