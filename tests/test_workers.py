"""``mmat build --workers N``: shards of a slice run in N processes at once, and the result is the
same as one process building them one after another."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import tabmwp_subset, write_project
from tests.test_cli import _run_build

N_PROBLEMS = 4
SELECT = "*dialogue_files"


def tabmwp_project(tmp: Path, n: int = N_PROBLEMS, shards: int = 4) -> Path:
    """A TabMWP project of ``n`` problems in ``tmp`` (its store and Dagster home there too)."""
    tabmwp_subset(tmp / "tabmwp", n)
    return write_project(tmp, {"tabmwp": {"plugin": "tabmwp", "options": {"path": "tabmwp"}}}, shards=shards,
                         tools={"label_bbox": {"enabled": False}})


def stored_outputs(store: Path) -> dict[str, str]:
    """Hash of every stored table and JSONL file, by path under the store."""
    files = [p for p in store.rglob("*") if p.suffix in (".parquet", ".jsonl") and p.is_file()]
    return {str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(files)}


def comparable(summary: dict[str, Any]) -> dict[str, Any]:
    """A build summary without what may differ between two builds: duration, worker count."""
    return {k: v for k, v in summary.items() if k not in ("seconds", "workers")}


def build_fresh(cfg: Path, *args: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Build ``cfg`` from nothing (no store, no Dagster home, no local cache copies); its
    summary and stored outputs."""
    store, home, tmp = cfg.parent / "store", cfg.parent / "home", cfg.parent / "tmp"
    for folder in (store, home, tmp):
        shutil.rmtree(folder, ignore_errors=True)
    tmp.mkdir()
    out = _run_build(cfg, home, "--select", SELECT, "--json", *args, env={"TMPDIR": str(tmp)}, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(out.stdout), stored_outputs(store)


@pytest.mark.slow
def test_two_workers_build_what_one_builds_byte_for_byte(tmp_path: Path) -> None:
    cfg = tabmwp_project(tmp_path)
    serial, serial_files = build_fresh(cfg, "--workers", "1")
    parallel, parallel_files = build_fresh(cfg, "--workers", "2")
    assert any(f.startswith("tables/rationales/") for f in serial_files), serial_files
    assert any(f.endswith("rr.jsonl") for f in serial_files), serial_files
    assert parallel_files == serial_files
    assert comparable(parallel) == comparable(serial)
    assert serial["ok"] and serial["runs"] > 4, serial
    assert serial["workers"] == 1 and parallel["workers"] == 2


def test_workers_must_be_at_least_one(tmp_path: Path) -> None:
    cfg = tabmwp_project(tmp_path, n=1, shards=1)
    out = _run_build(cfg, tmp_path / "home", "--workers", "0", timeout=120)
    assert out.returncode == 2 and "--workers" in out.stdout + out.stderr


@pytest.mark.slow
def test_a_build_shows_the_dollars_it_spends_live_and_per_accepted_sample(tmp_path: Path) -> None:
    """A priced teacher (the fake server's usage at gpt-4o's list price) over two shards in two
    workers: the progress lines count the dollars the request caches recorded so far, the
    summary has the build's total and dollars per accepted sample, and so do the stage assets'
    materializations, per shard."""
    import dagster as dg

    from tests.openai_fake import FakeOpenAI
    from tests.test_budget import PER_REQUEST, USAGE, _project, reply

    rows = 8
    with FakeOpenAI(reply=reply, usage=USAGE) as fake:
        cfg = _project(tmp_path, fake, rows)
        out = _run_build(cfg, tmp_path / "home", "--select", "*rationales", "--workers", "2", timeout=400)
        sent = fake.total
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    total = sent * PER_REQUEST
    assert sent == 2 * rows
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("[") and "rationales" in line]
    assert len(lines) == 2, out.stdout[-3000:]  # one line per shard run, each with the dollars so far
    shown = [float(line.split("$", 1)[1].split()[0]) for line in lines]
    assert 0 < shown[0] <= shown[1] == pytest.approx(total, abs=1e-4), lines
    assert "per accepted sample" in lines[-1]
    with dg.DagsterInstance.from_config(str(tmp_path / "home")) as instance:
        mats = [r.asset_materialization for r in instance.fetch_materializations(
            dg.AssetKey("rationales"), limit=10).records]
    assert len(mats) == 2
    assert sum(m.metadata["usd"].value for m in mats) == pytest.approx(total)
    for m in mats:
        ok = m.metadata["ok"].value
        assert m.metadata["usd_per_accepted_sample"].value == pytest.approx(m.metadata["usd"].value / ok, rel=1e-3)


def test_independent_assets_of_a_slice_are_runs_of_their_own_wave_by_wave(tmp_path: Path) -> None:
    """Export, training and evaluations in the shape of the main job: the evaluation of the
    untuned model does not wait for training, so the two are runs of one wave (training, which
    more waits for, first), and what follows one run alone is merged into it."""
    import dagster as dg
    from rich.console import Console

    from mmat_assets.runner import BuildProgress, materialize, waves

    @dg.asset
    def export() -> int:
        return 2

    @dg.asset
    def base_eval(export: int) -> int:
        return export + 1

    @dg.asset
    def tuned(export: int) -> int:
        return export * 10

    @dg.asset
    def tuned_eval(tuned: int) -> int:
        return tuned + 1

    @dg.asset
    def report(base_eval: int, tuned_eval: int) -> dict[str, int]:
        return {"base": base_eval, "tuned": tuned_eval}

    defs = dg.Definitions(assets=[export, base_eval, tuned, tuned_eval, report],
                          resources={"io_manager": dg.FilesystemIOManager(base_dir=str(tmp_path / "io"))})
    graph = defs.resolve_asset_graph()
    planned = waves(graph, list(graph.toposorted_asset_keys))
    assert [[[k.to_user_string() for k in run] for run in wave] for wave in planned] == [
        [["export"]], [["tuned"], ["base_eval"]], [["tuned_eval", "report"]]]
    with dg.DagsterInstance.ephemeral() as instance:
        summary = materialize(defs, None, lambda parts: parts, BuildProgress(Console(), enabled=False),
                              instance=instance)
    assert summary["ok"] and summary["runs"] == 4, summary
    import pickle

    assert pickle.loads((tmp_path / "io" / "report").read_bytes()) == {"base": 3, "tuned": 21}
    assert {e["asset"]: e["status"] for e in summary["assets"]} == dict.fromkeys(
        ["export", "tuned", "base_eval", "tuned_eval", "report"], "ok")
