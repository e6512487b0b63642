"""Exported files through the offline student's real chat template and processor."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mmat_assets.engine import export as ex
from mmat_assets.plugins import load_registry
from mmat_plugins.trainers_hf_lora import HFLoRATrainer, encode_record
from tests.test_export import _records
from tests.test_student import build_test_student, student_cache

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def student_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_student(student_cache(request, tmp_path_factory))


@pytest.fixture(scope="module")
def processor(student_dir: Path) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(student_dir))


def _encode(student_dir: Path, max_length: int = 2048) -> ex.Encoder:
    """The encoder the export's pre-flight gets from the configured trainer."""
    encode = HFLoRATrainer().encoder(str(student_dir), max_length)
    assert encode is not None
    return encode


@pytest.mark.slow
def test_swift_and_sharegpt_files_encode_with_the_student(tmp_path: Path, processor: Any) -> None:
    recs = _records(tmp_path)
    reg = load_registry(entry_points=False)
    swift = reg.create("exporter", "ms_swift").export(recs, tmp_path / "swift", {})
    for fmt in ("rr", "orr"):
        for line in Path(swift[fmt]).read_text().splitlines():
            row = json.loads(line)
            d = encode_record(processor, {"messages": row["messages"], "images": row["images"]}, 2048,
                              image_root=tmp_path / "swift")  # ms-swift's ROOT_IMAGE_DIR
            assert d["n_images"] == d["n_image_placeholders"] == 1 and d["n_image_tokens"] > 0
            assert not d["truncated"] and d["assistant_tokens"] > 0
    sg = reg.create("exporter", "sharegpt").export(recs, tmp_path / "sg", {})
    role = {"human": "user", "observation": "user", "gpt": "assistant"}
    for conv in json.loads(Path(sg["rr"]).read_text()):
        msgs = [{"role": "system", "content": conv["system"]}] + \
               [{"role": role[t["from"]], "content": t["value"]} for t in conv["conversations"]]
        images = [str(tmp_path / "sg" / p) for p in conv["images"]]
        d = encode_record(processor, {"messages": msgs, "images": images}, 2048)
        assert d["assistant_tokens"] > 0 and not d["truncated"]


@pytest.mark.slow
def test_preflight_with_the_student_catches_broken_records(tmp_path: Path, student_dir: Path) -> None:
    good = _records(tmp_path)["rr"][0]
    mismatch = ex.Record("two-tags", "rr", [dict(m) for m in good.messages], good.images, good.meta)
    mismatch.messages[1]["content"] = ex.IMAGE_TAG + mismatch.messages[1]["content"]
    ok, bad = ex.preflight([good, mismatch], _encode(student_dir))
    assert [r.id for r in ok] == ["s1"] and [(b.id, b.reason) for b in bad] == [("two-tags", "image_count_mismatch")]
    # the system prompt alone is longer than 40 tokens: the image tokens would be cut away
    ok, bad = ex.preflight([good], _encode(student_dir, max_length=40))
    assert ok == [] and [b.reason for b in bad] == ["truncated_through_image", "empty_loss_mask"]
    # long enough for the image, too short for the whole dialogue: plainly truncated
    full = len(_encode(student_dir)(good)["input_ids"])
    ok, bad = ex.preflight([good], _encode(student_dir, max_length=full - 3))
    assert ok == [] and [b.reason for b in bad] == ["truncated"]
