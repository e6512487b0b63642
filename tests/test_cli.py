"""The command line and the code location, as a user runs them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
from rich.console import Console
from typer.testing import CliRunner

from mmat_assets.cli import app
from tests.conftest import REPO, write_project

runner = CliRunner()


def test_definitions_validate_with_the_dagster_cli() -> None:
    out = subprocess.run([str(Path(sys.executable).with_name("dagster")), "definitions", "validate",
                          "-f", "definitions.py"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Validation successful" in out.stderr + out.stdout


def test_plugins_lists_the_six_sources_with_availability() -> None:
    res = runner.invoke(app, ["plugins", "--json", "--config", str(REPO / "mmat.yaml")])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    sources = {r["name"]: r for r in data["implementations"] if r["role"] == "source"}
    assert {"tabmwp", "llava_cot", "visual_cot", "cauldron", "infoseek", "qa_table"} <= set(sources)
    assert sources["tabmwp"]["available"] and sources["tabmwp"]["configured"]
    assert sources["qa_table"]["configured"] is False
    assert "license" in sources["qa_table"]["reason"] and "path" in sources["qa_table"]["reason"]
    assert data["errors"] == []


def test_plugins_table_and_help() -> None:
    res = runner.invoke(app, ["plugins", "--config", str(REPO / "mmat.yaml")])
    assert res.exit_code == 0 and "tabmwp" in res.output and "sources_tabmwp" in res.output
    res = runner.invoke(app, ["build", "--help"])
    assert res.exit_code == 0 and "--shards" in res.output and "--profile" in res.output


def _run_build(cfg: Path, home: Path, *args: str, env: dict[str, str] | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DAGSTER_HOME": str(home), "COLUMNS": "200", **(env or {})}
    return subprocess.run([str(Path(sys.executable).with_name("mmat")), "build", "--config", str(cfg), *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


def entry_point_plugin(site: Path, name: str, body: str) -> Path:
    """A third-party plugin installed into ``site`` by entry point (module + dist-info), as pip
    would leave it; put ``site`` on the path (PYTHONPATH or sys.path) to install it."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{name}.py").write_text(body, encoding="utf-8")
    info = site / f"{name}-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n", encoding="utf-8")
    (info / "entry_points.txt").write_text(f"[mmat]\n{name} = {name}\n", encoding="utf-8")
    return site


def test_plugins_names_a_plugin_that_exits_at_import_and_fails(tmp_path: Path, monkeypatch) -> None:
    site = entry_point_plugin(tmp_path / "site", "exits_at_import", "import sys\nsys.exit(3)\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "exits_at_import", raising=False)
    res = runner.invoke(app, ["plugins", "--config", str(REPO / "mmat.yaml")])
    assert res.exit_code == 1, res.output
    assert "tabmwp" in res.output  # the others are still listed
    assert "'exits_at_import' failed to load: SystemExit" in res.output
    res = runner.invoke(app, ["plugins", "--json", "--config", str(REPO / "mmat.yaml")])
    assert res.exit_code == 1 and any("exits_at_import" in e for e in json.loads(res.output)["errors"])


@pytest.mark.slow
def test_build_materializes_selected_shards_and_reports_json(tmp_path: Path) -> None:
    data = REPO / "tests" / "fixtures" / "qa_table"
    jsonl = next(p for p in data.iterdir() if p.suffix == ".jsonl")
    cfg = write_project(tmp_path, {"qa": {"plugin": "qa_table", "options": {
        "path": str(jsonl), "license": "CC0-1.0", "image_root": str(data),
        "columns": {"question": "prompt", "answer": "gold", "id": "qid", "image": "img"}}}}, shards=3)
    home = tmp_path / "home"
    home.mkdir()
    out = _run_build(cfg, home, "--select", "group:foundation", "--shards", "0-1", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads(out.stdout)
    by_asset = {a["asset"]: a for a in summary["assets"]}
    assert by_asset["foundation_samples"]["partitions"] == 2
    assert summary["failed"] == 0 and summary["runs"] == 3 and summary["causes"] == []
    # the fixture's bad lines are quarantined, below the failure-rate limit
    counts = by_asset["source_samples/qa"]["counts"]
    assert counts["rows_read"] == 6 and 0 < counts["rows_quarantined"] <= 3


@pytest.mark.slow
def test_build_fails_when_every_row_of_a_source_is_quarantined(tmp_path: Path) -> None:
    """Columns that name nothing in the file: every row quarantined, which is no success."""
    data = REPO / "tests" / "fixtures" / "qa_table"
    cfg = write_project(tmp_path, {"qa": {"plugin": "qa_table", "options": {
        "path": str(data / "qa.jsonl"), "license": "CC0-1.0",
        "columns": {"question": "question", "answer": "answer"}}}}, shards=2)
    out = _run_build(cfg, tmp_path / "home", "--select", "group:foundation", timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    assert re.search(r"source_samples/qa: every row failed \(6 of 6\)", out.stdout), out.stdout


@pytest.mark.slow
def test_build_fails_with_a_readable_summary(tmp_path: Path) -> None:
    cfg = write_project(tmp_path, {"gone": {"plugin": "qa_table", "options": {
        "path": "does-not-exist.jsonl", "license": "CC0-1.0",
        "columns": {"question": "q", "answer": "a"}}}}, shards=2)
    # A reader that cannot open its file fails its source, loudly: never a silent empty source.
    home = tmp_path / "home"
    home.mkdir()
    out = _run_build(cfg, home)
    assert out.returncode == 1
    assert "failed" in out.stdout and "source_samples/gone" in out.stdout
    # what never ran because of it says so, instead of "ok" with 0 rows
    assert re.search(r"^│ foundation_samples +│ 0 +│ 0 +│ skipped: \[0\] not run: upstream failed", out.stdout,
                     re.M), out.stdout
    assert re.search(r"^│ dialogue_files +│ 0 +│ 0 +│ skipped", out.stdout, re.M), out.stdout
    assert re.search(r"^build failed \(1 cause\(s\)\):\n  - quarantine/source/gone, source_samples/gone: ",
                     out.stdout, re.M), out.stdout
    assert "source 'gone'" in out.stdout and "does-not-exist.jsonl" in out.stdout
    assert re.search(r"^\[1/\d+\] .*failures \d+", out.stdout, re.M)  # not a terminal: a progress line per run


@pytest.mark.slow
def test_build_on_a_terminal_shows_a_live_progress_bar_and_fails_readably(tmp_path: Path) -> None:
    """Through a pseudo-terminal (util-linux ``script``): the live bar, then the summary."""
    cfg = write_project(tmp_path, {"qa": {"plugin": "qa_table", "options": {
        "path": "q.jsonl", "license": "CC0-1.0", "columns": {"question": "q", "answer": "a"}}}}, shards=2)
    (tmp_path / "q.jsonl").write_text('{"q": "What is 1 + 1?", "a": "2"}\n', encoding="utf-8")
    (tmp_path / "store").write_text("not a directory")  # the storage root cannot be written: fatal
    home = tmp_path / "home"
    home.mkdir()
    mmat = Path(sys.executable).with_name("mmat")
    env = {**os.environ, "DAGSTER_HOME": str(home), "COLUMNS": "160", "TERM": "xterm"}
    out = subprocess.run(["script", "-qec", f"{mmat} build --config {cfg}", "/dev/null"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 1, out.stdout[-2000:]
    assert "\x1b[2K" in out.stdout  # a terminal: rich redraws the live line in place
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.stdout)
    assert "━" in text and re.search(r"\d+/\d+ rows \d+  failures [1-9]", text)  # the bar, counting failures
    assert not re.search(r"^\[1/\d+\]", text, re.M)  # the per-run lines are for logs, not terminals
    assert "source_samples/qa" in text and "NotADirectoryError" in text and "failed or skipped" in text


def test_the_main_job_builds_the_report_and_the_dialogue_files() -> None:
    from mmat_assets.assets import definitions_from_file
    from mmat_assets.runner import selected_keys

    graph = definitions_from_file(REPO / "mmat.yaml").resolve_asset_graph()
    main = selected_keys(graph, None)
    for key in ("evaluation_report", "dialogue_files", "tuned_model", "foundation_samples", "tools/ocr"):
        assert dg.AssetKey(key.split("/")) in main, key
    assert dg.AssetKey(["exports", "sharegpt"]) not in main  # only the export the trainer reads
    assert selected_keys(graph, "group:foundation") == {k for k in graph.get_all_asset_keys()
                                                       if graph.get(k).group_name == "foundation"}


def test_a_selection_that_does_not_parse_or_matches_nothing_is_one_line_with_examples() -> None:
    from mmat_assets.assets import definitions_from_file
    from mmat_assets.runner import BuildError, selected_keys

    graph = definitions_from_file(REPO / "mmat.yaml").resolve_asset_graph()
    for select, reason in (("exports/*", "no asset is named 'exports/'"), ("(", "does not parse"),
                           ("group:nosuch", "matches no asset")):
        with pytest.raises(BuildError) as caught:
            selected_keys(graph, select)
        message = str(caught.value)
        assert "\n" not in message and reason in message and repr(select) in message, message
        assert 'group:export' in message and 'key:"exports/*"' in message, message
        assert caught.value.exit_code == 2


def test_check_severity_decides_the_exit_and_skipped_steps_say_skipped(tmp_path: Path) -> None:
    """A failed ERROR check is a cause of failure, a failed WARN check only a warning; a
    step that never ran because its upstream failed shows as skipped, not ok."""
    from mmat_assets.runner import BuildProgress, materialize

    @dg.asset
    def table() -> int:
        return 1

    @dg.asset
    def broken() -> int:
        raise RuntimeError("cannot read the table")

    @dg.asset
    def after(broken: int) -> int:
        return broken

    @dg.asset_check(asset=table)
    def strict() -> dg.AssetCheckResult:
        return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.ERROR)

    @dg.asset_check(asset=table)
    def lenient() -> dg.AssetCheckResult:
        return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.WARN)

    defs = dg.Definitions(assets=[table, broken, after], asset_checks=[strict, lenient],
                          resources={"io_manager": dg.FilesystemIOManager(base_dir=str(tmp_path / "io"))})
    with dg.instance_for_test() as instance:
        summary = materialize(defs, "table", lambda keys: keys, BuildProgress(Console(), enabled=False),
                              instance=instance)
        assert summary["failed_checks"] == ["table:strict"] and summary["warned_checks"] == ["table:lenient"]
        assert summary["causes"] == ["check failed: table:strict"]
        summary = materialize(defs, "*after", lambda keys: keys, BuildProgress(Console(), enabled=False),
                              instance=instance)
    status = {a["asset"]: a["status"] for a in summary["assets"]}
    assert status == {"broken": "failed", "after": "skipped"}, summary
    assert summary["causes"] == ["broken: RuntimeError: cannot read the table"]


def test_a_sigterm_that_dagster_swallows_between_steps_still_stops_the_build(tmp_path: Path) -> None:
    """Between the steps of a run in this process, Dagster's handler only notes an interrupt
    and forgets it when the run ends. The build must still stop at the next run, as 143."""
    import signal

    from dagster._utils.interrupts import capture_interrupts

    from mmat_assets.cli import _sigterm_as_interrupt
    from mmat_assets.runner import BuildProgress, prepare

    ran: list[str] = []

    @dg.asset(partitions_def=dg.StaticPartitionsDefinition(["0", "1", "2"]))
    def shard(context) -> int:  # type: ignore[no-untyped-def]
        ran.append(context.partition_key)
        if context.partition_key == "0":
            with capture_interrupts():  # as Dagster's own run loop is, outside a step body
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)  # the handler runs; it only notes the signal
        return 1

    defs = dg.Definitions(assets=[shard],
                          resources={"io_manager": dg.FilesystemIOManager(base_dir=str(tmp_path / "io"))})
    stopped_by: list[str] = []
    with dg.instance_for_test() as instance:
        prepared = prepare(defs, "shard", lambda keys: keys, instance=instance)
        with pytest.raises(KeyboardInterrupt), _sigterm_as_interrupt(stopped_by) as interrupted:
            prepared.run(BuildProgress(Console(), enabled=False), 1, interrupted)
    assert ran == ["0"] and stopped_by == ["SIGTERM"]
