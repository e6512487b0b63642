"""Materialize a selection through Dagster, one run per stage slice and shard.

The same definitions and the same Dagster instance (``$DAGSTER_HOME``) as the UI: a
build from the command line shows up in the UI's history, and staleness agrees.
Consecutive assets of one partitioning form a slice. Every shard-partitioned stage for one
shard goes in one run (one run per shard). The unpartitioned assets of a slice go in waves:
the assets that do not depend on each other (the six evaluations, training beside the
untuned model's evaluations) each in its own run, side by side in the worker processes as
the shards are; runs of one asset in a row are merged. The plan is the same for any number
of workers, so the summary is too.

Nothing fails silently: a build whose selection does not parse or matches nothing, whose
plugins did not all load, or whose selection reads an asset that was never materialized stops
before it launches anything, with one line saying why (:class:`BuildError`). Once it runs,
the summary lists every cause of failure (a failed step, a failed ERROR-severity check, a
stage whose failure rate passes ``stages.max_failure_rate``) and the command exits non-zero
when there is one. A teacher that rejects its API key stops the build at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import multiprocessing
import os
import re
import signal
import threading
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import dagster as dg
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mmat_assets.toolkit.cpu import limit_threads, worker_share

if TYPE_CHECKING:
    from mmat_assets.config import ProjectConfig


#: The asset the main job builds, with everything upstream of it: the first that exists.
MAIN_TARGETS = ("evaluation_report", "dialogue_files")  # the main job builds both and what they need
#: Dagster's own step logs go to the run history (and the UI), not over the progress view.
QUIET = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
#: Exit code of a command-line mistake (a selection that does not parse), as typer uses.
USAGE_ERROR = 2
#: Selections shown to a user whose selection did not work.
EXAMPLES = ('group:export', 'key:"exports/*"', "'*dialogue_files' (it and everything upstream)",
            "'group:foundation or key:rationales'")
#: Errors after which every further run would fail the same way: the build stops at the first.
FATAL_ERRORS = {"TeacherRejected"}
#: The error Dagster puts on a step that Ctrl-C (or SIGTERM, see mmat_assets.cli) stopped.
INTERRUPTED = "DagsterExecutionInterruptedError"
#: Errors whose message is written for a person (dg.Failure's description, ours).
PLAIN_ERRORS = {"Failure", *FATAL_ERRORS}
#: Row counts the stage assets write in their metadata, beside dagster/row_count: a source's
#: rows_read, rows_quarantined and rows_dropped_*, and the shard stages' ok (rationales) or
#: passed (reflections). Every integer entry named rows_* is kept in the summary.
STAGE_OK_KEYS = ("ok", "passed")


class BuildError(Exception):
    """A build that cannot start, in one line; ``exit_code`` 2 for a usage error, else 1."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(" ".join(message.split()))
        self.exit_code = exit_code


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


def waves(graph: Any, keys: list[dg.AssetKey]) -> list[list[list[dg.AssetKey]]]:
    """An unpartitioned slice (``keys`` in topological order) as waves of runs: a wave holds
    the runs that depend on no other run of it; a run is one asset (with the other keys of
    its multi-asset), and consecutive waves of one run each are merged into one run. Within
    a wave the runs more of the slice waits for come first (training before evaluations of
    the untuned model), so that the longest chain starts first."""
    inside = set(keys)
    node: dict[dg.AssetKey, int] = {}  # key -> its group: the keys one assets definition writes
    groups: list[list[dg.AssetKey]] = []
    for key in keys:
        if key in node:
            continue
        assets_def = getattr(graph.get(key), "assets_def", None)
        together = [k for k in keys if k in set(assets_def.keys)] if assets_def is not None else [key]
        for k in together:
            node[k] = len(groups)
        groups.append(together)
    parents = [{node[p] for k in group for p in graph.get(k).parent_keys if p in inside} - {g}
               for g, group in enumerate(groups)]
    level: dict[int, int] = {}

    def depth(g: int) -> int:
        if g not in level:
            level[g] = 1 + max((depth(p) for p in parents[g]), default=-1)
        return level[g]

    under: dict[int, set[int]] = {}

    def below(g: int) -> set[int]:
        if g not in under:
            children = {c for c in range(len(groups)) if g in parents[c]}
            under[g] = children.union(*(below(c) for c in children))
        return under[g]

    for g in range(len(groups)):
        depth(g)
    waiting = {g: len(below(g)) for g in range(len(groups))}
    out: list[list[list[dg.AssetKey]]] = []
    for n in range(max(level.values(), default=-1) + 1):
        runs = [groups[g] for g in sorted((g for g in level if level[g] == n), key=lambda g: (-waiting[g], g))]
        if len(runs) == 1 and out and len(out[-1]) == 1:
            out[-1][0].extend(runs[0])
        else:
            out.append([list(g) for g in runs])
    return out


def run_count(graph: Any, sl: Slice) -> int:
    """How many runs a slice takes: one per shard, or one per run of its waves."""
    if sl.partitions != [None]:
        return len(sl.partitions)
    return sum(len(wave) for wave in waves(graph, sl.keys))


def run_width(graph: Any, sl: Slice) -> int:
    """How many of a slice's runs can go at once: its shards, or its widest wave."""
    if sl.partitions != [None]:
        return len(sl.partitions)
    return max((len(wave) for wave in waves(graph, sl.keys)), default=1)


class BuildProgress:
    """A live progress view of a build (runs done, current slice, rows, failures, the
    teacher's dollars with dollars per accepted sample once there are any, and its Batch API
    batches while there are some)."""

    def __init__(self, console: Console, enabled: bool = True, spend_every_s: float = 3.0) -> None:
        self.enabled = enabled
        self.rows = 0
        self.failures = 0
        #: rows the teacher's stage accepted (rationales ``ok``), from the finished runs
        self.accepted = 0
        #: dollars the request caches recorded since the build started (every shard and process)
        self.usd = 0.0
        self.spend_every_s = spend_every_s
        self._spend: Callable[[], float] | None = None
        self._usd_before = 0.0
        self._batches: Callable[[], str] | None = None
        #: the teacher's batches as the view shows them ("" while there are none)
        self.batches = ""
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("rows {task.fields[rows]}  failures {task.fields[failures]}{task.fields[usd]}"),
            TimeElapsedColumn(), console=console, disable=not enabled,
        )
        self._task: Any = None

    def __enter__(self) -> BuildProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=10)
        self._progress.__exit__(et, ev, tb)

    def start(self, total: int) -> None:
        self._task = self._progress.add_task("build", total=total, rows=0, failures=0, usd="")

    def watch_spend(self, read: Callable[[], float]) -> None:
        """Show the dollars ``read`` finds recorded (the request caches of every shard and
        process), less what was recorded before the build, re-read every ``spend_every_s``
        while runs are under way and after each run."""
        try:
            self._spend, self._usd_before = read, read()
        except Exception:  # storage not reachable from here: the view goes without dollars
            return
        if self.enabled:
            self._poller = threading.Thread(target=self._poll_spend, name="mmat-spend", daemon=True)
            self._poller.start()

    def watch_batches(self, read: Callable[[], str]) -> None:
        """Also show what ``read`` says of the teacher's batches (one line of text), re-read
        with the dollars; needs :meth:`watch_spend`'s poller."""
        self._batches = read

    def spend(self) -> dict[str, float]:
        """The build's dollars for its summary (none without a spend to watch)."""
        if self._spend is None:
            return {}
        self._refresh_usd()
        per = self.usd / self.accepted if self.accepted else 0.0
        return {"usd": round(self.usd, 6), "usd_per_accepted_sample": round(per, 6)}

    def _poll_spend(self) -> None:
        while not self._stop.wait(self.spend_every_s):
            self._refresh_usd()
            if self._task is not None:
                self._progress.update(self._task, usd=self._usd_field())

    def _refresh_usd(self) -> None:
        if self._spend is None:
            return
        try:
            self.usd = max(self._spend() - self._usd_before, 0.0)
            if self._batches is not None:
                self.batches = self._batches()
        except Exception:  # a storage hiccup: the view keeps the last figure, the build goes on
            pass

    def _usd_text(self) -> str:
        if self.usd <= 0:
            return ""
        per = f" (${self.usd / self.accepted:.4f} per accepted sample)" if self.accepted else ""
        return f"${self.usd:.4f}{per}"

    def _usd_field(self) -> str:
        text = "  ".join(t for t in (self._usd_text(), self.batches) if t)
        return f"  {text}" if text else ""

    def set_total(self, total: int) -> None:
        """A new total, for a build whose runs appear as it goes (a backfill's)."""
        self._progress.update(self._task, total=total)

    def step(self, label: str, rows: int, failed: bool, accepted: int = 0) -> None:
        self.rows += rows
        self.failures += int(failed)
        self.accepted += accepted
        if self.enabled:
            self._refresh_usd()
        usd = ", ".join(t for t in (self._usd_text(), self.batches) if t)
        self._progress.update(self._task, advance=1, description=label, rows=self.rows, failures=self.failures,
                              usd=self._usd_field())
        console = self._progress.console
        if self.enabled and not console.is_terminal:  # logs and CI: a line per run instead of a live bar
            task = self._progress.tasks[0]
            console.print(f"[{int(task.completed)}/{int(task.total or 0)}] {label}: rows {self.rows}, "
                          f"failures {self.failures}, {usd + ', ' if usd else ''}{task.elapsed or 0:.0f} s")


def _teacher_caches(defs: dg.Definitions) -> Any:
    """The storage root's ``cache/teacher`` folder, as a run resolves it (its settings may
    come from the environment); None without a storage resource or when it cannot be
    resolved here (the view then goes without; the runs report their own errors)."""
    storage: Any = (defs.resources or {}).get("storage")  # a StorageResource, or a test's stand-in
    if storage is None or not hasattr(storage, "path"):
        return None
    try:
        return storage.process_config_and_initialize().path("cache", "teacher")
    except Exception:
        return None


def spend_reader(defs: dg.Definitions) -> Callable[[], float] | None:
    """How to read the dollars the project's teacher request caches recorded, from outside the
    runs; None without a storage resource."""
    from mmat_assets.engine.budget import spend_under

    folder = _teacher_caches(defs)
    return None if folder is None else (lambda: spend_under(folder))


def batch_reader(defs: dg.Definitions, since: float) -> Callable[[], str] | None:
    """How to read the teacher's Batch API batches that shards noted since ``since``, as one
    line; None without a storage resource."""
    from mmat_assets.toolkit.batch import batch_progress_under

    folder = _teacher_caches(defs)
    return None if folder is None else (lambda: batch_progress_under(folder, since).text())


def _materializations(events: Sequence[Any]) -> list[Any]:
    return [ev.event_specific_data.materialization for ev in events if ev.is_step_materialization]


def _counts(events: Sequence[Any]) -> dict[str, dict[str, int]]:
    """Per asset materialized in ``events``: its row count and the stage counts it reports."""
    out: dict[str, dict[str, int]] = {}
    for mat in _materializations(events):
        counts = out.setdefault(mat.asset_key.to_user_string(), {})
        for name, value in mat.metadata.items():
            counted = name == "dagster/row_count" or name.startswith("rows_") or name in STAGE_OK_KEYS
            if counted and isinstance(value.value, int) and not isinstance(value.value, bool):
                counts[name] = counts.get(name, 0) + value.value
    return out


def _root_cause(err: Any) -> str:
    """The innermost error's message: what a user can act on, not the framework's wrapper."""
    while err is not None and getattr(err, "cause", None) is not None:
        err = err.cause
    if err is None or not err.message:
        return "failed"
    message = " ".join(err.message.split())
    if err.cls_name in PLAIN_ERRORS:  # written for a person: the class's module path adds nothing
        message = message.split(f"{err.cls_name}: ", 1)[-1]
    return message


def _is_fatal(err: Any) -> bool:
    """Whether the error, or one it wraps, is one that every further run would repeat."""
    return _wraps(err, FATAL_ERRORS)


def _wraps(err: Any, names: set[str]) -> bool:
    while err is not None:
        if getattr(err, "cls_name", None) in names:
            return True
        err = getattr(err, "cause", None)
    return False


def _interrupted(events: Sequence[Any]) -> bool:
    """Whether a step of the run was stopped by an interrupt rather than by its own error."""
    return any(_wraps(ev.step_failure_data.error, {INTERRUPTED}) for ev in events if ev.is_step_failure)


def _notes(events: Sequence[Any]) -> list[str]:
    """Summaries assets want a person to read at the end of a build (paths, funnels)."""
    out = []
    for mat in _materializations(events):
        note = mat.metadata.get("mmat/summary")
        if note is not None:
            out.append(str(note.value))
    return out


def _failures(events: Sequence[Any]) -> list[tuple[str, str, bool]]:
    """(step key, message, fatal) of every failed step."""
    return [(ev.step_key or "", _root_cause(ev.step_failure_data.error), _is_fatal(ev.step_failure_data.error))
            for ev in events if ev.is_step_failure]


def _failed_checks(events: Sequence[Any]) -> list[tuple[str, bool]]:
    """(asset:check, ERROR severity) of every check that did not pass."""
    evaluations = [ev.event_specific_data for ev in events
                   if ev.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION]
    return [(f"{e.asset_key.to_user_string()}:{e.check_name}", e.severity == dg.AssetCheckSeverity.ERROR)
            for e in evaluations if not e.passed]


@dataclass
class RunRecord:
    """What one run (some assets, one partition) produced, as plain data: a worker process
    sends it back, and the build folds it into its tally."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    #: (step key, message, fatal) of every failed step
    failures: list[tuple[str, str, bool]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: (asset:check, ERROR severity) of every failed check
    checks: list[tuple[str, bool]] = field(default_factory=list)
    #: partitions written per asset (a batched run writes several)
    materialized: dict[str, int] = field(default_factory=dict)
    #: a step was interrupted (Ctrl-C, SIGTERM): the build stops as interrupted, not as failed
    interrupted: bool = False

    @classmethod
    def of(cls, events: Sequence[Any]) -> RunRecord:
        """The record of a run's events (Dagster events, in process or from the event log)."""
        written: dict[str, int] = {}
        for mat in _materializations(events):
            written[mat.asset_key.to_user_string()] = written.get(mat.asset_key.to_user_string(), 0) + 1
        return cls(_counts(events), _failures(events), _notes(events), _failed_checks(events), written,
                   _interrupted(events))

    @property
    def rows(self) -> int:
        return sum(c.get("dagster/row_count", 0) for c in self.counts.values())

    @property
    def accepted(self) -> int:
        """Rows the teacher's stage accepted in this run (rationales' ``ok``)."""
        return sum(c.get("ok", 0) for c in self.counts.values())

    @property
    def fatal(self) -> bool:
        return any(fatal for _, _, fatal in self.failures)


def execute(defs: dg.Definitions, keys: list[dg.AssetKey], part: str | None,
            instance: dg.DagsterInstance) -> RunRecord:
    """One run: materialize ``keys`` (and their checks) for ``part``, in this process."""
    assets: list[Any] = list(defs.assets or []) + list(defs.asset_checks or [])
    result = dg.materialize(assets, selection=keys, partition_key=part, instance=instance,
                            resources=defs.resources, raise_on_error=False, run_config=QUIET)
    return RunRecord.of(result.all_events)


#: A worker process's definitions and instance, loaded once when it starts.
_WORKER: dict[str, Any] = {}


#: How long interrupted workers get to end their runs (Dagster marks them failed, leases are
#: released) before they are killed; a killed holder's leases are taken over at once.
WORKER_STOP_S = 20.0


def _start_worker(config: str, profile: str, threads: int | None = None) -> None:
    if threads:  # before anything loads a model: its thread pool is sized when it starts
        limit_threads(threads)
    _WORKER["defs"] = _definitions(Path(config), profile)[0]
    _WORKER["instance"] = dg.DagsterInstance.get()  # $DAGSTER_HOME, passed on by the parent
    threading.Thread(target=_stop_with_parent, args=(os.getppid(),), name="mmat-parent-watch",
                     daemon=True).start()


def _stop_with_parent(parent: int, every_s: float = 0.5) -> None:
    """A worker whose build process is gone (killed, or ended without stopping it) interrupts
    its own run, as Ctrl-C would, and exits: it must not go on sending paid requests."""
    while os.getppid() == parent:
        time.sleep(every_s)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(WORKER_STOP_S)
    os._exit(130)


def stop_workers(processes: Sequence[Any], grace_s: float = WORKER_STOP_S) -> None:
    """Interrupt worker ``processes`` (SIGINT: Dagster ends their runs as failed), wait up to
    ``grace_s`` for them to exit, then kill the rest."""
    for proc in processes:
        if proc.is_alive() and proc.pid:
            os.kill(proc.pid, signal.SIGINT)
    deadline = time.monotonic() + grace_s
    for proc in processes:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in processes:
        if proc.is_alive():
            proc.kill()
            proc.join(5)


def _execute_in_worker(keys: list[dg.AssetKey], part: str | None) -> RunRecord:
    return execute(_WORKER["defs"], keys, part, _WORKER["instance"])


def worker_pool(workers: int, config: Path, profile: str) -> ProcessPoolExecutor:
    """``workers`` processes that each load the project's definitions once, their models
    limited to their share of the cores (:func:`~mmat_assets.toolkit.cpu.worker_share`: N
    workers each starting a thread per core would only slow each other down). Spawned, not
    forked: the parent holds threads (the progress view, Dagster's) that a fork would copy
    in whatever state they were."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_worker,
                               initargs=(str(config), profile, worker_share(workers)))


# ------------------------------------------------------------------- before a build


def selected_keys(graph: Any, select: str | None) -> set[dg.AssetKey]:
    """The assets a build materializes: ``select`` (a Dagster selection string), or the main
    job: the evaluation report, the dialogue files and everything they need. A selection that
    does not parse or matches nothing is a :class:`BuildError` (a usage error)."""
    if not select:
        targets = [dg.AssetKey(t) for t in MAIN_TARGETS if dg.AssetKey(t) in graph.get_all_asset_keys()]
        selection = dg.AssetSelection.assets(*targets).upstream() if targets else dg.AssetSelection.all()
        return set(selection.required_multi_asset_neighbors().resolve(graph))
    try:
        with warnings.catch_warnings():  # group selections warn of a beta parameter on every build
            warnings.simplefilter("ignore", dg.BetaWarning)
            # a source's samples and quarantine go together
            keys = set(dg.AssetSelection.from_string(select).required_multi_asset_neighbors().resolve(graph))
    except dg.DagsterError as exc:  # a parse error, or a name no asset has
        raise _selection_error(select, _selection_reason(select, exc)) from None
    if not keys:
        raise _selection_error(select, "it matches no asset")
    return keys


def _selection_reason(select: str, exc: Exception) -> str:
    """Dagster's complaint about ``select``, said the way a user can act on it."""
    text = " ".join(str(exc).split())
    unknown = re.search(r"AssetKey\(s\) \[(.*?)\] were selected", text)
    if unknown:  # 'exports/*' reads as "downstream of the asset 'exports/'", not as a wildcard
        hint = (" (a bare name is an asset key, and a trailing '*' adds everything downstream of it; "
                "it is not a wildcard)") if "*" in select else ""
        return f"no asset is named {unknown[1]}{hint}"
    if "Invalid selection string" in text:
        return "it does not parse"
    return text.split(". ")[0]


def _selection_error(select: str, reason: str) -> BuildError:
    return BuildError(f"--select {select!r}: {reason}. Selections that work: {', '.join(EXAMPLES)}",
                      USAGE_ERROR)


def _loaded_inputs(graph: Any, key: dg.AssetKey) -> set[dg.AssetKey]:
    """Upstream assets whose stored value ``key`` loads (not ordering-only ``deps``)."""
    assets_def = getattr(graph.get(key), "assets_def", None)
    if assets_def is None:
        return set(graph.get(key).parent_keys)
    inputs = assets_def.node_def.input_dict
    return {k for name, k in assets_def.keys_by_input_name.items()
            if name in inputs and not inputs[name].dagster_type.is_nothing}


def unbuilt_inputs(graph: Any, selected: set[dg.AssetKey], slices: list[Slice],
                   instance: dg.DagsterInstance) -> dict[dg.AssetKey, list[str]]:
    """Upstream assets the selection reads but leaves out and that were never materialized,
    with the partitions missing (empty list: unpartitioned)."""
    parts_of = {key: sl.partitions for sl in slices for key in sl.keys}
    missing: dict[dg.AssetKey, list[str]] = {}
    for key in selected:
        for parent in _loaded_inputs(graph, key):
            if parent in selected or parent in missing or not graph.has(parent) \
                    or not graph.get(parent).is_materializable:
                continue
            pdef = graph.get(parent).partitions_def
            if pdef is None:
                if instance.get_latest_materialization_event(parent) is None:
                    missing[parent] = []
                continue
            same = graph.get(key).partitions_def == pdef
            needed = [p for p in parts_of[key] if p is not None] if same else list(pdef.get_partition_keys())
            lacking = sorted(set(needed) - instance.get_materialized_partitions(parent))
            if lacking:
                missing[parent] = lacking
    return missing


def _unbuilt_error(graph: Any, selected: set[dg.AssetKey], missing: dict[dg.AssetKey, list[str]],
                   select: str | None) -> BuildError:
    def name(key: dg.AssetKey) -> str:
        parts = missing[key]
        whole = not parts or len(parts) == len(graph.get(key).partitions_def.get_partition_keys())
        return key.to_user_string() + ("" if whole else f" (shards {', '.join(parts)})")

    # the selected assets nothing else selected reads: '*<sink>' builds them with all they need
    sinks = sorted(k.to_user_string() for k in selected if not (graph.get(k).child_keys & selected))
    include = " or ".join(f"--select '*{s}'" for s in sinks[:3])
    one = len(missing) == 1
    never = all(name(k) == k.to_user_string() for k in missing)  # not just some shards
    return BuildError(f"the selection {select!r} reads {', '.join(name(k) for k in sorted(missing))}, which "
                      f"{'has' if one else 'have'} {'never' if never else 'not'} been materialized; include "
                      f"{'it' if one else 'them'}: {include} (or build {'it' if one else 'them'} first)")


def read_config(config: Path) -> ProjectConfig:
    """The project's config (:class:`~mmat_assets.config.ProjectConfig`); a missing file, bad
    YAML, a broken ``extends:`` or a value that fails validation is a :class:`BuildError` of
    one line naming the file (a usage error, exit 2), for every command that reads it."""
    from mmat_assets.config import ConfigError, load_config

    if not config.is_file():
        raise BuildError(f"no project config at {config}", USAGE_ERROR)
    try:
        return load_config(config)
    except yaml.YAMLError as exc:
        raise BuildError(f"{config} is not valid YAML: {exc}", USAGE_ERROR) from None
    except ConfigError as exc:
        raise BuildError(str(exc), USAGE_ERROR) from None
    except ValidationError as exc:
        raise BuildError(f"{config}: " + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                                   for e in exc.errors()), USAGE_ERROR) from None


def _definitions(config: Path, profile: str) -> tuple[dg.Definitions, float]:
    """The project's definitions and failure-rate limit; a broken plugin or config stops here."""
    from mmat_assets.assets import build_definitions
    from mmat_assets.plugins import load_registry

    cfg = read_config(config)
    registry = load_registry()
    if registry.errors:
        # which plugin would have provided what is unknown, so any broken one stops the build
        raise BuildError(f"{'; '.join(registry.errors)}. Fix or uninstall it, or leave it out with "
                         "MMAT_BLOCK_PLUGINS=<plugin> (`mmat plugins` lists every plugin)")
    try:
        return build_definitions(cfg, profile, registry), cfg.stages.max_failure_rate
    except KeyError as exc:  # a configured name that nothing registers
        raise BuildError(str(exc.args[0] if exc.args else exc)) from None


# -------------------------------------------------------------------------- a build


@dataclass
class PreparedBuild:
    """A build that passed every check made before launching: what to run, and where."""

    defs: dg.Definitions
    graph: Any
    slices: list[Slice]
    instance: dg.DagsterInstance
    max_failure_rate: float = 0.5
    #: (config, profile) the definitions came from: what worker processes load again
    source: tuple[Path, str] | None = None

    def run(self, progress: BuildProgress, workers: int = 1,
            interrupted: Callable[[], bool] | None = None) -> dict[str, Any]:
        """Materialize the slices in order, the shards of a slice in up to ``workers`` processes
        at once; the summary lists every cause of failure. ``interrupted`` says whether a stop
        signal came that no handler turned into a KeyboardInterrupt (see :class:`_Build`)."""
        width = max((run_width(self.graph, s) for s in self.slices), default=1)
        workers = min(workers, width) if self.source else 1
        pool = worker_pool(workers, *self.source) if workers > 1 and self.source else None
        build = _Build(self.defs, self.graph, self.instance, progress, pool, workers, interrupted)
        progress.start(sum(run_count(self.graph, s) for s in self.slices))
        reader, batches = spend_reader(self.defs), batch_reader(self.defs, time.time())
        if batches is not None:
            progress.watch_batches(batches)
        if reader is not None:
            progress.watch_spend(reader)
        try:
            for sl in self.slices:
                build.run_slice(sl.keys, sl.partitions)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (see mmat_assets.cli): the workers stop too
            if pool is not None:
                processes = list((getattr(pool, "_processes", None) or {}).values())
                pool.shutdown(wait=False, cancel_futures=True)
                stop_workers(processes)
                pool = None
            raise
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        return {**build.summary(self.max_failure_rate), **progress.spend(), "workers": workers}


def prepare(defs: dg.Definitions, select: str | None, choose: Callable[[list[str]], list[str]],
            max_failure_rate: float = 0.5, instance: dg.DagsterInstance | None = None) -> PreparedBuild:
    """Resolve and plan ``select``; a selection that does not work, or reads assets that were
    never materialized, is a :class:`BuildError` before anything runs."""
    graph = defs.resolve_asset_graph()
    selected = selected_keys(graph, select)
    slices = plan(graph, selected, choose)
    instance = instance or dg.DagsterInstance.get()
    missing = unbuilt_inputs(graph, selected, slices, instance)
    if missing:
        raise _unbuilt_error(graph, selected, missing, select)
    return PreparedBuild(defs, graph, slices, instance, max_failure_rate)


def prepare_build(config: Path, profile: str, select: str | None,
                  choose: Callable[[list[str]], list[str]]) -> PreparedBuild:
    """The project's build of ``select`` (the main job when None), checked before it runs."""
    defs, max_failure_rate = _definitions(config, profile)
    prepared = prepare(defs, select, choose, max_failure_rate)
    prepared.source = (config, profile)
    return prepared


def run_build(config: Path, profile: str, select: str | None, choose: Callable[[list[str]], list[str]],
              progress: BuildProgress, workers: int = 1) -> dict[str, Any]:
    """Materialize ``select``; return a summary. Raises :class:`BuildError` when it cannot start."""
    return prepare_build(config, profile, select, choose).run(progress, workers)


def materialize(defs: dg.Definitions, select: str | None, choose: Callable[[list[str]], list[str]],
                progress: BuildProgress, max_failure_rate: float = 0.5,
                instance: dg.DagsterInstance | None = None) -> dict[str, Any]:
    """Materialize ``select`` of ``defs`` (definitions built elsewhere, as in tests), in this process."""
    return prepare(defs, select, choose, max_failure_rate, instance).run(progress)


class _Build:
    """Runs slices and keeps the tally: rows, errors and skips per asset, checks, the stop."""

    def __init__(self, defs: dg.Definitions, graph: Any, instance: dg.DagsterInstance, progress: BuildProgress,
                 pool: ProcessPoolExecutor | None = None, workers: int = 1,
                 interrupted: Callable[[], bool] | None = None) -> None:
        self.defs, self.graph, self.instance, self.progress = defs, graph, instance, progress
        #: Dagster swallows a SIGINT or SIGTERM that lands in its own run between steps (its
        #: handler only notes it, and forgets it when the run ends): this says one came, and
        #: the build stops at the next run's edge instead of going on
        self.interrupted = interrupted or (lambda: False)
        #: worker processes for the shards of a slice (None: every run in this process)
        self.pool, self.workers = pool, workers
        self.entries: dict[str, dict[str, Any]] = {}
        self.failed_checks: list[str] = []
        self.warned_checks: list[str] = []
        self.notes: list[str] = []
        #: partitions (None: unpartitioned) of each asset this build failed or skipped
        self.not_built: dict[dg.AssetKey, set[str | None]] = {}
        self.failed = self.skipped = self.runs = self.not_started = 0
        #: the message of an error every further run would repeat; set, nothing more runs
        self.stopped: str | None = None
        #: step (op) name -> asset keys it writes, to name the asset behind a failed step
        self.step_assets = {a.node_def.name: list(a.keys) for a in defs.assets or []
                            if isinstance(a, dg.AssetsDefinition) and a.is_executable}

    def _entry(self, name: str) -> dict[str, Any]:
        return self.entries.setdefault(name, {"asset": name, "partitions": 0, "rows": 0, "errors": [],
                                              "skipped": [], "counts": {}})

    def _skip(self, keys: list[dg.AssetKey], part: str | None, why: str) -> None:
        for key in keys:
            self._entry(key.to_user_string())["skipped"].append(f"[{part}] {why}" if part else why)
            self.not_built.setdefault(key, set()).add(part)
        self.skipped += len(keys)

    def _blocked(self, keys: list[dg.AssetKey], part: str | None) -> list[str]:
        """Upstream assets of ``keys`` this build failed to write where ``part`` reads them (an
        unpartitioned asset reads every partition)."""
        def missing(parent: dg.AssetKey) -> bool:
            parts = self.not_built.get(parent, set())
            return bool(parts) and (part is None or part in parts or None in parts)

        return sorted({p.to_user_string() for k in keys for p in self.graph.get(k).parent_keys
                       if p not in keys and missing(p)})

    def _not_run(self, keys: list[dg.AssetKey], part: str | None) -> str | None:
        """Why a run of ``keys`` for ``part`` would only repeat a failure already reported, or None."""
        if self.stopped:
            return "not run: the build stopped"
        blocked = self._blocked(keys, part)
        return f"not run: upstream failed ({', '.join(blocked)})" if blocked else None

    def run_slice(self, keys: list[dg.AssetKey], parts: list[str | None]) -> None:
        """Run ``keys`` for every partition of ``parts`` (an unpartitioned slice: wave by wave,
        see :func:`waves`): one after another in this process, or in the worker pool; either
        way folded into the tally in plan order, so the summary does not depend on which
        worker finished first."""
        if parts == [None]:
            for wave in waves(self.graph, keys):
                self._run_all([(run, None) for run in wave])
            return
        self._run_all([(keys, part) for part in parts])

    def _run_all(self, runs: list[tuple[list[dg.AssetKey], str | None]]) -> None:
        """Run independent ``runs`` (keys, partition): in the pool when there is one."""
        if self.pool is None or len(runs) < 2:
            for keys, part in runs:
                self.run(keys, part)
            return
        records = self._run_parallel([(i, keys, part) for i, (keys, part) in enumerate(runs)
                                      if self._not_run(keys, part) is None])
        for i, (keys, part) in enumerate(runs):
            if i in records:
                self.runs += 1
                self._tally(records[i], keys, part)
            else:
                self._skip_run(keys, part, report=True)

    def _run_parallel(self, runs: list[tuple[int, list[dg.AssetKey], str | None]]) -> dict[int, RunRecord]:
        """Run ``runs`` (index, keys, partition) in the pool, at most ``workers`` at a time, so
        that a fatal error (a rejected API key) leaves the rest unstarted, as it does in one
        process; their records by index."""
        assert self.pool is not None
        queue = list(runs)
        running: dict[Future[RunRecord], tuple[int, list[dg.AssetKey], str | None]] = {}
        records: dict[int, RunRecord] = {}
        stop = self.stopped is not None
        while queue or running:
            while queue and not stop and len(running) < self.workers:
                self._check_interrupt()
                run = queue.pop(0)
                running[self.pool.submit(_execute_in_worker, run[1], run[2])] = run
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                i, keys, part = running.pop(future)
                records[i] = record = _record_of(future)
                stop = stop or record.fatal
                self.progress.step(_label(keys, part), record.rows, bool(record.failures), record.accepted)
        return records

    def _skip_run(self, keys: list[dg.AssetKey], part: str | None, report: bool = False) -> None:
        """Count a run not started; with ``report``, it is one the progress view has not shown."""
        why = self._not_run(keys, part) or "not run: the build stopped"
        self.not_started += why == "not run: the build stopped"
        self._skip(keys, part, why)
        if report:
            self.progress.step(_label(keys, part), 0, True)

    def run(self, keys: list[dg.AssetKey], part: str | None) -> None:
        if self._not_run(keys, part):  # running it would only repeat a failure already reported
            self._skip_run(keys, part, report=True)
            return
        self._check_interrupt()
        record = execute(self.defs, keys, part, self.instance)
        if record.interrupted:  # Dagster caught the interrupt inside the step: pass it on as one
            raise KeyboardInterrupt
        self._check_interrupt()
        self.runs += 1
        self._tally(record, keys, part)
        self.progress.step(_label(keys, part), record.rows, bool(record.failures), record.accepted)

    def _check_interrupt(self) -> None:
        if self.interrupted():
            raise KeyboardInterrupt

    def _tally(self, record: RunRecord, keys: list[dg.AssetKey], part: str | None) -> None:
        self.notes += record.notes
        failed_keys: set[dg.AssetKey] = set()
        for step, message, fatal in record.failures:
            for key in self.step_assets.get(step.split("[")[0], keys):
                if key in keys:
                    failed_keys.add(key)
                    self._entry(key.to_user_string())["errors"].append(f"[{part}] {message}" if part else message)
                    self.not_built.setdefault(key, set()).add(part)
            if fatal and self.stopped is None:
                self.stopped = message
        self.failed += len(record.failures)
        for key in keys:
            name = key.to_user_string()
            entry = self._entry(name)
            if name in record.counts:
                entry["partitions"] += record.materialized.get(name, 1)
                entry["rows"] += record.counts[name].get("dagster/row_count", 0)
                for k, v in record.counts[name].items():
                    entry["counts"][k] = entry["counts"].get(k, 0) + v
            elif key not in failed_keys:  # neither written nor failed: Dagster did not run it
                self._skip([key], part, "not run: an upstream step failed")
        for check, error in record.checks:
            name = check + (f" [{part}]" if part else "")
            (self.failed_checks if error else self.warned_checks).append(name)

    def _failure_rates(self, max_rate: float) -> None:
        """Flag each asset most of whose rows failed; not again the ones below a flagged one."""
        flagged: set[dg.AssetKey] = set()
        for key in self.graph.toposorted_asset_keys:
            entry = self.entries.get(key.to_user_string())
            verdict = _failure_rate(entry, max_rate) if entry else None
            if entry is None or verdict is None:
                continue
            if not (self.graph.get(key).parent_keys & flagged):
                entry["errors"].append(verdict)
            flagged.add(key)

    def summary(self, max_failure_rate: float = 0.5) -> dict[str, Any]:
        self._failure_rates(max_failure_rate)
        by_error: dict[str, list[str]] = {}  # one line per error, naming every asset it hit
        for entry in self.entries.values():
            entry["status"] = ("failed" if entry["errors"] else "ok" if not entry["skipped"]
                               else "partly skipped" if entry["partitions"] else "skipped")
            if entry["errors"]:
                more = len(entry["errors"]) - 1
                by_error.setdefault(entry["errors"][0] + (f" (and {more} more)" if more else ""),
                                    []).append(entry["asset"])
        causes = [f"{', '.join(sorted(assets))}: {error}" for error, assets in by_error.items()]
        causes += [f"check failed: {c}" for c in self.failed_checks]
        if self.not_started:  # the error that stopped it is among the causes above
            causes.append(f"the build stopped there: {self.not_started} run(s) were not started")
        if not causes and self.skipped:
            causes.append(f"{self.skipped} step(s) did not run")
        return {"assets": list(self.entries.values()), "failed": self.failed, "skipped": self.skipped,
                "failed_checks": self.failed_checks, "warned_checks": self.warned_checks,
                "runs": self.runs, "notes": self.notes, "causes": causes, "ok": not causes,
                "budget_exhausted": sum(e["counts"].get("rows_budget_exhausted", 0) for e in self.entries.values())}


def _record_of(future: Future[RunRecord]) -> RunRecord:
    """A worker's record; a worker that died (killed, out of memory) is a failed run, not a lost one."""
    try:
        return future.result()
    except Exception as exc:  # BrokenProcessPool, an error loading the definitions there
        return RunRecord(failures=[("", f"the worker process failed: {type(exc).__name__}: {exc}", False)])


def _label(keys: list[dg.AssetKey], part: str | None) -> str:
    """How the progress view names a run: its first assets and partition."""
    label = ", ".join(k.to_user_string() for k in keys[:2]) + (" ..." if len(keys) > 2 else "")
    return f"{label} [{part}]" if part else label


def _failure_rate(entry: dict[str, Any], max_rate: float) -> str | None:
    """Why an asset's failed rows are too many, or None: a source's quarantined rows out of
    those read, a shard stage's rows that did not end ok (or pass) out of its rows."""
    counts = entry["counts"]
    if "rows_read" in counts:
        total, failed = counts["rows_read"], counts.get("rows_quarantined", 0)
    elif any(k in counts for k in STAGE_OK_KEYS):
        total = counts.get("dagster/row_count", 0)
        # rows the budget stopped are not failed: a rerun with a higher cap resumes them
        failed = total - next(counts[k] for k in STAGE_OK_KEYS if k in counts) - counts.get("rows_budget_exhausted", 0)
    else:
        return None
    if total <= 0 or failed <= 0:
        return None
    if failed == total:
        return f"every row failed ({failed} of {total})"
    if failed / total > max_rate:
        return f"{failed} of {total} rows failed ({failed / total:.0%}; stages.max_failure_rate is {max_rate:.0%})"
    return None
