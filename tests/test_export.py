"""Exporters and pre-flight: real consumers load what we write; broken records are caught."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from mmat_assets import protocol
from mmat_assets.engine import export as ex
from mmat_assets.engine.stages import orr_system, rr_system
from mmat_assets.plugins import load_registry

RR_SYSTEM, ORR_SYSTEM = rr_system({}), orr_system({})  # the prompts of a build with no tools


def _records(tmp: Path) -> dict[str, list[ex.Record]]:
    img = tmp / "media" / ("ab" * 32 + ".png")
    img.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 12), "red").save(img)
    t = protocol.Trajectory("What is a + b?\nAnswer the question using a single word or phrase.", [
        protocol.Step("I read the table.", [protocol.OperatorCall("ocr")], None, "continue",
                      [protocol.Result("ocr", "a | 12\nb | 5")]),
        protocol.Step("12 + 5 = 17. So the answer is 17.", [], None, "end")], "17", RR_SYSTEM)
    meta = {"source": "tabmwp", "subset": "grade_3", "source_row_id": "9", "license": "CC BY-NC-SA 4.0",
            "used_rag": False, "reflected": False, "checks": [], "quality": None, "shard": 0}

    def rec(fmt: str, msgs: list[dict[str, str]]) -> ex.Record:
        msgs = [dict(m) for m in msgs]
        next(m for m in msgs if m["role"] == "user")["content"] = ex.IMAGE_TAG + msgs[1]["content"]
        return ex.Record("s1", fmt, msgs, [str(img)], dict(meta))

    return {"rr": [rec("rr", protocol.render_rr(t))],
            "orr": [rec("orr", protocol.render_orr(protocol.to_one_turn(t, ORR_SYSTEM)))]}


@pytest.fixture(scope="module")
def registry():
    return load_registry(entry_points=False)


def test_hf_export_loads_with_datasets_and_keeps_images(tmp_path: Path, registry) -> None:
    import datasets

    out = tmp_path / "hf"
    registry.create("exporter", "hf_datasets").export(_records(tmp_path), out,
                                                      {"teachers": ["grounded-1"], "tool_versions": {"ocr": "1"},
                                                       "stage_counts": {"in": 3, "rr": 1}, "rr_system": RR_SYSTEM,
                                                       "orr_system": ORR_SYSTEM, "data_version": "0123456789abcdef"})
    import shutil

    shutil.rmtree(tmp_path / "media")  # the folder must stand alone: image bytes are inside it
    rr = datasets.load_dataset(str(out), "rr", split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert isinstance(rr.features["images"].feature, datasets.Image)
    row = rr[0]
    assert row["images"][0].size == (20, 12)
    assert row["messages"][-1] == {"role": "assistant", "content": "17"}
    assert protocol.parse_rr([{**m, "content": m["content"].replace(ex.IMAGE_TAG, "")} for m in row["messages"]]).answer == "17"
    orr = datasets.load_dataset(str(out), "orr", split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert orr[0]["messages"][-1]["content"].endswith("<ANSWER>The answer is: 17</ANSWER>")
    card = (out / "README.md").read_text()
    assert "| tabmwp | CC BY-NC-SA 4.0 | 2 | yes |" in card and "non-commercial rows" in card
    assert RR_SYSTEM.splitlines()[0] in card and ORR_SYSTEM.splitlines()[0] in card and "grounded-1" in card
    assert "data version: `0123456789abcdef`" in card and "| rr | 1 |" in card


def test_hf_export_loads_without_a_config_name_and_its_card_is_valid_hub_yaml(tmp_path: Path, registry) -> None:
    import datasets
    from huggingface_hub import DatasetCard, DatasetCardData

    out = tmp_path / "hf"
    recs = _records(tmp_path)
    recs["orr"][0].meta["license"] = "Custom research licence"
    for r in recs["rr"]:
        r.meta["dataset"] = "tabmwp"
    registry.create("exporter", "hf_datasets").export(recs, out, {"data_version": "0123456789abcdef"})
    rr = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert rr[0]["messages"][-1] == {"role": "assistant", "content": "17"}  # the default configuration is rr
    card = DatasetCard.load(out / "README.md")
    assert isinstance(card.data, DatasetCardData) and card.data.pretty_name
    assert card.data.license == ["cc-by-nc-sa-4.0", "other"] and card.data.license_name == "custom-research-licence"
    assert [(c["config_name"], c.get("default")) for c in card.data.configs] == [("rr", True), ("orr", None)]
    assert card.data.task_categories and "agent-tuning" in card.data.tags
    assert "0123456789abcdef" in card.text and "@inproceedings{lu2023dynamic" in card.text  # TabMWP's paper


def test_swift_sharegpt_internvl_files_follow_their_formats(tmp_path: Path, registry) -> None:
    recs = _records(tmp_path)
    swift = registry.create("exporter", "ms_swift").export(recs, tmp_path / "swift", {})
    line = json.loads(Path(swift["rr"]).read_text().splitlines()[0])
    assert line["messages"][1]["content"].startswith("<image>What is a + b?")
    assert line["images"] == [f"images/{'ab' * 32}.png"] and (tmp_path / "swift" / line["images"][0]).is_file()

    sg = registry.create("exporter", "sharegpt").export(recs, tmp_path / "sg", {})
    conv = json.loads(Path(sg["rr"]).read_text())[0]
    assert [t["from"] for t in conv["conversations"]] == ["human", "gpt", "observation", "gpt", "human", "gpt"]
    assert conv["system"] == RR_SYSTEM and (tmp_path / "sg" / conv["images"][0]).is_file()
    info = json.loads(Path(sg["dataset_info"]).read_text())
    assert info["mmat_rr"]["tags"]["observation_tag"] == "observation"

    iv = registry.create("exporter", "internvl").export(recs, tmp_path / "iv", {})
    row = json.loads(Path(iv["rr"]).read_text().splitlines()[0])
    assert row["conversations"][0]["value"].startswith("<image>\nWhat is a + b?")
    assert all(t["from"] != "system" for t in row["conversations"])
    meta = json.loads(Path(iv["meta"]).read_text())["mmat_rr"]
    assert meta["root"] == "." and meta["annotation"] == "rr.jsonl" and meta["length"] == 1
    assert (tmp_path / "iv" / meta["root"] / row["image"]).is_file()


def test_preflight_catches_image_mismatch_and_role_order(tmp_path: Path) -> None:
    recs = _records(tmp_path)
    good = recs["rr"][0]
    extra_tag = ex.Record("s2", "rr", [dict(m) for m in good.messages], good.images, good.meta)
    extra_tag.messages[3]["content"] = "OCR saw <image> in the table. " + extra_tag.messages[3]["content"]
    no_image = ex.Record("s3", "rr", good.messages, [], good.meta)
    bad_order = ex.Record("s4", "rr", good.messages[:2] + good.messages[3:], good.images, good.meta)
    ok, bad = ex.preflight([good, extra_tag, no_image, bad_order], None)
    assert [r.id for r in ok] == ["s1"]
    assert {(b.id, b.reason) for b in bad} == {("s2", "image_count_mismatch"), ("s3", "image_count_mismatch"),
                                              ("s4", "role_order")}


def test_rejection_reasons_name_images_by_file_name_not_local_path(tmp_path: Path) -> None:
    good = _records(tmp_path)["rr"][0]
    gone = ex.Record("s5", "rr", good.messages, [str(tmp_path / "media" / "gone.png")], good.meta)
    _, bad = ex.preflight([gone], None)
    assert [(b.reason, b.detail) for b in bad] == [("missing_image", "image file not found: gone.png")]

    def fails(rec: ex.Record) -> dict:
        raise OSError(f"cannot decode {rec.images[0]}")

    _, bad = ex.preflight([good], fails)
    assert [b.reason for b in bad] == ["encode_failed"] and str(tmp_path) not in bad[0].detail
    assert bad[0].detail == f"OSError: cannot decode {'ab' * 32}.png"


def test_preflight_uses_the_encoder_verdicts(tmp_path: Path) -> None:
    rec = _records(tmp_path)["rr"][0]
    verdicts = {"truncated_through_image": True, "truncated": True, "assistant_tokens": 5}
    _, bad = ex.preflight([rec], lambda r: verdicts)
    assert [b.reason for b in bad] == ["truncated_through_image"]
    _, bad = ex.preflight([rec], lambda r: {"assistant_tokens": 0})
    assert [b.reason for b in bad] == ["empty_loss_mask"]


def test_filters(tmp_path: Path) -> None:
    import polars as pl

    df = pl.DataFrame({"source": ["a", "b", "a"], "license": ["CC BY-NC-SA 4.0", "MIT", "MIT"],
                       "quality": [0.9, None, 0.2], "used_rag": [True, False, None], "reflected": [False, True, None]})
    assert ex.apply_filter(df, ex.ExportFilter(commercial_only=True))["license"].to_list() == ["MIT", "MIT"]
    assert ex.apply_filter(df, ex.ExportFilter(min_quality=0.5)).height == 2
    assert ex.apply_filter(df, ex.ExportFilter(sources=["a"], used_rag=False)).height == 1
    assert ex.apply_filter(df, ex.ExportFilter(reflected=True))["source"].to_list() == ["b"]
