"""The Cauldron (HuggingFaceM4/the_cauldron): 50 VQA/doc/chart sets in one Parquet layout.

Public format of the release: one directory per subset (``ai2d/``, ``chartqa/``, ...)
holding Parquet shards with two list columns, ``images`` (``struct{bytes, path}``, the
encoded image files) and ``texts`` (``struct{user, assistant, source}``, the turns about
those images). Every turn becomes one row carrying all of its row's images as bytes.

Licence: the collection is released under CC-BY-4.0, but each subset keeps the licence of
the dataset it was converted from; set those per subset with the ``licenses`` option.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from mmat_assets.contracts import BadRow, ImageInput, SourceRow
from mmat_assets.hookspecs import Register, hookimpl
from mmat_assets.toolkit.jsonl import guarded_rows, raw_excerpt
from mmat_assets.toolkit.sources import PathSource, PathSourceOptions

COLUMNS = ("images", "texts")
#: Rows per Parquet batch: shards run to 500 MB of image bytes, so read a slice at a time.
BATCH_ROWS = 64
#: Directory names that are splits, not subsets (the auto-converted layout is subset/train/).
SPLIT_DIRS = {"train", "test", "validation", "val"}


class CauldronOptions(PathSourceOptions):
    path: str = Field(description="A Parquet shard, or a directory searched recursively for *.parquet.")
    subset: str | None = Field(
        default=None,
        description="Subset name for every row; by default the shard's directory name (ai2d, chartqa, ...).",
    )
    license: str = Field(
        default="CC-BY-4.0",
        description="Licence of rows whose subset is not in 'licenses' (the collection's own).",
    )
    licenses: dict[str, str] = Field(
        default_factory=dict,
        description="Subset -> licence; subsets keep the licence of their original dataset.",
    )


class CauldronSource(PathSource[CauldronOptions]):
    """The Cauldron's Parquet shards: one row per user/assistant turn, images as bytes."""

    name = "cauldron"
    dataset = "the_cauldron"
    version = "1.0.0"
    license = "CC-BY-4.0"
    description = "The Cauldron Parquet shards (images + user/assistant texts), per-subset licences."

    def shards(self) -> list[Path]:
        """The Parquet files to read, in a stable order; a missing path raises."""
        root = self.root
        if root.is_file():
            return [root]
        if not root.is_dir():
            raise FileNotFoundError(f"no Parquet file or directory at {root}")
        found = sorted(root.rglob("*.parquet"))
        if not found:
            raise FileNotFoundError(f"no *.parquet files under {root}")
        return found

    def read(self) -> Iterator[SourceRow | BadRow]:
        for shard in self.shards():
            yield from self._read_shard(shard)

    def _read_shard(self, shard: Path) -> Iterator[SourceRow | BadRow]:
        rel = self._rel(shard)
        subset = self.options.subset or subset_of(shard)
        license_ = self.options.licenses.get(subset) or self.row_license()
        i = 0
        try:
            pf = pq.ParquetFile(shard)
            missing = [c for c in COLUMNS if c not in pf.schema_arrow.names]
            if missing:
                yield BadRow(rel, f"not a Cauldron shard: missing column(s) {missing}")
                return
            for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=list(COLUMNS)):
                for record in batch.to_pylist():
                    row_id = f"{rel}:{i}"
                    yield from guarded_rows(row_id, _summary(record),
                                            lambda: _rows(row_id, record, subset, license_, rel, i))
                    i += 1
        except (pa.ArrowException, OSError) as exc:
            # One corrupt shard should not hide the other shards of the directory.
            yield BadRow(f"{rel}:{i}", f"unreadable Parquet shard after {i} rows: {exc}")

    def _rel(self, shard: Path) -> str:
        root = self.root
        return shard.name if root.is_file() else shard.relative_to(root).as_posix()


def subset_of(shard: Path) -> str:
    """Subset named by the shard's directory, skipping a split directory (``train/``)."""
    parent = shard.parent
    if parent.name.lower() in SPLIT_DIRS and parent.parent.name:
        parent = parent.parent
    return parent.name


def _rows(row_id: str, record: dict[str, Any], subset: str, license_: str, shard: str,
          index: int) -> Iterator[SourceRow | BadRow]:
    images, problem = _images(record.get("images"))
    texts: Any = record.get("texts")
    if problem is None and (not isinstance(texts, list) or not texts):
        problem = "'texts' is not a non-empty list"
    if problem is not None:
        yield BadRow(row_id, problem, _raw(record))
        return
    for k, turn in enumerate(texts):
        turn_id = f"{row_id}#{k}"
        if (not isinstance(turn, dict) or not isinstance(turn.get("user"), str)
                or not isinstance(turn.get("assistant"), str)):
            yield BadRow(turn_id, "text turn lacks string 'user' and 'assistant'", _raw(record))
            continue
        yield SourceRow(
            row_id=turn_id,
            question=turn["user"],
            answer=turn["assistant"],
            images=images,
            subset=subset,
            license=license_,
            meta={"source": turn.get("source"), "shard": shard, "row": index, "turn": k},
        )


def _images(value: Any) -> tuple[list[ImageInput], str | None]:
    """Images of a row as bytes, or the reason they cannot be used."""
    if not isinstance(value, list):
        return [], "'images' is not a list"
    images: list[ImageInput] = []
    for j, img in enumerate(value):
        data = img.get("bytes") if isinstance(img, dict) else None
        if not isinstance(data, bytes) or not data:
            return [], f"image {j} has no encoded bytes"
        images.append(ImageInput(data=data))
    return images, None


def _summary(record: Any) -> dict[str, Any]:
    """The row's texts and image count: never the image bytes."""
    images = record.get("images") if isinstance(record, dict) else None
    return {"texts": record.get("texts") if isinstance(record, dict) else repr(record)[:200],
            "images": len(images) if isinstance(images, list) else repr(images)[:80]}


def _raw(record: dict[str, Any]) -> str:
    """The row's summary for the quarantine table."""
    return raw_excerpt(json.dumps(_summary(record), ensure_ascii=False, default=repr))


@hookimpl
def register_sources(register: Register) -> None:
    register(CauldronSource)
