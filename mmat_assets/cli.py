"""The ``mmat`` command line: plugins, build (through Dagster), and friends."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="mmat: build multimodal agent-tuning data and tune VLMs on it, as Dagster assets.",
                  no_args_is_help=True, add_completion=False)
console = Console()

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
    """List every registered implementation: role, plugin, version, available here or why not."""
    from mmat_assets.config import load_config
    from mmat_assets.plugins import load_registry

    registry = load_registry()
    cfg = load_config(config) if config.exists() else None
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
        return
    table = Table(title="mmat plugins")
    for col in ("role", "name", "plugin", "version", "available"):
        table.add_column(col)
    for r in rows:
        mark = ("[green]yes[/]" if r["available"] else "[red]no[/]") + (f": {r['reason']}" if r["reason"] else "")
        table.add_row(r["role"], r["name"], f"{r['plugin']} {r['plugin_version']}", r["version"], mark)
    console.print(table)
    for err in registry.errors:
        console.print(f"[red]error:[/] {err}")
    for name in registry.blocked:
        console.print(f"[yellow]blocked:[/] {name}")


DAGSTER_YAML = """\
# Written by mmat: runs launched from the UI start at once, with no daemon needed.
run_coordinator:
  module: dagster._core.run_coordinator
  class: DefaultRunCoordinator
telemetry:
  enabled: false
"""


def ensure_dagster_home(config: Path) -> Path:
    """``$DAGSTER_HOME``, defaulting to ``.mmat/dagster_home`` beside the config; created."""
    home = Path(os.environ.get("DAGSTER_HOME") or config.resolve().parent / ".mmat" / "dagster_home")
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        (home / "dagster.yaml").write_text(DAGSTER_YAML, encoding="utf-8")
    nux = home / ".nux" / "nux.yaml"
    if not nux.exists():  # the UI's welcome pop-up would cover the page
        nux.parent.mkdir(exist_ok=True)
        nux.write_text("seen: 1\n", encoding="utf-8")
    os.environ["DAGSTER_HOME"] = str(home)
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
        help="Dagster asset selection, e.g. 'group:foundation' (default: the main job: everything up to the evaluation report).")] = None,
    shards: Annotated[str | None, typer.Option(help="Shards to build, e.g. '0-3,7' (default all).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Materialize assets through Dagster (the same definitions and instance the UI uses)."""
    from mmat_assets.runner import BuildProgress, run_build

    ensure_dagster_home(config)
    started = time.time()
    with BuildProgress(console, enabled=not as_json) as progress:
        summary = run_build(config, profile, select, lambda keys: _parse_shards(shards, keys), progress)
    summary["seconds"] = round(time.time() - started, 1)
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
    if summary["failed"]:
        raise typer.Exit(code=1)


def _print_summary(summary: dict[str, Any]) -> None:
    table = Table(title=f"build: {summary['runs']} runs in {summary['seconds']} s")
    for col in ("asset", "partitions", "rows", "status"):
        table.add_column(col)
    for a in summary["assets"]:
        status = "[green]ok[/]" if not a["errors"] else "[red]failed[/]: " + "; ".join(a["errors"])[:300]
        table.add_row(a["asset"], str(a["partitions"]), str(a["rows"]), status)
    console.print(table)
    for note in summary.get("notes", []):
        console.print(note)
    for f in summary["failed_checks"]:
        console.print(f"[red]check failed:[/] {f}")
    if summary["failed"]:
        console.print(f"[red bold]{summary['failed']} step(s) failed or skipped[/]; details in the Dagster UI "
                      f"(run history) under $DAGSTER_HOME={os.environ.get('DAGSTER_HOME', '')}")


ProfileOpt = Annotated[str, typer.Option(help="Storage profile: local or prod.", envvar="MMAT_PROFILE")]
SampleArg = Annotated[str, typer.Argument(help="A sample id, or a unique prefix of one (at least 4 characters).")]


def _tables(config: Path, profile: str) -> Any:
    """The stored tables of the project's ``profile`` (endpoint from the profile's variable)."""
    from mmat_assets.config import load_config
    from mmat_assets.engine.lineage import tables_for

    if not config.exists():
        raise typer.BadParameter(f"no project config at {config}", param_hint="--config")
    cfg = load_config(config)
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
    from mmat_assets.engine.lineage import audit as collect

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
    sys.exit(main())
