"""Shared fixtures: the real TabMWP data, temporary projects, the example plugin."""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TABMWP = (REPO.parent / "shared" / "data" / "tabmwp").resolve()
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session", autouse=True)
def _own_dagster_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Tests never touch a developer's Dagster instance: each session gets its own."""
    import os

    home = tmp_path_factory.mktemp("dagster_home")
    old = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = str(home)
    yield
    if old is None:
        os.environ.pop("DAGSTER_HOME", None)
    else:
        os.environ["DAGSTER_HOME"] = old


@pytest.fixture(scope="session")
def tabmwp_dir() -> Path:
    assert (TABMWP / "problems.json").is_file(), f"TabMWP data missing at {TABMWP}"
    return TABMWP


def tabmwp_subset(dest: Path, n: int) -> dict[str, Any]:
    """The first ``n`` TabMWP problems, with their table images, written to ``dest`` in the
    layout the ``tabmwp`` source reads (``problems.json`` + ``tables/``); returns the problems."""
    import json
    import shutil

    problems = dict(list(json.loads((TABMWP / "problems.json").read_text()).items())[:n])
    (dest / "tables").mkdir(parents=True)
    (dest / "problems.json").write_text(json.dumps(problems))
    for pid in problems:
        shutil.copy(TABMWP / "tables" / f"{pid}.png", dest / "tables")
    return problems


def write_project(tmp: Path, sources: dict[str, Any], shards: int = 4, **extra: Any) -> Path:
    """A project config in ``tmp`` whose local storage also lives in ``tmp``."""
    cfg = {
        "sources": sources,
        "foundation": {"shards": shards, "seed": 7, **extra.pop("foundation", {})},
        "profiles": {"local": {"root": str(tmp / "store")}},
        **extra,
    }
    path = tmp / "mmat.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def example_plugin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Install the third-party example plugin from ``tests/plugin_example`` for this session."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(Path(__file__).parent / "plugin_example")],
        check=True,
    )
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    yield target
    sys.path.remove(str(target))
    sys.modules.pop("mmat_example_plugin", None)
    importlib.invalidate_caches()
