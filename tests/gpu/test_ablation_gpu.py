"""The GPU ablation profile (profiles/gpu.yaml) on a bounded slice: the whole matrix for
every seed, a few steps each, through the real assets on CUDA (skips without a GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

REPO = Path(__file__).resolve().parents[2]


def test_the_gpu_profile_materializes_the_matrix_for_every_seed(tmp_path: Path) -> None:
    import dagster as dg

    from mmat_assets.assets import build_definitions
    from mmat_assets.config import load_config
    from mmat_assets.engine.ablation import VARIANTS
    from tests.built_project import materialize
    from tests.conftest import TABMWP

    cfg = yaml.safe_load((REPO / "profiles" / "gpu.yaml").read_text())
    cfg["sources"]["tabmwp"]["options"]["path"] = str(TABMWP)
    cfg["sources"]["tabmwp"]["quota"] = 4  # 32 problems: the slice, not the full run
    cfg["evaluation"]["benchmarks"]["tabmwp_heldout"]["options"]["path"] = str(TABMWP)
    cfg["ablation"].update(heldout=8, bootstrap=200, training={"max_steps": 5})
    cfg["profiles"] = {"local": {"root": str(tmp_path / "store")}}
    (tmp_path / "mmat.yaml").write_text(yaml.safe_dump(cfg))
    loaded = load_config(tmp_path / "mmat.yaml")
    defs = build_definitions(loaded, "local")
    (tmp_path / "home").mkdir()
    materialize(defs, dg.DagsterInstance.local_temp(str(tmp_path / "home")), ["*ablation_report"])
    tables = Path(loaded.profile_root("local")) / "tables"
    report = json.loads((tables / "ablation_report.json").read_text())
    md = Path(report["path"]).read_text()
    assert all(f"| {v} |" in md for v in VARIANTS)
    seeds = {r["seed"] for r in report["rows"] if r["variant"] != "untuned"}
    assert seeds == set(cfg["ablation"]["seeds"])
    model = json.loads((tables / "ablation" / "models" / "rr" / "s42.json").read_text())
    assert model["steps"] == 5 and model["peak_memory_mb"] > 0
