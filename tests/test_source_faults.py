"""A bad value costs its own row only: the reader goes on, and every row read is accounted for.

Each attack puts one broken record in the middle of a file of good ones: a lone surrogate
escape, a raw 0xFF byte, ``choices`` that are not a list, or a value nested 100,000 deep.
The broken record is quarantined with its reason, every other row is kept, and
rows read = kept + quarantined + dropped duplicates + dropped by quota. A reader that
cannot go on at all fails its asset with a message naming the source.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from mmat_assets import checks
from mmat_assets.assets import build_definitions
from mmat_assets.config import load_config
from mmat_assets.contracts import BadRow, Source, SourceRow
from mmat_assets.engine import foundation as fe
from mmat_assets.engine.images import ImageLimits
from mmat_assets.media import MediaStore
from mmat_assets.toolkit.jsonl import iter_json_members
from mmat_plugins.sources_qa_table import QATableSource
from mmat_plugins.sources_tabmwp import TabMWPSource
from mmat_plugins.sources_visual_cot import VisualCoTSource
from tests.conftest import TABMWP, write_project

DEEP = 100_000
#: One broken JSON value per attack, as the bytes that sit in the file.
ATTACKS: dict[str, bytes] = {
    "lone_surrogate": b'"What is \\ud800 here?"',
    "raw_0xff_byte": b'"What is \xff here?"',
    "choices_not_a_list": b"5",
    "nested_100000_deep": b"[" * DEEP + b"]" * DEEP,
}
#: Which field of the bad record each attack's value goes into.
FIELD = {"lone_surrogate": "question", "raw_0xff_byte": "question", "choices_not_a_list": "choices",
         "nested_100000_deep": "table"}
QA_COLUMNS = {"id": "id", "question": "question", "answer": "answer", "choices": "choices"}
#: qa_table fixture: 6 distinct good rows, the bad one in the middle, one duplicate at the end.
QA_ROWS = 8
QA_KEPT, QA_QUARANTINED, QA_DUPLICATES = 6, 1, 1
#: tabmwp fixture: 4 real problems (with their table images), the bad one in the middle.
TABMWP_IDS = ("33", "117", "147", "162")
TABMWP_KEPT, TABMWP_QUARANTINED = 4, 1


def _qa_good(i: int) -> dict:
    return {"id": f"r{i}", "question": f"What is {i} + {i}?", "answer": str(2 * i), "choices": []}


def qa_table_file(tmp: Path, attack: str) -> Path:
    """Three good rows, the bad row, three good rows, and a duplicate of the first row."""
    bad = {"id": "bad", "question": "Pick one.", "answer": "x", "choices": ["a"]}
    fields = [f'"{k}": {json.dumps(v)}'.encode() for k, v in bad.items() if k != FIELD[attack]]
    fields.append(f'"{FIELD[attack]}": '.encode() + ATTACKS[attack])
    bad_line = b"{" + b", ".join(fields) + b"}"
    good = [json.dumps(_qa_good(i)).encode() for i in range(1, 7)]
    duplicate = json.dumps({**_qa_good(1), "id": "r1-again", "question": "what is 1 + 1"}).encode()
    path = tmp / "qa.jsonl"
    path.write_bytes(b"\n".join([*good[:3], bad_line, *good[3:], duplicate]) + b"\n")
    return path


def tabmwp_dir(tmp: Path, attack: str) -> Path:
    """A problems.json of four real problems with the bad one second, and their tables."""
    problems = json.loads((TABMWP / "problems.json").read_text(encoding="utf-8"))
    root = tmp / "tabmwp"
    (root / "tables").mkdir(parents=True)
    members = [f'"{pid}": {json.dumps(problems[pid])}'.encode() for pid in TABMWP_IDS]
    bad = dict(problems[TABMWP_IDS[0]])
    bad.pop(FIELD[attack])
    body = json.dumps(bad).encode()
    bad_member = b'"bad": ' + body[:-1] + f', "{FIELD[attack]}": '.encode() + ATTACKS[attack] + b"}"
    (root / "problems.json").write_bytes(b"{" + b", ".join([members[0], bad_member, *members[1:]]) + b"}")
    for pid in TABMWP_IDS:
        shutil.copy(TABMWP / "tables" / f"{pid}.png", root / "tables")
    return root


def _assert_accounted(ing: fe.Ingested, kept: int, quarantined: int, rows_in: int, tmp: Path) -> fe.Prepared:
    assert ing.samples.height == rows_in - quarantined  # duplicates are dropped after ingest
    assert ing.quarantine.height == quarantined
    (row,) = ing.quarantine.filter(pl.col("source_row_id").str.contains("bad|line 4")).to_dicts()
    assert row["reason"] and row["detail"]
    prepared = fe.prepare_source_counted(ing.samples, None, 7, 2)
    counts = fe.row_accounting(ing, prepared)
    assert counts["rows_read"] == rows_in
    assert counts["rows_kept"] == kept and counts["rows_quarantined"] == quarantined
    assert checks.rows_accounted_for(counts).passed
    # what was kept and what was quarantined can both be written as Parquet
    prepared.samples.write_parquet(tmp / "kept.parquet")
    ing.quarantine.write_parquet(tmp / "quarantine.parquet")
    return prepared


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_bad_jsonl_line_is_quarantined_and_the_reader_goes_on(attack: str, tmp_path: Path) -> None:
    src = QATableSource({"path": str(qa_table_file(tmp_path, attack)), "license": "CC0-1.0",
                         "columns": QA_COLUMNS})
    ing = fe.ingest(src, "qa", MediaStore(tmp_path / "store"), ImageLimits())
    assert "source_failed" not in ing.quarantine["reason"].to_list()
    assert sorted(ing.samples["source_row_id"]) == sorted([f"r{i}" for i in range(1, 7)] + ["r1-again"])
    prepared = _assert_accounted(ing, QA_KEPT, QA_QUARANTINED, QA_ROWS, tmp_path)
    assert prepared.duplicates == QA_DUPLICATES and prepared.over_quota == 0


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_bad_tabmwp_problem_costs_that_problem_only(attack: str, tmp_path: Path) -> None:
    src = TabMWPSource({"path": str(tabmwp_dir(tmp_path, attack))})
    ing = fe.ingest(src, "tabmwp", MediaStore(tmp_path / "store"), ImageLimits())
    assert "source_failed" not in ing.quarantine["reason"].to_list()
    assert sorted(ing.samples["source_row_id"]) == sorted(TABMWP_IDS)
    assert ing.quarantine["source_row_id"].to_list() == ["bad"]
    prepared = _assert_accounted(ing, TABMWP_KEPT, TABMWP_QUARANTINED, len(TABMWP_IDS) + 1, tmp_path)
    assert prepared.duplicates == 0


def test_the_quarantine_reason_says_what_was_wrong(tmp_path: Path) -> None:
    reasons = {}
    for attack in ATTACKS:
        d = tmp_path / attack
        d.mkdir()
        src = TabMWPSource({"path": str(tabmwp_dir(d, attack))})
        ing = fe.ingest(src, "tabmwp", MediaStore(d / "store"), ImageLimits())
        reasons[attack] = ing.quarantine["detail"][0]
    assert "surrogate" in reasons["lone_surrogate"] or "UTF-8" in reasons["lone_surrogate"]
    assert "UTF-8" in reasons["raw_0xff_byte"]
    assert "choices" in reasons["choices_not_a_list"]
    assert "deep" in reasons["nested_100000_deep"]


class _Scripted(Source):
    """A third-party source that yields what a test scripts, then optionally breaks."""

    name = "scripted"
    version = "1"

    def __init__(self, rows: list, then_raise: bool = False) -> None:
        super().__init__()
        self.rows, self.then_raise = rows, then_raise

    def read(self) -> Iterator[SourceRow | BadRow]:
        yield from self.rows
        if self.then_raise:
            raise OSError("the disk went away")


def test_any_exception_in_building_a_sample_quarantines_that_row_only(tmp_path: Path) -> None:
    rows = [SourceRow("a", "What?", "x"),
            SourceRow("b", 123, "x"),  # type: ignore[arg-type]  # not text: .strip() raises
            SourceRow("c", "Why?", "y", meta={"note": "caf\udce9"}),  # a lone surrogate in meta
            SourceRow("d\ud800", "Who?", "z"),  # and in the row id
            "not a row",
            SourceRow("e", "When?", "w")]
    ing = fe.ingest(_Scripted(rows), "s", MediaStore(tmp_path), ImageLimits())
    assert sorted(ing.samples["source_row_id"]) == ["a", "e"]
    assert ing.quarantine.height == 4 and ing.counts == {"read": 6, "ok": 2, "quarantined": 4}
    q = dict(zip(ing.quarantine["source_row_id"], ing.quarantine["detail"], strict=True))
    assert "AttributeError" in q["b"] and "surrogate" in q["c"]
    assert "d\\ud800" in q  # the id itself is escaped so the table can be written
    ing.quarantine.write_parquet(tmp_path / "q.parquet")
    ing.samples.write_parquet(tmp_path / "s.parquet")


def test_a_reader_that_breaks_fails_loudly_naming_the_source(tmp_path: Path) -> None:
    with pytest.raises(fe.SourceFailed, match=r"source 'mine'.*OSError: the disk went away") as err:
        fe.ingest(_Scripted([SourceRow("a", "What?", "x")], then_raise=True), "mine",
                  MediaStore(tmp_path), ImageLimits())
    assert "after 1 row" in str(err.value)


def _materialize_source(tmp: Path, name: str, options: dict) -> dg.ExecuteInProcessResult:
    cfg = load_config(write_project(tmp, {name: {"plugin": "qa_table", "options": options}}, 2))
    defs = build_definitions(cfg, "local")
    return dg.materialize(list(defs.assets), selection=[dg.AssetKey(["source_samples", name]),
                                                        dg.AssetKey(["quarantine", "source", name])],
                          resources=defs.resources, raise_on_error=False)


def test_a_missing_file_fails_the_source_asset_with_a_readable_message(tmp_path: Path) -> None:
    r = _materialize_source(tmp_path, "gone", {"path": "does-not-exist.jsonl", "license": "CC0-1.0",
                                               "columns": {"question": "q", "answer": "a"}})
    assert not r.success
    failure = next(e for e in r.all_events if e.event_type_value == "STEP_FAILURE")
    text = str(failure.step_failure_data.error.message) + str(failure.step_failure_data.user_failure_data)
    assert "source 'gone'" in text and "does-not-exist.jsonl" in text


def test_the_source_asset_records_its_counts_and_checks_them(tmp_path: Path) -> None:
    qa_table_file(tmp_path, "nested_100000_deep")
    r = _materialize_source(tmp_path, "qa", {"path": "qa.jsonl", "license": "CC0-1.0", "columns": QA_COLUMNS})
    assert r.success
    (mat,) = [m for m in r.asset_materializations_for_node("source_qa")
              if m.asset_key == dg.AssetKey(["source_samples", "qa"])]
    meta = {k: v.value for k, v in mat.metadata.items()}
    assert meta["rows_read"] == QA_ROWS and meta["rows_kept"] == QA_KEPT
    assert meta["rows_quarantined"] == QA_QUARANTINED and meta["rows_dropped_duplicate"] == QA_DUPLICATES
    assert meta["rows_dropped_by_quota"] == 0
    (check,) = r.get_asset_check_evaluations()
    assert check.check_name == "rows_accounted_for" and check.passed
    assert check.severity == dg.AssetCheckSeverity.ERROR


def test_quota_drops_are_their_own_term(tmp_path: Path) -> None:
    qa_table_file(tmp_path, "choices_not_a_list")
    cfg = load_config(write_project(tmp_path, {"qa": {"plugin": "qa_table", "quota": 4, "options": {
        "path": "qa.jsonl", "license": "CC0-1.0", "columns": QA_COLUMNS}}}, 2))
    defs = build_definitions(cfg, "local")
    r = dg.materialize(list(defs.assets), selection=[dg.AssetKey(["source_samples", "qa"]),
                                                     dg.AssetKey(["quarantine", "source", "qa"])],
                       resources=defs.resources)
    (mat,) = [m for m in r.asset_materializations_for_node("source_qa")
              if m.asset_key == dg.AssetKey(["source_samples", "qa"])]
    meta = {k: v.value for k, v in mat.metadata.items()}
    assert (meta["rows_kept"], meta["rows_dropped_by_quota"], meta["rows_dropped_duplicate"]) == (4, 2, 1)
    assert r.get_asset_check_evaluations()[0].passed


def test_the_accounting_check_fails_when_a_row_is_unaccounted_for() -> None:
    counts = {"rows_read": 10, "rows_kept": 6, "rows_quarantined": 2, "rows_dropped_duplicate": 1,
              "rows_dropped_by_quota": 0}
    out = checks.rows_accounted_for(counts)
    assert not out.passed and out.metadata["rows_unaccounted"] == 1
    assert checks.rows_accounted_for({**counts, "rows_dropped_by_quota": 1}).passed


def test_a_json_document_is_read_member_by_member(tmp_path: Path) -> None:
    f = tmp_path / "doc.json"
    f.write_bytes(b'\xef\xbb\xbf {"a": {"x": 1}, "b": ' + b"[" * DEEP + b"]" * DEEP
                  + b', "c\\ud800": 2, "d": "\xff", "e": [3, "]}"]}')
    items = list(iter_json_members(f))
    assert items[0] == ("a", {"x": 1}) and items[-1] == ("e", [3, "]}"])
    deep, key, byte = items[1:4]
    assert isinstance(deep, BadRow) and deep.row_id == "b" and "deep" in deep.reason
    assert isinstance(key, BadRow) and key.row_id == "c\\ud800" and "U+D800" in key.reason
    assert isinstance(byte, BadRow) and byte.row_id == "d" and "byte 0xFF" in byte.reason
    f.write_text('[{"i": 0}, 1, {"i": 2}]')
    assert list(iter_json_members(f)) == [("0", {"i": 0}), ("1", 1), ("2", {"i": 2})]
    f.write_text('{"a": 1, "b": 2 "c": 3}')  # no safe place to resume: the file is broken
    with pytest.raises(json.JSONDecodeError):
        list(iter_json_members(f))
    f.write_text('"just a string"')
    with pytest.raises(ValueError, match="JSON object or list"):
        list(iter_json_members(f))


def test_visual_cot_json_list_keeps_the_items_around_a_bad_one(tmp_path: Path) -> None:
    item = {"question": "What is shown?", "answer": "a cat", "image": "a.png", "dataset": ""}
    f = tmp_path / "viscot.json"
    f.write_bytes(b"[" + json.dumps(item).encode() + b", " + b"[" * DEEP + b"]" * DEEP + b", "
                  + json.dumps({**item, "question": "caf\\ud800?"}).encode().replace(b"\\\\", b"\\") + b", "
                  + json.dumps(item).encode() + b"]")
    rows = list(VisualCoTSource({"path": str(f)}).read())
    assert [type(r).__name__ for r in rows] == ["SourceRow", "BadRow", "BadRow", "SourceRow"]
    assert rows[1].row_id == "item 1" and "deep" in rows[1].reason
    assert "U+D800" in rows[2].reason
