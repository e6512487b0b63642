"""The command line and the code location, as a user runs them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import dagster as dg
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


def _run_build(cfg: Path, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DAGSTER_HOME": str(home), "COLUMNS": "200"}
    return subprocess.run([str(Path(sys.executable).with_name("mmat")), "build", "--config", str(cfg), *args],
                          capture_output=True, text=True, env=env, timeout=600)


def test_build_materializes_selected_shards_and_reports_json(tmp_path: Path) -> None:
    data = REPO / "tests" / "fixtures" / "qa_table"
    jsonl = next(p for p in data.iterdir() if p.suffix == ".jsonl")
    cfg = write_project(tmp_path, {"qa": {"plugin": "qa_table", "options": {
        "path": str(jsonl), "license": "CC0-1.0", "image_root": str(data),
        "columns": {"question": "question", "answer": "answer"}}}}, shards=3)
    home = tmp_path / "home"
    home.mkdir()
    out = _run_build(cfg, home, "--select", "group:foundation", "--shards", "0-1", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads(out.stdout)
    by_asset = {a["asset"]: a for a in summary["assets"]}
    assert by_asset["foundation_samples"]["partitions"] == 2
    assert summary["failed"] == 0 and summary["runs"] == 3


def test_build_fails_with_a_readable_summary(tmp_path: Path) -> None:
    cfg = write_project(tmp_path, {"gone": {"plugin": "qa_table", "options": {
        "path": "does-not-exist.jsonl", "license": "CC0-1.0",
        "columns": {"question": "q", "answer": "a"}}}}, shards=2)
    # A reader that breaks is quarantined, not fatal; a storage root that cannot be written is fatal.
    (tmp_path / "store").write_text("not a directory")
    home = tmp_path / "home"
    home.mkdir()
    out = _run_build(cfg, home)
    assert out.returncode == 1
    assert "failed" in out.stdout and "source_samples/gone" in out.stdout
    assert re.search(r"^\[1/\d+\] .*failures \d+", out.stdout, re.M)  # not a terminal: a progress line per run


def test_build_on_a_terminal_shows_a_live_progress_bar_and_fails_readably(tmp_path: Path) -> None:
    """Through a pseudo-terminal (util-linux ``script``): the live bar, then the summary."""
    cfg = write_project(tmp_path, {"qa": {"plugin": "qa_table", "options": {
        "path": "q.jsonl", "license": "CC0-1.0", "columns": {"question": "q", "answer": "a"}}}}, shards=2)
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
