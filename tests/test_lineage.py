"""``mmat show``, ``mmat lineage`` and ``mmat audit`` on a project built for real."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
from typer.testing import CliRunner

from mmat_assets.cli import app
from mmat_assets.versions import frame_version
from tests.built_project import Built, built  # noqa: F401  (fixture)

runner = CliRunner()
pytestmark = pytest.mark.slow


def _tables(b: Built) -> Path:
    return Path(b.cfg.profile_root("local")) / "tables"


def _a_sample(b: Built) -> dict:
    return pl.read_parquet(_tables(b) / "rr_samples" / "0.parquet").row(0, named=True)


def _cli(b: Built, *args: str) -> tuple[int, str]:
    res = runner.invoke(app, [*args, "--config", str(b.config_path)], env={"COLUMNS": "200"})
    return res.exit_code, res.output


def _dagster_version(b: Built, key: list[str] | str, partition: str | None = None) -> str:
    rec = b.instance.get_latest_data_version_record(dg.AssetKey(key), False, partition)
    return rec.asset_materialization.tags["dagster/data_version"]


def test_lineage_traces_a_sample_back_to_its_source_row_and_forward_to_the_model(built: Built) -> None:
    row = _a_sample(built)
    code, out = _cli(built, "lineage", row["sample_id"][:10], "--json")
    assert code == 0, out
    data = json.loads(out)
    assert data["sample_id"] == row["sample_id"]
    src = data["source"]
    assert src["source_row_id"] in built.problems and src["answer"] == built.problems[src["source_row_id"]]["answer"]
    assert src["license"] == "CC BY-NC-SA 4.0" and src["non_commercial"] is True
    assert data["images"][0]["exists"] and data["images"][0]["sha256"] == row["images"][0]["sha256"]
    ocr = [c for c in data["tool_calls"] if c["tool"] == "ocr"]
    assert ocr and ocr[0]["version"] and len(ocr[0]["cache_key"]) == 64 and ocr[0]["text"]
    assert data["teacher_calls"] and all(c["request_hash"] and c["prompt_version"] == "rr-1"
                                         for c in data["teacher_calls"])
    # every asset partition that touched it, with the content hash Dagster recorded for it
    chain = {a["asset"]: a for a in data["assets"]}
    assert {"source_samples/tabmwp", "foundation_samples", "rationales", "reflections", "rr_samples",
            "orr_samples"} <= set(chain)
    for asset in ("foundation_samples", "rationales", "reflections", "rr_samples"):
        assert chain[asset]["data_version"] == _dagster_version(built, asset, "0"), asset
        assert chain[asset]["code_version"] == built.defs.resolve_asset_graph().get(dg.AssetKey(asset)).code_version
    assert chain["source_samples/tabmwp"]["data_version"] == _dagster_version(built, ["source_samples", "tabmwp"])
    assert not any(a["changed_since"] for a in data["assets"])
    fwd = data["forward"]
    manifest = json.loads((_tables(built) / "exports" / "ms_swift.json").read_text())
    assert Path(manifest["sample_ids"]).is_absolute()
    assert fwd["exports"] == [{"export": "exports/ms_swift", "data_version": _dagster_version(built, ["exports", "ms_swift"]),
                               "included": True, "formats": ["orr", "rr"], "ids_file": manifest["sample_ids"]}]
    assert fwd["models"][0]["trained_on"] is True and fwd["models"][0]["data"] == "rr"


def test_lineage_text_names_the_source_row_ocr_call_and_teacher_calls(built: Built) -> None:
    row = _a_sample(built)
    code, out = _cli(built, "lineage", row["sample_id"])
    assert code == 0, out
    assert f"row {row['source_row_id']}" in out and "NON-COMMERCIAL" in out
    assert "ocr 1.0.0" in out and row["tool_calls"][0]["cache_key"] in out
    prov = json.loads(row["provenance"])
    assert all(c["request_hash"] in out for c in prov["teacher_calls"])
    assert "exports/ms_swift" in out and "trained on it" in out


def test_show_renders_both_dialogues_and_the_image_path(built: Built) -> None:
    row = _a_sample(built)
    code, out = _cli(built, "show", row["sample_id"])
    assert code == 0, out
    assert "RR dialogue" in out and "ORR dialogue" in out
    assert "<OPERATOR>ocr</OPERATOR>" in out and "<|begin_api_invoke|>" in out
    assert row["images"][0]["sha256"] in out
    code, out = _cli(built, "show", row["sample_id"], "--json")
    data = json.loads(out)
    assert Path(data["images"][0]).is_file()
    assert data["dialogues"]["rr"][-1]["content"] == row["turns"][-1]["content"]


def test_unknown_sample_is_a_clear_error(built: Built) -> None:
    code, out = _cli(built, "lineage", "ffffffffffff")
    assert code == 1 and "no sample 'ffffffffffff'" in out and "rr_samples" in out


def test_audit_of_the_tuned_model(built: Built, tmp_path: Path) -> None:
    html = tmp_path / "audit.html"
    code, out = _cli(built, "audit", "tuned_model", "--json", "--html", str(html))
    assert code == 0, out
    data = json.loads(out)
    manifest = json.loads((_tables(built) / "exports" / "ms_swift.json").read_text())
    assert data["target"]["kind"] == "model" and data["model"]["trainer"] == "hf_lora"
    assert data["export"]["data_version"] == manifest["data_version"] == _dagster_version(built, ["exports", "ms_swift"])
    rr = pl.concat([pl.read_parquet(p) for p in sorted((_tables(built) / "rr_samples").glob("*.parquet"))])
    assert data["sources"] == [{"source": "tabmwp", "dataset": "tabmwp", "subsets": sorted(rr["subset"].unique()),
                                "license": "CC BY-NC-SA 4.0", "rows": rr.height, "non_commercial": True}]
    calls = [c for p in rr["provenance"] for c in json.loads(p)["teacher_calls"]]
    assert data["totals"]["teacher_calls"] == len(calls)
    assert data["totals"]["rows"] == manifest["rows"]["rr"] == rr.height  # the model saw its format only
    assert {t["tool"]: t["calls"] for t in data["tools"]} == dict(
        pl.Series([c["tool"] for calls in rr["tool_calls"] for c in calls]).value_counts().iter_rows())
    assert sorted(s["shard"] for s in data["shards"]) == sorted({f"{s}" for s in rr["shard"].to_list()})
    for shard in data["shards"]:
        assert shard["data_versions"]["rr_samples"] == frame_version(
            pl.read_parquet(_tables(built) / "rr_samples" / f"{shard['shard']}.parquet"))
    assert data["funnel"]["in"] == len(built.problems) and data["funnel"]["trained on (rr)"] == rr.height
    assert not any(k.startswith("exported") for k in data["funnel"])
    page = html.read_text()
    assert manifest["data_version"] in page and "CC BY-NC-SA 4.0" in page and page.count("<svg") == 3
    assert "http://" not in page and "https://" not in page


def test_audit_text_of_an_export_flags_non_commercial_rows(built: Built) -> None:
    code, out = _cli(built, "audit", "exports/ms_swift")
    assert code == 0, out
    manifest = json.loads((_tables(built) / "exports" / "ms_swift.json").read_text())
    assert manifest["data_version"] in out and "CC BY-NC-SA 4.0" in out and "NON-COMMERCIAL" in out
    assert "exported rr" in out and "exported orr" in out
    code, out = _cli(built, "audit", "exports/nope")
    assert code == 1 and "exports/ms_swift" in out  # says what exists


def _stage_table(root: Path, asset: str, shard: str, ids: list[str]) -> None:
    from mmat_assets import records

    (root / "tables" / asset).mkdir(parents=True, exist_ok=True)
    rows = [{"sample_id": i, "source": "s", "dataset": "d", "subset": "x", "source_row_id": i, "license": "CC0-1.0",
             "question": "q", "answer": "a", "shard": int(shard)} for i in ids]
    records.conform(pl.DataFrame(rows)).write_parquet(root / "tables" / asset / f"{shard}.parquet")


def test_a_prefix_shared_across_shards_is_ambiguous_not_the_first_match(tmp_path: Path) -> None:
    from mmat_assets.engine.lineage import LineageError, find_sample, tables_for

    _stage_table(tmp_path, "foundation_samples", "0", ["abcd1111", "ffff0000"])
    _stage_table(tmp_path, "foundation_samples", "1", ["abcd2222"])
    tables = tables_for(str(tmp_path))
    with pytest.raises(LineageError, match="matches 2 samples"):
        find_sample(tables, "abcd")
    assert find_sample(tables, "abcd2")[:2] == ("abcd2222", "1")


def test_audit_without_the_rr_tables_is_a_clear_error(tmp_path: Path) -> None:
    from mmat_assets.engine.audit import audit
    from mmat_assets.engine.tables import LineageError, tables_for

    _stage_table(tmp_path, "foundation_samples", "0", ["abcd1111"])
    ids = tmp_path / "sample_ids.parquet"
    pl.DataFrame({"sample_id": ["abcd1111"], "format": ["rr"], "shard": [0]}).write_parquet(ids)
    (tmp_path / "tables" / "exports").mkdir(parents=True)
    (tmp_path / "tables" / "exports" / "ms_swift.json").write_text(json.dumps(
        {"exporter": "ms_swift", "data_version": "x", "sample_ids": str(ids), "rows": {"rr": 1}}))
    with pytest.raises(LineageError, match="none of the 1 samples"):
        audit(tables_for(str(tmp_path)), "exports/ms_swift")
