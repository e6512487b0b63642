"""Foundation logic without Dagster: normalise, dedup, quota, shard, and bad input."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import polars as pl
import pytest
from PIL import Image

from mmat_assets import records
from mmat_assets.engine import foundation as fe
from mmat_assets.engine.images import ImageLimits
from mmat_assets.media import MediaStore
from mmat_plugins.sources_qa_table import QATableSource


def _rows(**cols: list) -> pl.DataFrame:
    n = len(next(iter(cols.values())))
    base = {c: [None] * n for c in records.FOUNDATION_COLUMNS}
    base.update({"choices": [[] for _ in range(n)], "images": [[] for _ in range(n)],
                 "image_key": [""] * n, "subset": [""] * n})
    base.update(cols)
    return pl.DataFrame(base, schema=records.FOUNDATION_COLUMNS)


def test_style_constraint_follows_answer_type_and_answer_is_untouched() -> None:
    df = _rows(sample_id=list("abcdef"),
               question=["q1", "q2", "q3", "q4", "q5", "q6"],
               answer=["B", "Yes", "$1,234.50", "3/4", "nonlinear", "Because " + "the sky is blue " * 3],
               choices=[["x", "y"], [], [], [], ["linear", "nonlinear"], []],
               answer_type=[None, None, None, None, None, None])
    out = fe.normalise(df).collect()
    assert out["answer_type"].to_list() == ["option", "yes_no", "number", "number", "text", "free_form"]
    assert out["style"].to_list() == [fe.OPTION_LETTER, fe.SHORT_ANSWER, fe.SHORT_ANSWER,
                                      fe.SHORT_ANSWER, fe.SHORT_ANSWER, ""]
    assert out["answer"].to_list() == df["answer"].to_list()


def test_source_answer_type_wins_over_inference() -> None:
    df = _rows(sample_id=["a"], question=["q"], answer=["12"], answer_type=["text"])
    assert fe.normalise(df).collect()["answer_type"].to_list() == ["text"]


def test_dedup_same_image_same_normalised_question_only() -> None:
    df = _rows(sample_id=["1", "2", "3", "4"],
               question=["What is X?", "what  is x", "What is X?", "What is Y?"],
               answer=["1", "1", "1", "2"],
               image_key=["aa", "aa", "bb", "aa"])
    out = fe.dedup(df).collect()
    assert out["sample_id"].to_list() == ["1", "3", "4"]


def test_shards_are_stable_and_group_by_image() -> None:
    keys = [f"{i:064x}" for i in range(0, 2**20, 997)]
    df = _rows(sample_id=[f"s{i}" for i in range(len(keys))], question=["q"] * len(keys),
               answer=["a"] * len(keys), image_key=keys)
    a = fe.assign_shards(df, 16).collect()["shard"]
    b = fe.assign_shards(df.reverse(), 16).collect()["shard"].reverse()
    assert a.to_list() == b.to_list()
    assert a.to_list() == [int(k[:12], 16) % 16 for k in keys]
    same_image = _rows(sample_id=["x", "y"], question=["q1", "q2"], answer=["a", "b"], image_key=["ab" * 32] * 2)
    assert fe.assign_shards(same_image, 300).collect()["shard"].n_unique() == 1


def test_quota_is_seeded_per_subset_and_reproducible() -> None:
    n = 100
    df = _rows(sample_id=[f"id{i}" for i in range(n)], question=["q"] * n, answer=["a"] * n,
               subset=["s1"] * 60 + ["s2"] * 40)
    one = fe.sample_quota(df, {"s1": 10}, seed=1)
    again = fe.sample_quota(df.sample(fraction=1.0, shuffle=True, seed=3), {"s1": 10}, seed=1)
    other = fe.sample_quota(df, {"s1": 10}, seed=2)
    assert one.filter(pl.col("subset") == "s1").height == 10
    assert one.filter(pl.col("subset") == "s2").height == 40  # no quota for s2
    assert set(one["sample_id"]) == set(again["sample_id"])
    assert set(one["sample_id"]) != set(other["sample_id"])
    assert fe.sample_quota(df, 5, seed=1).group_by("subset").len()["len"].to_list() == [5, 5]


def test_sample_id_is_a_content_hash() -> None:
    a = records.sample_id("tabmwp", "33", "Is it linear?")
    assert a == records.sample_id("tabmwp", "33", "Is it linear?")
    assert a != records.sample_id("tabmwp", "34", "Is it linear?")
    assert len(a) == 24 and int(a, 16) >= 0


# ------------------------------------------------------------------------ bad input


def _png(size: tuple[int, int] = (8, 8), colour: tuple[int, int, int] = (10, 20, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` (pixel data absent): a bomb's shape."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture()
def bad_dataset(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "img").mkdir(parents=True)
    (root / "img" / "ok1.png").write_bytes(_png(colour=(1, 2, 3)))
    (root / "img" / "ok2.png").write_bytes(_png(colour=(4, 5, 6)))
    (root / "img" / "corrupt.png").write_bytes(_png()[:40])  # truncated mid-stream
    (root / "img" / "huge.png").write_bytes(_huge_png_header(20000, 20000))
    (tmp_path / "outside.png").write_bytes(_png(colour=(7, 8, 9)))
    lines = [
        {"id": "ok1", "q": "What colour is it?", "a": "dark", "img": "ok1.png"},
        {"id": "corrupt", "q": "What is shown?", "a": "x", "img": "corrupt.png"},
        {"id": "missing", "q": "What is shown?", "a": "x", "img": "nope.png"},
        {"id": "huge", "q": "What is shown?", "a": "x", "img": "huge.png"},
        {"id": "empty", "q": "   ", "a": "x", "img": "ok1.png"},
        {"id": "escape", "q": "What is shown?", "a": "x", "img": "../../outside.png"},
        {"id": "ok2", "q": "How many rows?", "a": "3", "img": "ok2.png"},
    ]
    body = b"\n".join(json.dumps(r).encode() for r in lines[:4])
    body += b"\n" + b'{"id": "latin1", "q": "caf\xe9?", "a": "x"}'  # invalid UTF-8
    body += b"\n" + b"\n".join(json.dumps(r).encode() for r in lines[4:]) + b"\n"
    (root / "qa.jsonl").write_bytes(body)
    return root


def test_bad_rows_are_quarantined_with_reasons_and_good_rows_kept(bad_dataset: Path, tmp_path: Path) -> None:
    src = QATableSource({"path": str(bad_dataset / "qa.jsonl"), "image_root": str(bad_dataset / "img"),
                         "license": "CC0-1.0", "columns": {"id": "id", "question": "q", "answer": "a", "image": "img"}})
    media = MediaStore(tmp_path / "store")
    ing = fe.ingest(src, "bad", media, ImageLimits())
    assert sorted(ing.samples["source_row_id"]) == ["ok1", "ok2"]
    reasons = dict(zip(ing.quarantine["source_row_id"], ing.quarantine["reason"], strict=True))
    assert reasons.pop("corrupt") == "corrupt_image"
    assert reasons.pop("missing") == "missing_image"
    assert reasons.pop("huge") == "image_too_large"
    assert reasons.pop("empty") == "empty_question"
    assert reasons.pop("escape") == "image_path_escape"
    ((bad_line, reason),) = reasons.items()  # the invalid UTF-8 line, named by its position
    assert reason == "bad_row" and "5" in bad_line
    detail = dict(zip(ing.quarantine["reason"], ing.quarantine["detail"], strict=True))
    assert "UTF-8" in detail["bad_row"]
    assert "20000x20000" in detail["image_too_large"] or "decompression bomb" in detail["image_too_large"]
    assert "escapes the dataset root" in detail["image_path_escape"]
    # good rows point into the content-addressed store and the bytes are there
    for row_id, refs in zip(ing.samples["source_row_id"], ing.samples["images"], strict=True):
        assert media.read(refs[0]["uri"]) == (bad_dataset / "img" / f"{row_id}.png").read_bytes()
    assert ing.counts == {"read": 8, "ok": 2, "quarantined": 6}


def test_own_pixel_limit_refuses_large_but_legal_images(tmp_path: Path) -> None:
    from mmat_assets.engine.images import ImageError, inspect_image

    data = _png((300, 300))
    assert inspect_image(data, ImageLimits()).width == 300
    with pytest.raises(ImageError) as err:
        inspect_image(data, ImageLimits(max_pixels=50_000))
    assert err.value.reason == "image_too_large" and "300x300" in str(err.value)


def test_media_store_is_content_addressed(tmp_path: Path) -> None:
    media = MediaStore(tmp_path)
    d1, u1 = media.put(b"abc", ".png")
    d2, u2 = media.put(b"abc", ".png")
    assert (d1, u1) == (d2, u2)
    assert u1.endswith(f"media/{d1[:2]}/{d1}.png") and Path(u1).read_bytes() == b"abc"
