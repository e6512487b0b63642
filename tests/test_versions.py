"""Data versions are content hashes and code versions chain, so staleness in the UI is true."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from typing import Any

import dagster as dg
import polars as pl
import pytest
from dagster._core.definitions.data_version import StaleStatus
from dagster._utils.test.data_versions import get_stale_status_resolver

from mmat_assets import protocol
from mmat_assets.assets import build_definitions
from mmat_assets.plugins import load_registry
from mmat_assets.versions import chain_code_versions, descendants, doc_version, frame_version
from tests.built_project import Built, built, materialize  # noqa: F401  (fixture)

OCR = dg.AssetKey(["tools", "ocr"])


def test_frame_version_is_content_not_layout_and_the_same_in_another_process() -> None:
    df = pl.DataFrame({"a": list(range(1000)), "b": [str(i) for i in range(1000)]})
    chunked = pl.concat([df.head(10), df.tail(990)], rechunk=False)
    assert frame_version(df) == frame_version(chunked)
    # a sort leaves long strings' buffers in the old order (Arrow IPC bytes differ), a Parquet
    # round trip rewrites them: the version must not notice
    moved = df.with_columns(pl.col("b") + "-long-enough-to-leave-the-view-inline").sort("a", descending=True)
    assert frame_version(moved) == frame_version(pl.read_parquet(_parquet_bytes(moved)))
    assert frame_version(df) != frame_version(df.with_columns(pl.col("a").replace(999, 1000)))
    assert frame_version(df) != frame_version(df.rename({"b": "c"}))
    code = ("import polars as pl; from mmat_assets.versions import frame_version; "
            "print(frame_version(pl.DataFrame({'a': list(range(1000)), 'b': [str(i) for i in range(1000)]})))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == frame_version(df)
    assert doc_version({"x": 1, "y": [1, 2]}) == doc_version({"y": [1, 2], "x": 1})


def _parquet_bytes(df: pl.DataFrame) -> io.BytesIO:
    buf = io.BytesIO()
    df.write_parquet(buf)
    buf.seek(0)
    return buf


def test_chained_code_versions_change_downstream_only() -> None:
    def graph(a_version: str) -> dict[dg.AssetKey, str | None]:
        @dg.asset(code_version=a_version)
        def a() -> int:
            return 1

        @dg.asset(code_version="1")
        def b(a: int) -> int:
            return a

        @dg.asset(code_version="1", deps=[b])
        def c() -> None:
            return None

        @dg.asset(code_version="1")
        def d() -> int:
            return 2

        return {k: v for x in chain_code_versions([a, b, c, d]) for k, v in x.code_versions_by_key.items()}

    one, two = graph("1"), graph("2")
    assert {k for k in one if one[k] != two[k]} == {dg.AssetKey(x) for x in "abc"}
    assert one[dg.AssetKey("d")] == "1"


def _code_versions(defs: dg.Definitions) -> dict[dg.AssetKey, str | None]:
    graph = defs.resolve_asset_graph()
    return {k: graph.get(k).code_version for k in graph.get_all_asset_keys()}


def _statuses(built: Built, defs: dg.Definitions) -> dict[tuple[dg.AssetKey, str | None], StaleStatus]:
    resolver = get_stale_status_resolver(built.instance, list(defs.assets))
    return {(k, p): resolver.get_status(k, p) for k, p in built.materialized}


def _stale(statuses: dict[Any, StaleStatus]) -> set[dg.AssetKey]:
    return {k for (k, _), s in statuses.items() if s == StaleStatus.STALE}


@pytest.mark.slow
def test_a_tool_version_change_marks_exactly_the_downstream_assets_stale(
        built: Built, monkeypatch: pytest.MonkeyPatch) -> None:
    before = _statuses(built, built.defs)
    assert set(before.values()) == {StaleStatus.FRESH}, {k: s for k, s in before.items() if s != StaleStatus.FRESH}

    registry = load_registry()
    monkeypatch.setattr(registry.get("tool", "ocr").cls, "version", "1.0.0-changed")
    changed = build_definitions(built.cfg, "local", registry=registry)
    old, new = _code_versions(built.defs), _code_versions(changed)
    downstream = descendants(list(changed.assets), [OCR])
    # in the whole graph (built or not), exactly the assets downstream of the tool change code version
    assert {k for k in new if new[k] != old[k]} == downstream
    assert {dg.AssetKey("rationales"), dg.AssetKey("dialogue_files"), dg.AssetKey(["exports", "ms_swift"]),
            dg.AssetKey("tuned_model")} <= downstream
    # and of what was built, exactly those are stale; Foundation and the other tools are not
    statuses = _statuses(built, changed)
    built_keys = {k for k, _ in built.materialized}
    assert _stale(statuses) == downstream & built_keys
    assert dg.AssetKey("foundation_samples") not in _stale(statuses)
    assert dg.AssetKey(["tools", "face_detection"]) not in _stale(statuses)


@pytest.mark.slow
def test_a_prompt_change_marks_the_rationale_and_everything_after_it_stale(
        built: Built, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(protocol, "PROMPT_VERSION", "rr-test-changed")
    changed = build_definitions(built.cfg, "local")
    statuses = _statuses(built, changed)
    built_keys = {k for k, _ in built.materialized}
    expected = descendants(list(changed.assets), [dg.AssetKey("rationales")]) & built_keys
    assert _stale(statuses) == expected
    assert {dg.AssetKey("rationales"), dg.AssetKey("reflections"), dg.AssetKey("rr_samples")} <= expected
    assert OCR not in _stale(statuses)


@pytest.mark.slow
def test_rebuilding_the_same_content_keeps_the_data_version_so_nothing_turns_stale(built: Built) -> None:
    key = dg.AssetKey("foundation_samples")
    first = built.instance.get_latest_data_version_record(key, False, "0")
    before = {k: built.instance.get_latest_data_version_record(k[0], False, k[1]) for k in built.materialized}
    # again: the source, a shard, a tool (probe timings differ), a rationale shard (now every
    # teacher answer comes from the request cache) and what reads them
    materialize(built.defs, built.instance, ["source_samples/tabmwp", "foundation_samples", "tools/ocr",
                                             "rationales", "reflections"])
    for k in [(dg.AssetKey(["tools", "ocr"]), None), (dg.AssetKey("rationales"), "0"), (dg.AssetKey("reflections"), "1")]:
        rec = built.instance.get_latest_data_version_record(k[0], False, k[1])
        assert rec.storage_id != before[k].storage_id
        assert rec.asset_materialization.tags["dagster/data_version"] == \
            before[k].asset_materialization.tags["dagster/data_version"], k
    again = built.instance.get_latest_data_version_record(key, False, "0")
    assert again.storage_id != first.storage_id  # it really ran again
    v1 = first.asset_materialization.tags["dagster/data_version"]
    v2 = again.asset_materialization.tags["dagster/data_version"]
    assert v1 == v2 == frame_version(pl.read_parquet(built.cfg.profile_root("local") + "/tables/foundation_samples/0.parquet"))
    statuses = _statuses(built, built.defs)
    assert set(statuses.values()) == {StaleStatus.FRESH}


def test_whether_teacher_answers_came_from_the_cache_does_not_change_the_version() -> None:
    calls = [{"cached": False, "cost_usd": 0.1, "request_hash": "ab"}, {"cached": False, "request_hash": "cd"}]
    fresh = pl.DataFrame({"provenance": [json.dumps({"teacher_calls": calls}, sort_keys=True)]})
    resumed = pl.DataFrame({"provenance": [json.dumps({"teacher_calls": [{**c, "cached": True} for c in calls]},
                                                      sort_keys=True)]})
    assert frame_version(fresh) == frame_version(resumed)
    other = pl.DataFrame({"provenance": [json.dumps({"teacher_calls": [{**calls[0], "cost_usd": 0.2}, calls[1]]},
                                                    sort_keys=True)]})
    assert frame_version(fresh) != frame_version(other)
