"""The ``mmat`` command line: plugins, build (through Dagster), and friends."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

app = typer.Typer(help="mmat: build multimodal agent-tuning data and tune VLMs on it, as Dagster assets.",
                  no_args_is_help=True, add_completion=False)
console = Console()
#: Errors that stop a command before it does anything go to stderr, so --json output stays JSON.
err_console = Console(stderr=True)
BLOCK_HINT = "MMAT_BLOCK_PLUGINS=<plugin>[,<plugin>...]"

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Project config file.",
                                         envvar="MMAT_CONFIG")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def _availability(impl: Any, options: dict[str, Any], base_dir: Path) -> tuple[bool, str, bool]:
    """(available, reason, configured) of one implementation with the configured options."""
    from pydantic import ValidationError

    try:
        obj = impl.cls(options)
    except ValidationError as exc:  # required options unset: the code can run, it is not set up
        needs = sorted({str(e["loc"][0]) for e in exc.errors() if e.get("loc")})
        return True, f"not configured (needs: {', '.join(needs)})", False
    obj.base_dir = base_dir
    try:
        avail = obj.availability()
    except Exception as exc:  # a probe that breaks is itself the reason
        return False, f"{type(exc).__name__}: {exc}", True
    return bool(avail.ok), avail.reason, True


def _configured_options(cfg: Any, role: str, name: str) -> dict[str, Any]:
    if cfg is None:
        return {}
    if role == "source":
        for scfg in cfg.sources.values():
            if scfg.plugin == name:
                return scfg.options
    section = {"tool": cfg.tools, "retriever": cfg.retrievers, "teacher": cfg.teachers,
               "benchmark": cfg.evaluation.benchmarks}.get(role, {})
    for key, ccfg in section.items():
        if (ccfg.plugin or key) == name:
            return ccfg.options
    return {}


@app.command()
def plugins(config: ConfigOpt = Path("mmat.yaml"), as_json: JsonOpt = False) -> None:
    """List every registered implementation: role, plugin, version, available here or why not.

    Exits 1 when a plugin failed to load or to register (each named, the rest still listed);
    block one with MMAT_BLOCK_PLUGINS=name."""
    from mmat_assets.plugins import load_registry
    from mmat_assets.runner import BuildError, read_config

    registry = load_registry()
    try:
        cfg = read_config(config) if config.exists() else None
    except BuildError as exc:
        _stop(exc, as_json)
    base = cfg.base_dir if cfg else Path.cwd()
    rows = []
    for impl in registry.all():
        ok, reason, configured = _availability(impl, _configured_options(cfg, impl.role, impl.name), base)
        rows.append({"role": impl.role, "name": impl.name, "plugin": impl.plugin,
                     "plugin_version": impl.plugin_version, "version": impl.cls.version,
                     "available": ok, "configured": configured, "reason": reason})
    if as_json:
        print(json.dumps({"implementations": rows, "errors": registry.errors,
                          "blocked": registry.blocked}, indent=2))
    else:
        _print_plugins(rows, registry)
    if registry.errors:
        raise typer.Exit(code=1)


def _print_plugins(rows: list[dict[str, Any]], registry: Any) -> None:
    table = Table(title="mmat plugins")
    for col in ("role", "name", "plugin", "version", "available"):
        table.add_column(col)
    for r in rows:
        mark = ("[green]yes[/]" if r["available"] else "[red]no[/]") + (f": {r['reason']}" if r["reason"] else "")
        table.add_row(r["role"], r["name"], f"{r['plugin']} {r['plugin_version']}", r["version"], mark)
    console.print(table)
    for err in registry.errors:
        console.print(f"[red]error:[/] {escape(err)}", soft_wrap=True)
    if registry.errors:
        console.print(f"a broken plugin can be left out with {BLOCK_HINT}", soft_wrap=True)
    for name in registry.blocked:
        console.print(f"[yellow]blocked:[/] {escape(name)}")


#: Runs name their shards with Dagster's own tags: ``dagster/partition`` (a run of one shard)
#: and ``dagster/asset_partition_range_start`` (a backfill's batch of shards_per_run shards,
#: chunked from the first shard it asks for). One run per value of each at a time: a second
#: launch of a shard or batch queues until the first ends instead of racing it. Two batches
#: that overlap without starting at the same shard are not held apart (the caches' leases
#: still keep them from paying for one request twice).
SHARD_TAG_LIMITS = """\
    tag_concurrency_limits:
      - key: dagster/partition
        value: {applyLimitPerUniqueValue: true}
        limit: 1
      - key: dagster/asset_partition_range_start
        value: {applyLimitPerUniqueValue: true}
        limit: 1
"""

#: Dagster's run monitoring (a daemon loop), the same keys as infra/dagster.yaml: a run whose
#: worker never comes up fails after start_timeout_seconds, a cancel that hangs ends after
#: cancel_timeout_seconds, and pool slots a dead run still holds are freed. The default run
#: launcher has no run-worker health check: a worker that dies is failed by the code server
#: that started it.
RUN_MONITORING = """\
run_monitoring:
  enabled: true
  start_timeout_seconds: 300
  cancel_timeout_seconds: 300
  poll_interval_seconds: 60
  max_resume_run_attempts: 0
  free_slots_after_run_end_seconds: 300
"""

DAGSTER_YAML = """\
# Written by mmat. Runs launched from the UI or by `mmat build --launch` queue, and the
# daemon (part of `dagster dev`; else `dagster-daemon run`) starts them, one run per shard
# at a time, and ends runs whose worker never started (run_monitoring). `mmat build`
# without --launch runs in its own processes and needs no daemon.
run_coordinator:
  module: dagster._core.run_coordinator
  class: QueuedRunCoordinator
  config:
""" + SHARD_TAG_LIMITS + """\
""" + RUN_MONITORING + """\
telemetry:
  enabled: false
"""


def ensure_dagster_home(config: Path) -> Path:
    """``$DAGSTER_HOME``, defaulting to ``.mmat/dagster_home`` beside the config; created."""
    import dagster as dg

    from mmat_assets.engine.leases import atomic_write, exclusive_lock

    home = Path(os.environ.get("DAGSTER_HOME") or config.resolve().parent / ".mmat" / "dagster_home")
    home.mkdir(parents=True, exist_ok=True)
    # Dagster creates its sqlite tables on first use, and two processes doing that at once
    # collide ("table runs already exists"): one sets the home up, the others wait for it.
    with exclusive_lock(home / ".mmat-setup.lock"):
        if not (home / "dagster.yaml").exists():
            atomic_write(home / "dagster.yaml", DAGSTER_YAML.encode("utf-8"))
        nux = home / ".nux" / "nux.yaml"
        if not nux.exists():  # the UI's welcome pop-up would cover the page
            atomic_write(nux, b"seen: 1\n")
        os.environ["DAGSTER_HOME"] = str(home)
        dg.DagsterInstance.get().dispose()  # creates the storages while we hold the lock
    return home


def _parse_shards(spec: str | None, keys: list[str]) -> list[str]:
    if not spec:
        return keys
    chosen: list[str] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        for i in range(int(lo), int(hi or lo) + 1):
            if i >= len(keys):
                raise typer.BadParameter(f"shard {i} does not exist (have {len(keys)})")
            chosen.append(keys[i])
    return chosen


@app.command()
def build(
    config: ConfigOpt = Path("mmat.yaml"),
    profile: Annotated[str, typer.Option(help="Storage profile: local or prod.", envvar="MMAT_PROFILE")] = "local",
    select: Annotated[str | None, typer.Option(
        help="Dagster asset selection, e.g. 'group:foundation', 'key:\"exports/*\"' or '*dialogue_files' "
             "(default: the main job: everything up to the evaluation report).")] = None,
    shards: Annotated[str | None, typer.Option(help="Shards to build, e.g. '0-3,7' (default all).")] = None,
    workers: Annotated[int | None, typer.Option(
        min=1, help="Shard runs at once, each in its own process (default: the machine's cores).")] = None,
    launch: Annotated[bool, typer.Option(
        "--launch", help="Submit the selection to the instance as a backfill, run by the Dagster daemon and "
                         "the instance's run launcher, and follow it (Ctrl-C detaches; it goes on).")] = False,
    follow: Annotated[str | None, typer.Option(
        "--follow", metavar="BACKFILL_ID", help="Follow a backfill launched before, to its end.")] = None,
    budget: Annotated[float | None, typer.Option(
        "--budget", min=0.0, help="Spending cap in USD (overrides stages.budget_usd): at the cap no new "
                                  "teacher request is sent and the build exits 3; rerun with more to resume.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Materialize assets through Dagster (the same definitions and instance the UI uses).

    Slices of the graph run in order; the shards of one slice run side by side in --workers
    processes (each loads the definitions once); the tables written are the same as with
    --workers 1. With --launch the daemon runs it instead, foundation.shards_per_run shards per
    run, one run per shard at a time (a daemon must be running: `make ui`, or `dagster-daemon
    run -f definitions.py` with MMAT_CONFIG set); the same summary and exit codes follow.
    Cancel a launched build with `mmat cancel BACKFILL_ID`.

    Exit codes: 0 when everything selected was built; 1 when something failed, each cause named
    at the end: a failed step, a failed ERROR-severity check (WARN ones are only listed), an
    asset more of whose rows failed than stages.max_failure_rate allows (default 50%) or all
    of whose rows failed, a teacher that rejected its API key (the build stops at once); and,
    before anything runs, a plugin that failed to load (any plugin: leave it out with
    MMAT_BLOCK_PLUGINS) or an upstream asset the selection reads but that was never
    materialized; 2 for a --select that does not parse or matches nothing, or a bad config;
    3 when the budget (--budget, stages.budget_usd) stopped it with nothing else failed;
    130 after Ctrl-C and 143 after SIGTERM: the runs in flight, workers' too, are interrupted,
    and a rerun resumes what is missing.
    An error that stops a build before it starts is one line on stderr (with --json, also a
    JSON object with "error" on stdout).
    """
    from mmat_assets.runner import BuildError, BuildProgress, prepare_build

    ensure_dagster_home(config)
    started = time.time()
    if budget is not None:  # through the environment, so worker processes see it too
        from mmat_assets.config import BUDGET_ENV

        os.environ[BUDGET_ENV] = repr(budget)
    try:
        prepared = prepare_build(config, profile, select, lambda keys: _parse_shards(shards, keys))
        backfill_id = follow or (_submit(prepared, config, as_json) if launch else None)
    except BuildError as exc:
        _stop(exc, as_json)
    stopped_by: list[str] = []
    try:
        with _sigterm_as_interrupt(stopped_by) as interrupted, BuildProgress(console, enabled=not as_json) as progress:
            if backfill_id is None:
                summary = prepared.run(progress, workers or os.cpu_count() or 1, interrupted)
            else:
                summary = _follow(prepared, backfill_id, progress, as_json)
    except KeyboardInterrupt:
        by = stopped_by[0] if stopped_by else "Ctrl-C"
        err_console.print(f"stopped by {by}: the runs in flight were interrupted and no new one started; "
                          "`mmat build` again resumes what is missing (answers already received are in the cache)",
                          soft_wrap=True)
        raise typer.Exit(code=143 if stopped_by else 130) from None
    summary["seconds"] = round(time.time() - started, 1)
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
    if summary["causes"]:
        raise typer.Exit(code=1)
    if summary.get("budget_exhausted"):
        from mmat_assets.engine.budget import BUDGET_EXIT_CODE

        err_console.print(f"budget reached: {summary['budget_exhausted']} row(s) not finished "
                          "(status budget_exhausted); raise --budget / stages.budget_usd and rerun to resume",
                          soft_wrap=True)
        raise typer.Exit(code=BUDGET_EXIT_CODE)


@contextmanager
def _sigterm_as_interrupt(stopped_by: list[str]) -> Iterator[Callable[[], bool]]:
    """SIGTERM (``kill``, a service manager, a CI timeout) stops a build the way Ctrl-C does:
    runs end as interrupted and worker processes stop, instead of the process vanishing and
    leaving its workers to go on sending requests. The name of the signal goes to ``stopped_by``.

    A step run in this process swaps the handlers (Dagster maps SIGTERM to its own SIGINT
    handler while a step runs, and leaves Python's behind): the signal numbers the interpreter
    writes to its wakeup socket still say which signal it was. Yields a check for a SIGINT or
    SIGTERM that came and was swallowed (Dagster's handler between the steps of a run in this
    process only notes one): the build calls it between runs and stops."""
    def on_term(signum: int, frame: Any) -> None:
        stopped_by.append("SIGTERM")
        os.kill(os.getpid(), signal.SIGINT)  # Dagster's own interrupt handling, where it has one

    reader, writer = socket.socketpair()
    for end in (reader, writer):
        end.setblocking(False)
    previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    previous = signal.signal(signal.SIGTERM, on_term)

    def interrupted() -> bool:
        got = _signals_received(reader)
        if signal.SIGTERM in got and not stopped_by:
            stopped_by.append("SIGTERM")
        return bool(got & {signal.SIGINT, signal.SIGTERM})

    try:
        yield interrupted
    except KeyboardInterrupt:
        if not stopped_by and signal.SIGTERM in _signals_received(reader):
            stopped_by.append("SIGTERM")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.set_wakeup_fd(previous_fd)
        reader.close()
        writer.close()


def _signals_received(reader: socket.socket) -> set[int]:
    got: set[int] = set()
    with suppress(BlockingIOError):
        while chunk := reader.recv(4096):
            got.update(chunk)
    return got


def _stop(exc: Exception, as_json: bool) -> NoReturn:
    """End a command that could not start: one line on stderr (and JSON), its exit code."""
    code = getattr(exc, "exit_code", 1)
    err_console.print(Text("error: ", style="bold red") + Text(str(exc)), soft_wrap=True)
    if as_json:
        print(json.dumps({"error": str(exc), "exit_code": code, "causes": [str(exc)], "ok": False}))
    raise typer.Exit(code=code) from None


def _submit(prepared: Any, config: Path, as_json: bool) -> str:
    from mmat_assets.launch import submit

    backfill_id = submit(prepared, config, title=f"mmat build {config.resolve().parent.name}")
    if not as_json:
        console.print(f"launched backfill [bold]{backfill_id}[/] (follow it: mmat build --follow {backfill_id}; "
                      f"cancel it: mmat cancel {backfill_id})", soft_wrap=True)
    return backfill_id


def _follow(prepared: Any, backfill_id: str, progress: Any, as_json: bool) -> dict[str, Any]:
    """Follow a backfill; Ctrl-C detaches (the backfill goes on) and says how to come back."""
    from mmat_assets.launch import follow
    from mmat_assets.runner import BuildError

    try:
        return follow(prepared, backfill_id, progress)
    except BuildError as exc:
        _stop(exc, as_json)
    except KeyboardInterrupt:
        err_console.print(f"detached; backfill {backfill_id} goes on. Follow it with `mmat build --follow "
                          f"{backfill_id}` or in the UI (`make ui`: http://127.0.0.1:3000/runs/b/{backfill_id}); "
                          f"cancel it with `mmat cancel {backfill_id}`", soft_wrap=True)
        raise typer.Exit(code=130) from None


@app.command()
def cancel(backfill_id: Annotated[str, typer.Argument(help="The id `mmat build --launch` printed.")],
           config: ConfigOpt = Path("mmat.yaml")) -> None:
    """Cancel a launched build: the daemon starts no more of its runs and cancels those in flight."""
    import dagster as dg

    from mmat_assets.launch import cancel as cancel_backfill
    from mmat_assets.runner import BuildError

    ensure_dagster_home(config)
    try:
        cancel_backfill(dg.DagsterInstance.get(), backfill_id)
    except BuildError as exc:
        _stop(exc, False)
    console.print(f"backfill {backfill_id}: canceling")


@app.command()
def estimate(
    config: ConfigOpt = Path("mmat.yaml"),
    profile: Annotated[str, typer.Option(help="Storage profile: local or prod.", envvar="MMAT_PROFILE")] = "local",
    select: Annotated[str | None, typer.Option(help="Asset selection; its teacher stages (rationales, "
                                               "reflections) are estimated (default both).")] = None,
    sample: Annotated[int, typer.Option("--sample", min=1, help="Pilot rows.")] = 50,
    seed: Annotated[int, typer.Option(help="Seed of the pilot draw.")] = 0,
    workers: Annotated[int, typer.Option(min=1, help="Shard processes the build will run at once.")] = 1,
    as_json: JsonOpt = False,
) -> None:
    """What a build will cost: run the teacher stages on a seeded pilot of --sample rows of the
    built foundation tables, through the real teacher and each shard's request cache (the build
    reuses those answers), and extrapolate requests, tokens, dollars and wall time per stage,
    each with a 95% bootstrap interval over the pilot rows."""
    from mmat_assets.estimate import FIGURES, estimate_project, table
    from mmat_assets.runner import BuildError

    ensure_dagster_home(config)
    try:
        estimates = estimate_project(config, profile, select, sample, seed, workers)
    except (BuildError, FileNotFoundError, ValueError, KeyError) as exc:
        _stop(exc, as_json)
    if as_json:
        print(json.dumps([e.to_dict() for e in estimates], indent=2))
        return
    out = Table(title=f"estimate from a pilot of {sample} rows (95% bootstrap intervals)")
    for name in ("stage", *FIGURES):
        out.add_column(name)
    for cells in table(estimates):
        out.add_row(*cells)
    console.print(out)


STATUS_STYLE = {"ok": "green", "failed": "red", "skipped": "yellow", "partly skipped": "yellow"}


def _status(entry: dict[str, Any]) -> str:
    status = entry.get("status", "ok")
    why = "; ".join(entry["errors"] or entry.get("skipped") or [])
    return f"[{STATUS_STYLE[status]}]{status}[/]" + (f": {escape(why[:300])}" if why and status != "ok" else "")


def _print_summary(summary: dict[str, Any]) -> None:
    table = Table(title=f"build: {summary['runs']} runs in {summary['seconds']} s")
    for col in ("asset", "partitions", "rows", "status"):
        table.add_column(col)
    for a in summary["assets"]:
        table.add_row(a["asset"], str(a["partitions"]), str(a["rows"]), _status(a))
    console.print(table)
    for note in summary.get("notes", []):
        console.print(note)
    if summary.get("usd"):  # what the teacher's requests recorded during this build
        console.print(f"teacher: ${summary['usd']:.4f} (${summary.get('usd_per_accepted_sample', 0.0):.4f} "
                      "per accepted sample)")
    for w in summary.get("warned_checks", []):
        console.print(f"[yellow]check warned:[/] {escape(w)}", soft_wrap=True)
    if summary["failed"] or summary.get("skipped"):
        console.print(f"[red bold]{summary['failed']} step(s) failed, {summary.get('skipped', 0)} skipped; "
                      f"the failed or skipped steps are in the Dagster UI (run history) under "
                      f"$DAGSTER_HOME={os.environ.get('DAGSTER_HOME', '')}[/]", soft_wrap=True)
    if summary["causes"]:
        console.print(f"[red bold]build failed[/] ({len(summary['causes'])} cause(s)):")
        for cause in summary["causes"]:
            console.print(f"  [red]-[/] {escape(cause)}", soft_wrap=True)


ProfileOpt = Annotated[str, typer.Option(help="Storage profile: local or prod.", envvar="MMAT_PROFILE")]
SampleArg = Annotated[str, typer.Argument(help="A sample id, or a unique prefix of one (at least 4 characters).")]


def _tables(config: Path, profile: str) -> Any:
    """The stored tables of the project's ``profile`` (endpoint from the profile's variable)."""
    from mmat_assets.engine.lineage import tables_for
    from mmat_assets.runner import BuildError, read_config

    if not config.exists():
        raise typer.BadParameter(f"no project config at {config}", param_hint="--config")
    try:
        cfg = read_config(config)
    except BuildError as exc:
        _stop(exc, False)
    prof = cfg.profiles.get(profile)
    if prof is None:
        raise typer.BadParameter(f"profile {profile!r} is not configured (have: {sorted(cfg.profiles)})",
                                 param_hint="--profile")
    endpoint = os.environ.get(prof.endpoint_url_env) if prof.endpoint_url_env else None
    return tables_for(cfg.profile_root(profile), {"endpoint_url": endpoint} if endpoint else None)


def _lookup(fn: Any, *args: Any) -> Any:
    """Run a lineage query; a missing sample, export or model is a clear error and exit 1."""
    from mmat_assets.engine.lineage import LineageError

    try:
        with console.status("reading tables…"):
            return fn(*args)
    except (LineageError, OSError) as exc:  # OSError: storage unreachable, a file that cannot be written
        console.print(f"[red]error:[/] {exc}", markup=True, highlight=False)
        raise typer.Exit(code=1) from None


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _sample_view(query: str, renderer: str, config: Path, profile: str, sample_id: str, as_json: bool) -> None:
    """Run one of the lineage module's sample queries and print it as JSON or rendered."""
    from mmat_assets.engine import lineage, lineage_render

    data = _lookup(getattr(lineage, query), _tables(config, profile), sample_id)
    if as_json:
        print(json.dumps(data, indent=2, ensure_ascii=False, default=str))
    else:
        getattr(lineage_render, renderer)(data, console)


@app.command()
def show(sample_id: SampleArg, config: ConfigOpt = Path("mmat.yaml"), profile: ProfileOpt = "local",
         as_json: JsonOpt = False) -> None:
    """Show one sample: its question and image, its RR and ORR dialogues, and its tool calls."""
    _sample_view("show", "render_show", config, profile, sample_id, as_json)


@app.command()
def lineage(sample_id: SampleArg, config: ConfigOpt = Path("mmat.yaml"), profile: ProfileOpt = "local",
            as_json: JsonOpt = False) -> None:
    """Trace one sample: source row and licence, images, tool and teacher calls, reflection
    checks, the asset versions that wrote it, and the exports and models that hold it."""
    _sample_view("lineage", "render_lineage", config, profile, sample_id, as_json)


@app.command()
def audit(
    target: Annotated[str, typer.Argument(help="'tuned_model' (or a checkpoint folder), or an export: "
                                               "'exports/ms_swift' or 'ms_swift'.")],
    config: ConfigOpt = Path("mmat.yaml"), profile: ProfileOpt = "local", as_json: JsonOpt = False,
    html: Annotated[Path | None, typer.Option("--html", help="Also write a self-contained HTML report with charts "
                                                              "to this file.")] = None,
) -> None:
    """Audit a tuned model or an export: data version, shards, sources and licences
    (non-commercial flagged), teachers and tool versions, tokens and cost, reflection and
    failure rates, the yield funnel."""
    from mmat_assets.engine import audit_render
    from mmat_assets.engine.audit import audit as collect

    notes: list[str] = []
    data = _lookup(collect, _tables(config, profile), target, notes.append)
    if html is not None:
        _lookup(_write, html, audit_render.render_html(data))
    if as_json:
        print(audit_render.render_json(data))
        return
    for note in notes:
        if note.startswith("note:"):
            console.print(f"[yellow]{note}[/]")
    audit_render.render_text(data, console)
    if data.get("missing_rows"):
        console.print(f"[yellow]{data['missing_rows']} exported samples are no longer in the stage tables[/]")
    if html is not None:
        console.print(f"HTML report: {html.resolve()}")


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="mmat")


if __name__ == "__main__":  # pragma: no cover
    main()  # the app exits with the command's status itself
