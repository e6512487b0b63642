"""A small real project built once per test session: 4 TabMWP problems through Foundation,
the tools, rationale, reflection, RR/ORR, the ms-swift export and one LoRA step of training
(real OCR, grounded teacher, the offline student).

Lineage, audit and staleness tests read what it wrote; a test may rebuild an asset only
where the content comes out the same (that is what it checks).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from mmat_assets.assets import build_definitions
from mmat_assets.config import ProjectConfig, load_config
from mmat_assets.runner import plan
from tests.conftest import TABMWP, write_project

N_PROBLEMS = 4
TARGETS = ("*dialogue_files", "group:foundation", "student_base", "exports/ms_swift", "tuned_model")


@dataclass
class Built:
    config_path: Path
    cfg: ProjectConfig
    defs: dg.Definitions
    instance: dg.DagsterInstance
    problems: dict[str, Any]
    materialized: set[tuple[dg.AssetKey, str | None]]


def project_config(tmp: Path, problems: dict[str, Any]) -> Path:
    data = tmp / "tabmwp"
    (data / "tables").mkdir(parents=True)
    (data / "problems.json").write_text(json.dumps(problems))
    for pid in problems:
        shutil.copy(TABMWP / "tables" / f"{pid}.png", data / "tables")
    return write_project(tmp, {"tabmwp": {"plugin": "tabmwp", "options": {"path": "tabmwp"}}}, shards=2,
                         tools={"label_bbox": {"enabled": False}},
                         export={"exporters": ["ms_swift"], "formats": ["rr", "orr"], "max_length": 1024},
                         training={"options": {"max_steps": 1, "cpu_threads": 1, "max_length": 1024}})


def materialize(defs: dg.Definitions, instance: dg.DagsterInstance, selection: str | list[str]) -> set[Any]:
    """Materialize a selection slice by slice (every partition), as ``mmat build`` does."""
    graph = defs.resolve_asset_graph()
    selected: set[dg.AssetKey] = set()
    for sel in [selection] if isinstance(selection, str) else selection:
        one = dg.AssetSelection.from_string(sel if ":" in sel or "*" in sel else f'key:"{sel}"')
        selected |= set(one.required_multi_asset_neighbors().resolve(graph))
    everything = list(defs.assets) + list(defs.asset_checks)
    done = set()
    for sl in plan(graph, selected, lambda keys: keys):
        for part in sl.partitions:
            result = dg.materialize(everything, selection=sl.keys, partition_key=part, instance=instance,
                                    resources=defs.resources, raise_on_error=False)
            assert result.success, [e.message for e in result.all_events if e.is_failure]
            done |= {(k, part) for k in sl.keys}
    return done


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    tmp = tmp_path_factory.mktemp("built")
    problems = dict(list(json.loads((TABMWP / "problems.json").read_text()).items())[:N_PROBLEMS])
    path = project_config(tmp, problems)
    cfg = load_config(path)
    defs = build_definitions(cfg, "local")
    (tmp / "dagster_home").mkdir()
    instance = dg.DagsterInstance.local_temp(str(tmp / "dagster_home"))
    done = materialize(defs, instance, list(TARGETS))
    return Built(path, cfg, defs, instance, problems, done)
