"""Every stage at ``foundation.shards: 1``: a single partition is still a set of shards.

Three TabMWP problems go through Foundation, the tools, rationale, reflection, RR/ORR and
the dialogue files with the grounded teacher, all in shard ``0``. The exports read their
shards the same way (a ``dict`` of shard tables), which the IO-manager test below pins down
without building a student.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
import pytest
from upath import UPath

from mmat_assets.assets import build_definitions
from mmat_assets.config import load_config
from mmat_assets.io_managers import PolarsParquetIOManager
from mmat_assets.runner import plan
from tests.conftest import tabmwp_subset, write_project

N_PROBLEMS = 3


@dataclass
class OneShard:
    store: Path
    defs: dg.Definitions
    instance: dg.DagsterInstance
    problems: dict[str, Any]


def build(one: OneShard, targets: tuple[str, ...]) -> list[tuple[list[dg.AssetKey], str | None]]:
    """Materialize ``targets`` slice by slice, as ``mmat build`` does; every run must succeed."""
    graph = one.defs.resolve_asset_graph()
    selected: set[dg.AssetKey] = set()
    for sel in targets:
        selected |= set(dg.AssetSelection.from_string(sel if ":" in sel or "*" in sel else f'key:"{sel}"')
                        .required_multi_asset_neighbors().resolve(graph))
    everything = list(one.defs.assets) + list(one.defs.asset_checks)
    ran = []
    for sl in plan(graph, selected, lambda keys: keys):
        for part in sl.partitions:
            r = dg.materialize(everything, selection=sl.keys, partition_key=part, instance=one.instance,
                               resources=one.defs.resources, raise_on_error=False)
            assert r.success, (sl.keys, part, [e.message for e in r.all_events if e.is_failure])
            assert all(e.passed for e in r.get_asset_check_evaluations()), sl.keys
            ran.append((sl.keys, part))
    return ran


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory: pytest.TempPathFactory) -> OneShard:
    tmp = tmp_path_factory.mktemp("one_shard")
    problems = tabmwp_subset(tmp / "tabmwp", N_PROBLEMS)
    path = write_project(tmp, {"tabmwp": {"plugin": "tabmwp", "options": {"path": "tabmwp"}}}, shards=1,
                         tools={"label_bbox": {"enabled": False}})
    defs = build_definitions(load_config(path), "local")
    return OneShard(tmp / "store", defs, dg.DagsterInstance.ephemeral(), problems)


@pytest.mark.slow
def test_every_stage_up_to_the_dialogue_files_builds_at_one_shard(one_shard: OneShard) -> None:
    ran = build(one_shard, ("*dialogue_files", "group:foundation"))
    assert {part for _, part in ran} == {None, "0"}  # one shard, named "0"
    for key in ("foundation_samples", "rationales", "reflections", "rr_samples", "orr_samples"):
        assert one_shard.instance.get_latest_materialization_event(dg.AssetKey(key)) is not None, key
    foundation = pl.read_parquet(one_shard.store / "tables" / "foundation_samples" / "0.parquet")
    assert sorted(foundation["source_row_id"]) == sorted(one_shard.problems) and set(foundation["shard"]) == {0}
    mat = one_shard.instance.get_latest_materialization_event(dg.AssetKey("dialogue_files")).asset_materialization
    rr = [json.loads(x) for x in Path(mat.metadata["rr_path"].value).read_text().splitlines()]
    assert rr and {x["source_row_id"] for x in rr} <= set(one_shard.problems)
    assert f"| in | {N_PROBLEMS} |" in mat.metadata["funnel"].value


def test_a_dict_of_shards_input_is_a_dict_even_for_one_partition(tmp_path: Path) -> None:
    """The IO manager hands a step that declares ``dict[str, DataFrame]`` a dict, not a bare table."""
    parts = dg.StaticPartitionsDefinition(["0"])

    @dg.asset(partitions_def=parts)
    def table() -> pl.DataFrame:
        return pl.DataFrame({"x": [1, 2]})

    @dg.asset(ins={"shards": dg.AssetIn("table")})
    def together(shards: dict[str, pl.DataFrame]) -> pl.DataFrame:
        assert list(shards) == ["0"]
        return shards["0"]

    @dg.asset
    def bare(table: pl.DataFrame) -> pl.DataFrame:  # a plain DataFrame input still gets the table
        return table

    io = PolarsParquetIOManager(base_path=UPath(tmp_path))
    instance = dg.DagsterInstance.ephemeral()
    assert dg.materialize([table], partition_key="0", instance=instance, resources={"io_manager": io}).success
    r = dg.materialize([table, together, bare], selection=[together.key, bare.key], instance=instance,
                       resources={"io_manager": io})
    assert r.success
    assert r.output_for_node("together")["x"].to_list() == [1, 2]
    assert r.output_for_node("bare")["x"].to_list() == [1, 2]
