"""Foundation as Dagster assets, on the real TabMWP dev1k data."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from mmat_assets.assets import build_definitions
from mmat_assets.config import load_config
from tests.conftest import write_project


def materialize_foundation(defs: dg.Definitions, shards: list[str]) -> tuple[dg.DagsterInstance, list]:
    instance = dg.DagsterInstance.ephemeral()
    everything = list(defs.assets) + list(defs.asset_checks)
    graph = defs.resolve_asset_graph()
    group = dg.AssetSelection.groups("foundation").resolve(graph)
    unpartitioned = [k for k in graph.toposorted_asset_keys if k in group and graph.get(k).partitions_def is None]
    first = dg.materialize(everything, selection=unpartitioned, instance=instance, resources=defs.resources)
    assert first.success
    results = [first]
    for shard in shards:
        r = dg.materialize(everything, selection=[dg.AssetKey("foundation_samples")], partition_key=shard,
                           instance=instance, resources=defs.resources)
        assert r.success
        results.append(r)
    return instance, results


@pytest.fixture(scope="module")
def tabmwp_build(tmp_path_factory: pytest.TempPathFactory, tabmwp_dir: Path):
    tmp = tmp_path_factory.mktemp("tabmwp")
    cfg = load_config(write_project(tmp, {"tabmwp": {"plugin": "tabmwp", "options": {"path": str(tabmwp_dir)}}},
                                    shards=5))
    defs = build_definitions(cfg, "local")
    instance, results = materialize_foundation(defs, [str(i) for i in range(5)])
    return tmp, defs, instance, results


def test_tabmwp_foundation_has_1000_samples_across_shards_with_images(tabmwp_build) -> None:
    tmp, _, _, results = tabmwp_build
    shards = [pl.read_parquet(tmp / "store" / "tables" / "foundation_samples" / f"{i}.parquet") for i in range(5)]
    total = pl.concat(shards)
    assert total.height == 1000
    assert all(s.height > 100 for s in shards)  # spread over the shards, not piled in one
    assert total["sample_id"].n_unique() == 1000
    for i, s in enumerate(shards):
        assert set(s["shard"]) == {i}
    uris = total["images"].list.first().struct.field("uri")
    assert all(Path(u).is_file() for u in uris)
    assert set(total["license"]) == {"CC BY-NC-SA 4.0"}
    assert total.filter(pl.col("rationale").is_null()).height == 0
    # every question about one image sits in one shard
    assert total.group_by("image_key").agg(pl.col("shard").n_unique())["shard"].max() == 1


def test_checks_pass_and_metadata_is_there(tabmwp_build) -> None:
    _, _, instance, results = tabmwp_build
    evals = [e for r in results[1:] for e in r.get_asset_check_evaluations()]
    assert {e.check_name for e in evals} == {"schema", "unique_sample_ids", "licence_present", "images_resolve"}
    assert len(evals) == 4 * 5 and all(e.passed for e in evals)
    mat = instance.get_latest_materialization_event(dg.AssetKey(["source_samples", "tabmwp"])).asset_materialization
    assert mat.metadata["dagster/row_count"].value == 1000
    assert mat.metadata["rows_quarantined"].value == 0
    assert mat.metadata["rows_read"].value == mat.metadata["rows_kept"].value == 1000
    (accounted,) = results[0].get_asset_check_evaluations()
    assert accounted.check_name == "rows_accounted_for" and accounted.passed
    assert "grade_" in mat.metadata["rows_by_subset"].value
    assert "data:image/png;base64," in mat.metadata["preview"].value


def test_image_check_fails_when_media_is_lost(tabmwp_build) -> None:
    tmp, defs, instance, _ = tabmwp_build
    df = pl.read_parquet(tmp / "store" / "tables" / "foundation_samples" / "0.parquet")
    victim = Path(df["images"][0][0]["uri"])
    data = victim.read_bytes()
    victim.unlink()
    try:
        r = dg.materialize(list(defs.assets) + list(defs.asset_checks), selection=[dg.AssetKey("foundation_samples")],
                           partition_key="0", instance=instance, resources=defs.resources, raise_on_error=False)
        (ev,) = [e for e in r.get_asset_check_evaluations() if e.check_name == "images_resolve"]
        others = [e.passed for e in r.get_asset_check_evaluations() if e.check_name != "images_resolve"]
        assert others == [True, True, True]
        assert not ev.passed and ev.metadata["dangling"].value == 1
    finally:
        victim.write_bytes(data)


def test_source_location_is_configuration(tmp_path: Path, tabmwp_dir: Path) -> None:
    """A user points the source at another copy (here: a 3-problem split) without code."""
    import json
    import shutil

    problems = json.loads((tabmwp_dir / "problems.json").read_text())
    mine = tmp_path / "my_tabmwp"
    (mine / "tables").mkdir(parents=True)
    keep = dict(list(problems.items())[:3])
    (mine / "problems.json").write_text(json.dumps(keep))
    for pid in keep:
        shutil.copy(tabmwp_dir / "tables" / f"{pid}.png", mine / "tables" / f"{pid}.png")
    cfg = load_config(write_project(tmp_path, {"mine": {"plugin": "tabmwp", "options": {"path": "my_tabmwp"}}}, 2))
    defs = build_definitions(cfg, "local")
    r = dg.materialize(list(defs.assets), selection=[dg.AssetKey(["source_samples", "mine"]),
                                                     dg.AssetKey(["quarantine", "source", "mine"])],
                       resources=defs.resources)
    assert sorted(r.output_for_node("source_mine", "samples")["source_row_id"]) == sorted(keep)


def test_quarantine_asset_keeps_bad_rows(tmp_path: Path) -> None:
    (tmp_path / "qa.jsonl").write_bytes(b'{"q": "What?", "a": "x", "img": "none.png"}\n{"q": "", "a": "y"}\n')
    cfg = load_config(write_project(tmp_path, {"bad": {"plugin": "qa_table", "options": {
        "path": "qa.jsonl", "license": "CC0-1.0", "columns": {"question": "q", "answer": "a", "image": "img"}}}}, 2))
    defs = build_definitions(cfg, "local")
    r = dg.materialize(list(defs.assets), selection=[dg.AssetKey(["source_samples", "bad"]),
                                                     dg.AssetKey(["quarantine", "source", "bad"])],
                       resources=defs.resources)
    assert r.success
    q = r.output_for_node("source_bad", "quarantine")
    assert sorted(q["reason"]) == ["empty_question", "missing_image"]
    assert r.output_for_node("source_bad", "samples").height == 0
