"""``mmat build --workers N``: shards of a slice run in N processes at once, and the result is the
same as one process building them one after another."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TABMWP, write_project
from tests.test_cli import _run_build

N_PROBLEMS = 4
SELECT = "*dialogue_files"


def tabmwp_project(tmp: Path, n: int = N_PROBLEMS, shards: int = 4) -> Path:
    """A TabMWP project of ``n`` problems in ``tmp`` (its store and Dagster home there too)."""
    problems = dict(list(json.loads((TABMWP / "problems.json").read_text()).items())[:n])
    data = tmp / "tabmwp"
    (data / "tables").mkdir(parents=True)
    (data / "problems.json").write_text(json.dumps(problems))
    for pid in problems:
        shutil.copy(TABMWP / "tables" / f"{pid}.png", data / "tables")
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
