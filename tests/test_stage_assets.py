"""A slice of the graph as Dagster runs it: Foundation → tools → rationale → RR/ORR files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import pytest

from mmat_assets import protocol
from mmat_assets.assets import build_definitions
from mmat_assets.config import load_config
from mmat_assets.runner import plan
from tests.conftest import write_project


@pytest.mark.slow
def test_demo_slice_writes_rr_and_orr_jsonl_with_a_funnel(tmp_path: Path, tabmwp_dir: Path) -> None:
    problems = json.loads((tabmwp_dir / "problems.json").read_text())
    keep = dict(list(problems.items())[:5])
    data = tmp_path / "tabmwp"
    (data / "tables").mkdir(parents=True)
    (data / "problems.json").write_text(json.dumps(keep))
    for pid in keep:
        shutil.copy(tabmwp_dir / "tables" / f"{pid}.png", data / "tables")
    cfg = load_config(write_project(tmp_path, {"tabmwp": {"plugin": "tabmwp", "options": {"path": "tabmwp"}}},
                                    shards=2, tools={"label_bbox": {"enabled": False}}))
    defs = build_definitions(cfg, "local")
    graph = defs.resolve_asset_graph()
    selected = set(dg.AssetSelection.from_string("*dialogue_files").resolve(graph)
                   | dg.AssetSelection.from_string("group:foundation").resolve(graph))
    assert dg.AssetKey(["tools", "ocr"]) in selected  # rationales depend on the tool assets
    instance = dg.DagsterInstance.ephemeral()
    everything = list(defs.assets) + list(defs.asset_checks)
    for sl in plan(graph, selected, lambda keys: keys):
        for part in sl.partitions:
            r = dg.materialize(everything, selection=sl.keys, partition_key=part, instance=instance,
                               resources=defs.resources)
            assert r.success
    mat = instance.get_latest_materialization_event(dg.AssetKey("dialogue_files")).asset_materialization
    rr_path = Path(mat.metadata["rr_path"].value)
    lines = [json.loads(x) for x in rr_path.read_text().splitlines()]
    assert len(lines) >= 4 and all(x["license"] == "CC BY-NC-SA 4.0" for x in lines)
    for x in lines:
        t = protocol.parse_rr(x["messages"])
        assert t.answer == keep[x["source_row_id"]]["answer"]
        assert any(r.tool == "ocr" for s in t.steps for r in s.results)
    assert "| in | 5 |" in mat.metadata["funnel"].value
    rat = instance.get_latest_materialization_event(dg.AssetKey("rationales"))
    assert rat is not None
    ocr = instance.get_latest_materialization_event(dg.AssetKey(["tools", "ocr"])).asset_materialization
    assert ocr.metadata["available"].value is True
