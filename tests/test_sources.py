"""The built-in sources read their fixtures exactly, and the host ingests them as expected.

Fixtures live in ``tests/fixtures/<family>/`` (written by ``tests/fixtures/make_fixtures.py``)
and hold a few good rows in each public format plus deliberately broken ones.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pydantic import ValidationError

from mmat_assets.contracts import BadRow, Source, SourceRow
from mmat_assets.engine.foundation import Ingested, ingest
from mmat_assets.engine.images import ImageLimits
from mmat_assets.media import MediaStore
from mmat_assets.toolkit.jsonl import iter_jsonl, iter_jsonl_objects
from mmat_plugins.sources_cauldron import CauldronSource, subset_of
from mmat_plugins.sources_infoseek import InfoSeekSource
from mmat_plugins.sources_llava_cot import LlavaCoTSource, parse_choices, parse_stages
from mmat_plugins.sources_qa_table import QATableSource
from mmat_plugins.sources_visual_cot import VisualCoTSource, parse_box

FIX = Path(__file__).parent / "fixtures"
QA_COLUMNS = {"id": "qid", "question": "prompt", "answer": "gold", "image": "img",
              "choices": "opts", "rationale": "why", "subset": "split"}


def split(rows: Iterable[SourceRow | BadRow]) -> tuple[dict[str, SourceRow], dict[str, BadRow]]:
    """Good rows and bad rows, each by row id (ids must be unique)."""
    good: dict[str, SourceRow] = {}
    bad: dict[str, BadRow] = {}
    for row in rows:
        target: dict[str, Any] = bad if isinstance(row, BadRow) else good
        assert row.row_id not in target, f"duplicate row id {row.row_id}"
        target[row.row_id] = row
    return good, bad


def host(source: Source, name: str, tmp_path: Path) -> Ingested:
    return ingest(source, name, MediaStore(tmp_path), ImageLimits())


def quarantined(result: Ingested) -> dict[str, str]:
    """Quarantine reason by source row id."""
    q = result.quarantine
    return dict(zip(q["source_row_id"].to_list(), q["reason"].to_list(), strict=True))


def hosted(source: Source, name: str, tmp_path: Path, counts: dict[str, int], reasons: dict[str, str]) -> Ingested:
    """The source ingested by the host, checked for its counts and quarantine reasons."""
    result = host(source, name, tmp_path)
    assert result.counts == counts
    assert quarantined(result) == reasons
    return result


# ------------------------------------------------------------------------ jsonl helper


def test_jsonl_reader_strict_utf8_bom_blank_lines_and_non_objects(tmp_path: Path) -> None:
    f = tmp_path / "x.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"a": 1}\r\n\n{"b": "\xc3\xa9"}\n\xc3\x28\n{oops\n[1]\n')
    items = list(iter_jsonl(f))
    assert items[0] == (1, {"a": 1})  # the BOM is dropped, CRLF accepted
    assert items[1] == (3, {"b": "é"})  # blank line 2 skipped but counted
    assert isinstance(items[2], BadRow) and items[2].row_id == "line 4"
    assert items[2].reason.startswith("invalid UTF-8: ")
    assert isinstance(items[3], BadRow) and items[3].row_id == "line 5"
    assert items[3].reason.startswith("invalid JSON: ") and items[3].raw == "{oops"
    assert items[4] == (6, [1])
    last = list(iter_jsonl_objects(f))[-1]
    assert isinstance(last, BadRow) and last.reason == "not a JSON object: list"


# --------------------------------------------------------------------------- llava_cot


def llava() -> LlavaCoTSource:
    src = LlavaCoTSource({"path": "llava_cot/train.jsonl", "image_root": "llava_cot/images"})
    src.base_dir = FIX  # relative option paths resolve against the config's directory
    return src


def test_llava_cot_rows() -> None:
    good, bad = split(llava().read())
    assert list(good) == ["chart_1#0", "chart_1#1", "sqa_7#0", "ai2d_3#0", "geo_2#0", "sqa_9#0"]
    chart = good["chart_1#0"]
    assert chart.question == "What is the highest value in the chart?"
    assert chart.answer == "42"
    assert chart.subset == "chartqa"
    assert [i.path for i in chart.images] == ["chartqa/train/png/c1.png"]
    assert chart.rationale == ("Summary: I will read the tallest bar.\n\n"
                               "Caption: A bar chart of yearly sales.\n\n"
                               "Reasoning: The tallest bar reaches 42.")
    assert good["chart_1#1"].question == "Which year had the lowest value?"
    assert good["chart_1#1"].answer == "2019"
    assert good["sqa_7#0"].choices == ["Ohio", "Texas", "Maine"]
    assert good["sqa_7#0"].answer == "C" and good["sqa_7#0"].subset == "sqa"
    assert good["ai2d_3#0"].choices == ["egg", "larva", "adult"]
    assert good["geo_2#0"].subset == "geoqa+" and good["geo_2#0"].answer == "30°"
    assert good["sqa_9#0"].question == ""  # yielded; the host quarantines it
    assert {k: b.reason.split(":")[0] for k, b in bad.items()} == {
        "line 3": "invalid UTF-8",
        "ai2d_3#1": "gpt turn has no <CONCLUSION> stage",
    }
    src = llava()
    assert src.row_license() == "Apache-2.0" and src.image_root() == FIX / "llava_cot/images"


def test_llava_cot_through_host(tmp_path: Path) -> None:
    result = hosted(llava(), "llava", tmp_path, {"read": 8, "ok": 4, "quarantined": 4}, {
        "line 3": "bad_row",
        "ai2d_3#1": "bad_row",
        "geo_2#0": "image_path_escape",
        "sqa_9#0": "empty_question",
    })
    s = result.samples
    assert s["source_row_id"].to_list() == ["chart_1#0", "chart_1#1", "sqa_7#0", "ai2d_3#0"]
    assert set(s["dataset"]) == {"llava_cot"} and set(s["license"]) == {"Apache-2.0"}
    assert s["subset"].to_list() == ["chartqa", "chartqa", "sqa", "ai2d"]
    # Both questions about the chart share one stored image.
    assert s["image_key"][0] == s["image_key"][1] != s["image_key"][2]


def test_llava_cot_default_image_root_is_the_jsonl_directory() -> None:
    src = LlavaCoTSource({"path": str(FIX / "llava_cot/train.jsonl")})
    assert src.image_root() == FIX / "llava_cot"


def test_parse_choices_forms() -> None:
    assert parse_choices("Q?\nOptions:\nA. one\nB. two\nAnswer briefly.") == ["one", "two"]
    assert parse_choices("Q?\nChoices:\n(A) red\n(B) blue") == ["red", "blue"]
    assert parse_choices("Q?\nOptions: A. 12, B. 15, C. 18") == ["12", "15", "18"]
    assert parse_choices("Q? Options are not listed here.") == []
    assert parse_choices("Q?\nOptions:\nB. skipped A\nC. x") == []  # letters must start at A


def test_parse_stages_takes_tag_bodies() -> None:
    text = "<SUMMARY> s </SUMMARY>\n<CONCLUSION>\nYes\n</CONCLUSION>"
    assert parse_stages(text) == {"SUMMARY": "s", "CONCLUSION": "Yes"}


# -------------------------------------------------------------------------- visual_cot


def viscot(name: str) -> VisualCoTSource:
    return VisualCoTSource({"path": str(FIX / "visual_cot" / name)})


def test_visual_cot_training_form() -> None:
    good, bad = split(viscot("viscot_sample.json").read())
    assert list(good) == ["docvqa:0", "gqa:0", "9"]
    doc = good["docvqa:0"]
    assert doc.question == "What is the invoice number?"  # the CoT prompt is removed
    assert doc.answer == "INV-42" and doc.subset == "docvqa"
    assert [i.path for i in doc.images] == ["cot/docvqa/doc1.png"]  # region entry = same file
    assert doc.meta["regions"] == [[4, 6, 20, 14]]
    assert doc.meta["region_normalized"] == [0.125, 0.312, 0.625, 0.562]
    assert doc.meta["split"] == "train"
    assert doc.rationale == "The key region is [4, 6, 20, 14] (pixel coordinates x1, y1, x2, y2)."
    gqa = good["gqa:0"]
    assert gqa.question == "Is the dog to the left of the car?"  # "think step by step" prompt too
    assert gqa.answer == "Yes" and gqa.meta["regions"] == [[1, 2, 10, 12]]
    plain = good["9"]
    assert (plain.question, plain.answer, plain.rationale) == ("What is the date?", "2020", None)
    assert plain.meta["regions"] == []
    assert list(bad) == ["textvqa:5"]
    assert bad["textvqa:5"].reason == "expected turns ['human', 'gpt', 'human', 'gpt'], found ['human', 'gpt']"


def test_visual_cot_metadata_form() -> None:
    good, bad = split(viscot("metadata.jsonl").read())
    assert list(good) == ["line 1", "line 2"]
    bottle = good["line 1"]
    # TextCaps questions use the TextVQA images, as in the release's conversion script.
    assert [i.path for i in bottle.images] == ["cot/textvqa/t1.jpg"]
    assert bottle.subset == "textcap" and bottle.answer == "Acme"
    assert bottle.meta["regions"] == [[2, 3, 12, 9], [14, 3, 20, 9]]
    assert bottle.rationale == ("The key regions are [2, 3, 12, 9] and [14, 3, 20, 9] "
                                "(pixel coordinates x1, y1, x2, y2).")
    assert [i.path for i in good["line 2"].images] == ["cot/gqa/g1.jpg"]
    assert bad["line 3"].reason == "malformed box [1, 2, 3]: expected [x1, y1, x2, y2]"


def test_visual_cot_through_host(tmp_path: Path) -> None:
    result = hosted(viscot("viscot_sample.json"), "viscot", tmp_path, {"read": 4, "ok": 3, "quarantined": 1},
                    {"textvqa:5": "bad_row"})
    meta = json.loads(result.samples["meta"][0])
    assert meta["regions"] == [[4, 6, 20, 14]]
    result = host(viscot("metadata.jsonl"), "viscot_meta", tmp_path)
    assert result.counts == {"read": 3, "ok": 2, "quarantined": 1}


def test_parse_box_keeps_ints_and_floats() -> None:
    assert parse_box("[1, 2, 30, 40]") == [1, 2, 30, 40]
    assert parse_box("[0.1, 0.25, 0.5, 1.0] .") == [0.1, 0.25, 0.5, 1.0]


def test_visual_cot_option_template_is_checked() -> None:
    with pytest.raises(ValidationError):
        VisualCoTSource({"path": "x.json", "metadata_image_dir": "cot/{name}"})


# ---------------------------------------------------------------------------- cauldron


def cauldron(**options: Any) -> CauldronSource:
    return CauldronSource({"path": str(FIX / "cauldron"), **options})


def test_cauldron_rows() -> None:
    good, bad = split(cauldron(licenses={"ai2d": "CC-BY-SA-4.0"}).read())
    ai2d = "ai2d/train-00000-of-00001.parquet"
    chart = "chartqa/train/0000.parquet"
    assert list(good) == [f"{ai2d}:0#0", f"{ai2d}:0#1", f"{ai2d}:1#0", f"{chart}:0#0", f"{chart}:3#0"]
    first = good[f"{ai2d}:0#0"]
    assert first.question.startswith("Question: What eats grass?\nChoices:")
    assert first.answer == "Answer: A"
    assert first.subset == "ai2d" and first.license == "CC-BY-SA-4.0"
    assert first.meta == {"source": "AI2D", "shard": ai2d, "row": 0, "turn": 0}
    data = first.images[0].data
    assert data is not None and first.images[0].path is None
    assert Image.open(io.BytesIO(data)).size == (32, 24)
    # Both turns of a row carry the row's images.
    assert good[f"{ai2d}:0#1"].images == first.images
    two = good[f"{chart}:0#0"]
    assert two.subset == "chartqa"  # the split directory train/ is skipped
    assert two.license == "CC-BY-4.0" and len(two.images) == 2
    assert {k: b.reason for k, b in bad.items()} == {
        f"{chart}:1": "'images' is not a list",
        f"{chart}:2#0": "text turn lacks string 'user' and 'assistant'",
    }
    assert "assistant" in bad[f"{chart}:2#0"].raw and "bytes" not in bad[f"{chart}:2#0"].raw


def test_cauldron_single_file_and_subset_option() -> None:
    src = CauldronSource({"path": str(FIX / "cauldron/ai2d/train-00000-of-00001.parquet"),
                          "subset": "ai2d_custom"})
    good, bad = split(src.read())
    assert list(good) == ["train-00000-of-00001.parquet:0#0", "train-00000-of-00001.parquet:0#1",
                          "train-00000-of-00001.parquet:1#0"]
    assert {r.subset for r in good.values()} == {"ai2d_custom"} and not bad


def test_cauldron_through_host(tmp_path: Path) -> None:
    result = host(cauldron(licenses={"ai2d": "CC-BY-SA-4.0"}), "cauldron", tmp_path)
    assert result.counts == {"read": 7, "ok": 4, "quarantined": 3}
    assert sorted(quarantined(result).values()) == ["bad_row", "bad_row", "corrupt_image"]
    s = result.samples
    assert s["license"].to_list() == ["CC-BY-SA-4.0"] * 3 + ["CC-BY-4.0"]
    assert set(s["dataset"]) == {"the_cauldron"}
    assert s["images"].list.len().to_list() == [1, 1, 1, 2]


def test_cauldron_bad_shards_become_bad_rows(tmp_path: Path) -> None:
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken/0000.parquet").write_bytes(b"this is not parquet")
    pq.write_table(pa.table({"question": ["q"]}), tmp_path / "other.parquet")
    good, bad = split(CauldronSource({"path": str(tmp_path)}).read())
    assert not good
    assert bad["broken/0000.parquet:0"].reason.startswith("unreadable Parquet shard after 0 rows")
    assert bad["other.parquet"].reason == "not a Cauldron shard: missing column(s) ['images', 'texts']"


def test_cauldron_missing_path_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        list(CauldronSource({"path": str(tmp_path / "nope")}).read())
    assert subset_of(Path("/d/vqav2/validation/0001.parquet")) == "vqav2"


# ---------------------------------------------------------------------------- infoseek


def infoseek(**options: Any) -> InfoSeekSource:
    return InfoSeekSource({"path": str(FIX / "infoseek/infoseek_val.jsonl"),
                           "image_root": str(FIX / "infoseek/images"), **options})


def test_infoseek_rows() -> None:
    good, bad = split(infoseek(entities=str(FIX / "infoseek/entities.jsonl")).read())
    assert list(good) == ["infoseek_val_00000001", "infoseek_val_00000002", "infoseek_val_00000005"]
    one = good["infoseek_val_00000001"]
    assert one.question == "What country is this building located in?"
    assert one.answer == "France"
    assert one.subset == "val_unseen_question"
    assert [i.path for i in one.images] == ["oven_0001.jpg"]
    assert one.meta["answers"] == ["France", "French Republic"]
    assert one.meta["entity_id"] == "Q243" and one.meta["entity"] == "Eiffel Tower"  # from the map
    two = good["infoseek_val_00000002"]
    assert two.answer == "1937"
    assert two.meta["answer_eval"] == [{"wikidata": 1937, "range": [1936, 1938]}]
    assert two.meta["entity"] == "Golden Gate Bridge"  # the row's own entity_text wins
    assert {k: b.reason.split(":")[0] for k, b in bad.items()} == {
        "line 3": "invalid JSON",
        "infoseek_val_00000004": "missing field(s) ['image_id']",
    }


def test_infoseek_image_pattern() -> None:
    good, _ = split(infoseek(image_pattern="{image_id}.jpg").read())
    assert good["infoseek_val_00000002"].images[0].path == "oven_0002.jpg"
    good, _ = split(infoseek(image_pattern="shard/{image_id}.JPEG").read())
    assert good["infoseek_val_00000002"].images[0].path == "shard/oven_0002.JPEG"
    with pytest.raises(ValidationError):
        infoseek(image_pattern="{id}.jpg")
    with pytest.raises(ValidationError):
        infoseek(image_pattern="fixed.jpg")


def test_infoseek_through_host(tmp_path: Path) -> None:
    result = hosted(infoseek(), "infoseek", tmp_path, {"read": 5, "ok": 2, "quarantined": 3}, {
        "line 3": "bad_row",
        "infoseek_val_00000004": "bad_row",
        "infoseek_val_00000005": "missing_image",
    })
    assert result.samples["answer"].to_list() == ["France", "1937"]
    assert set(result.samples["license"]) == {"Apache-2.0"}


# ---------------------------------------------------------------------------- qa_table


def qa_jsonl(**options: Any) -> QATableSource:
    return QATableSource({"path": str(FIX / "qa_table/qa.jsonl"), "license": "CC0-1.0",
                          "columns": QA_COLUMNS, **options})


def test_qa_table_jsonl_rows() -> None:
    good, bad = split(qa_jsonl().read())
    assert list(good) == ["q1", "q2", "3"]  # the row without an id gets its line number
    q1 = good["q1"]
    assert (q1.question, q1.answer, q1.subset) == ("How many apples are there?", "3", "easy")
    assert q1.choices == ["2", "3", "4"] and q1.rationale == "Count them: three apples."
    assert [i.path for i in q1.images] == ["img/apples.png"]
    assert q1.meta == {"difficulty": 1}  # unmapped columns only
    q2 = good["q2"]
    assert q2.answer == "blue" and q2.meta["answers"] == ["blue", "azure"]
    assert [i.path for i in q2.images] == ["img/apples.png", "img/sky.png"]
    assert q2.meta["source_url"] == "http://example.org/sky"
    assert good["3"].choices == ["circle", "square"]  # a JSON-encoded list
    assert {k: b.reason for k, b in bad.items()} == {
        "q4": "missing question column 'prompt'",
        "q5": "image cell is not a path, bytes or image struct: int",
        "line 6": "not a JSON object: list",
    }


def test_qa_table_parquet_rows_and_dataset_option() -> None:
    src = QATableSource({"path": str(FIX / "qa_table/qa.parquet"), "license": "CC0-1.0",
                         "dataset": "shapes", "columns": {"question": "question", "answer": "answer",
                                                          "image": "image", "answer_type": "answer_type"}})
    assert src.file_format() == "parquet" and src.dataset == "shapes"
    good, bad = split(src.read())
    assert list(good) == ["1", "2"] and not bad
    first = good["1"]
    assert (first.question, first.answer, first.answer_type) == ("What is shown?", "a square", "text")
    assert first.images[0].data is not None and first.meta == {"level": 2}
    assert good["2"].question == "" and good["2"].images[0].path == "img/sky.png"


def test_qa_table_through_host(tmp_path: Path) -> None:
    result = host(qa_jsonl(), "qa", tmp_path)
    assert result.counts == {"read": 6, "ok": 3, "quarantined": 3}
    assert set(quarantined(result).values()) == {"bad_row"}
    assert set(result.samples["dataset"]) == {"qa_table"}
    assert set(result.samples["license"]) == {"CC0-1.0"}
    src = QATableSource({"path": str(FIX / "qa_table/qa.parquet"), "license": "CC0-1.0", "dataset": "shapes",
                         "columns": {"question": "question", "answer": "answer", "image": "image"}})
    result = host(src, "shapes", tmp_path)
    assert quarantined(result) == {"2": "empty_question"}
    assert result.samples["dataset"].to_list() == ["shapes"]


def test_qa_table_options_are_strict() -> None:
    with pytest.raises(ValidationError):  # no licence
        QATableSource({"path": "x.jsonl", "columns": {"question": "q", "answer": "a"}})
    with pytest.raises(ValidationError):  # the answer column must be mapped
        QATableSource({"path": "x.jsonl", "license": "MIT", "columns": {"question": "q"}})
    with pytest.raises(ValidationError):  # unknown role
        QATableSource({"path": "x.jsonl", "license": "MIT",
                       "columns": {"question": "q", "answer": "a", "bogus": "b"}})


def test_qa_table_parquet_without_mapped_columns_raises(tmp_path: Path) -> None:
    pq.write_table(pa.table({"text": ["hi"]}), tmp_path / "t.parquet")
    src = QATableSource({"path": str(tmp_path / "t.parquet"), "license": "MIT",
                         "columns": {"question": "q", "answer": "a"}})
    with pytest.raises(ValueError, match="no column"):
        list(src.read())


# -------------------------------------------------------------------------- all sources


MINIMAL_OPTIONS: list[tuple[type[Source], dict[str, Any]]] = [
    (LlavaCoTSource, {"path": "x.jsonl"}),
    (VisualCoTSource, {"path": "x.json"}),
    (CauldronSource, {"path": "x"}),
    (InfoSeekSource, {"path": "x.jsonl", "image_root": "img"}),
    (QATableSource, {"path": "x.jsonl", "license": "MIT", "columns": {"question": "q", "answer": "a"}}),
]


@pytest.mark.parametrize(("cls", "options"), MINIMAL_OPTIONS)
def test_unknown_options_are_refused(cls: type[Source], options: dict[str, Any]) -> None:
    cls(options)  # the minimal options are valid...
    with pytest.raises(ValidationError, match="no_such_option"):
        cls({**options, "no_such_option": 1})  # ...and one unknown key is not


def test_every_option_is_described() -> None:
    for cls in (LlavaCoTSource, VisualCoTSource, CauldronSource, InfoSeekSource, QATableSource):
        for name, field in cls.Options.model_fields.items():
            assert field.description, f"{cls.__name__}.{name} has no description"
