"""Visual CoT: VQA pairs annotated with the key image region that answers them.

Reads the public release in either of its two shapes, one record per question:

* the training form (``viscot_363k.json``, a JSON list; also accepted as JSONL):
  ``{"question_id", "dataset", "split", "image": ["cot/docvqa/a.png",
  "cot/docvqa/a.png###[x1, y1, x2, y2]"], "conversations": [human question + "Please
  provide the bounding box coordinate of the region that can help you answer the question
  better.", gpt normalised box, human "<image>", gpt answer]}``. The ``###`` suffix holds
  the key region in pixels; the first gpt turn holds it again normalised to the image
  padded to a square, as the model is trained to say it.
* the metadata form (``viscot_dataset/*.jsonl`` and benchmark files):
  ``{"question", "answer", "image", "bboxs": [[x1, y1, x2, y2], ...], "dataset", "split",
  "width", "height"}`` with the image named inside its dataset's folder (``cot/<dataset>/``).

Key-region boxes go to ``meta["regions"]`` (pixels, ``[x1, y1, x2, y2]``). Licence
Apache-2.0 (the images keep their source datasets' terms).
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from mmat_assets.contracts import BadRow, ImageInput, SourceRow
from mmat_assets.hookspecs import Register, hookimpl
from mmat_assets.toolkit.jsonl import excerpt_of, iter_json_members, iter_jsonl_objects, line_id, raw_excerpt
from mmat_assets.toolkit.sources import FileSource, FileSourceOptions, guarded_records

_IMAGE_TAG = re.compile(r"\n?<image>\n?")
_COT_PROMPT = re.compile(
    r"\s*Please (?:think step by step and )?provide the bounding box coordinate of the region"
    r" that can help you answer the question better\.?", re.I)
_NUM = r"\s*(-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)\s*"
_BOX = re.compile(rf"\[{_NUM},{_NUM},{_NUM},{_NUM}\]")
#: The release stores TextCaps questions with the TextVQA images (its conversion script does).
_IMAGE_FOLDER = {"textcap": "textvqa"}

Box = list[int | float]


class _Malformed(ValueError):
    """A record that does not follow the format; becomes a BadRow with this message."""


class VisualCoTOptions(FileSourceOptions):
    path: str = Field(
        description="viscot_363k.json (a JSON list), or a JSONL file of training or metadata records.",
    )
    metadata_image_dir: str = Field(
        default="cot/{dataset}",
        description="Folder, under image_root, of metadata-form images; '{dataset}' is the record's dataset.",
    )

    @field_validator("metadata_image_dir")
    @classmethod
    def _only_dataset_field(cls, value: str) -> str:
        try:
            value.format(dataset="x")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"only the field '{{dataset}}' may appear in {value!r}: {exc}") from None
        return value


class VisualCoTSource(FileSource[VisualCoTOptions]):
    """Visual CoT questions with their key-region boxes (in meta) and a short region rationale."""

    name = "visual_cot"
    version = "1.0.0"
    license = "Apache-2.0"
    description = "Visual CoT (viscot_363k.json or metadata JSONL): VQA with key-region boxes."

    def read(self) -> Iterator[SourceRow | BadRow]:
        yield from guarded_records(self._records(), self._row)

    def _records(self) -> Iterator[tuple[str, dict[str, Any]] | BadRow]:
        """``(position id, record)`` pairs from a JSON list or a JSONL file."""
        if _starts_with(self.file, b"["):
            # The training file is one JSON list, read item by item: a bad item is that
            # item's BadRow; a syntax error is a broken file (it raises).
            for item in iter_json_members(self.file):
                if isinstance(item, BadRow):
                    yield BadRow(f"item {item.row_id}", item.reason, item.raw)
                elif isinstance(item[1], dict):
                    yield f"item {item[0]}", item[1]
                else:
                    yield BadRow(f"item {item[0]}", f"not a JSON object: {type(item[1]).__name__}",
                                 excerpt_of(item[1]))
            return
        for line in iter_jsonl_objects(self.file):
            yield line if isinstance(line, BadRow) else (line_id(line[0]), line[1])

    def _row(self, position: str, obj: dict[str, Any]) -> SourceRow | BadRow:
        row_id = _row_id(position, obj)
        try:
            if "conversations" in obj:
                return self._training_row(row_id, obj)
            if "question" in obj:
                return self._metadata_row(row_id, obj)
            raise _Malformed("neither 'conversations' nor 'question' present")
        except _Malformed as exc:
            return BadRow(row_id, str(exc), raw_excerpt(json.dumps(obj, ensure_ascii=False)))

    def _training_row(self, row_id: str, obj: dict[str, Any]) -> SourceRow:
        turns = _turns(obj["conversations"])
        paths, regions = _split_images(obj.get("image"))
        question = _IMAGE_TAG.sub("", turns[0][1]).strip()
        prompt = _COT_PROMPT.search(question)
        normalised: Box | None = None
        if prompt:  # the CoT form: question+prompt, box, <image>, answer
            question = question[:prompt.start()].strip()
            _expect_roles(turns, ("human", "gpt", "human", "gpt"))
            normalised = parse_box(turns[1][1])
            answer = turns[3][1]
        else:
            _expect_roles(turns, ("human", "gpt"))
            answer = turns[1][1]
        regions = regions or _field_boxes(obj)
        extra = {"region_normalized": normalised} if normalised else {}
        return self._make(row_id, obj, question, answer, paths, regions, extra)

    def _metadata_row(self, row_id: str, obj: dict[str, Any]) -> SourceRow:
        for key in ("answer", "image"):
            if key not in obj:
                raise _Malformed(f"missing field {key!r}")
        if not isinstance(obj["image"], str) or not isinstance(obj["question"], str):
            raise _Malformed("'question' and 'image' must be strings")
        dataset = str(obj.get("dataset") or "")
        folder = self.options.metadata_image_dir.format(dataset=_IMAGE_FOLDER.get(dataset, dataset))
        path = posixpath.join(folder, obj["image"]) if dataset and folder else obj["image"]
        return self._make(row_id, obj, obj["question"].strip(), _text(obj["answer"]), [path],
                          _field_boxes(obj), {})

    def _make(self, row_id: str, obj: dict[str, Any], question: str, answer: str,
              paths: list[str], regions: list[Box], extra: dict[str, Any]) -> SourceRow:
        meta: dict[str, Any] = {"regions": regions, **extra}
        meta.update({k: obj[k] for k in ("question_id", "split", "width", "height") if k in obj})
        return SourceRow(
            row_id=row_id,
            question=question,
            answer=answer,
            images=[ImageInput(path=p) for p in paths],
            subset=str(obj.get("dataset") or ""),
            rationale=region_rationale(regions),
            meta=meta,
        )


def _starts_with(path: Path, prefix: bytes) -> bool:
    """Whether the first non-blank bytes of the file are ``prefix`` (JSON list vs JSONL)."""
    with path.open("rb") as fh:
        head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(prefix)


def _row_id(position: str, obj: dict[str, Any]) -> str:
    """``<dataset>:<question_id>``: the release numbers questions per dataset, not globally."""
    qid = obj.get("question_id")
    if qid is None:
        return position
    return f"{obj['dataset']}:{qid}" if obj.get("dataset") else str(qid)


def _text(value: Any) -> str:
    if isinstance(value, (dict, list)):
        raise _Malformed(f"expected text, got {type(value).__name__}")
    return "" if value is None else str(value).strip()


def _turns(conversations: Any) -> list[tuple[str, str]]:
    """``(role, text)`` per turn; anything else is malformed."""
    if not isinstance(conversations, list) or not conversations:
        raise _Malformed("'conversations' is not a non-empty list")
    turns: list[tuple[str, str]] = []
    for turn in conversations:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise _Malformed("a conversation turn has no text 'value'")
        turns.append((str(turn.get("from")), turn["value"]))
    return turns


def _expect_roles(turns: list[tuple[str, str]], roles: tuple[str, ...]) -> None:
    got = tuple(role for role, _ in turns[:len(roles)])
    if got != roles:
        raise _Malformed(f"expected turns {list(roles)}, found {list(got)}")


def _split_images(field: Any) -> tuple[list[str], list[Box]]:
    """Distinct image paths and the ``###[box]`` regions attached to them."""
    entries = [field] if isinstance(field, str) else field if isinstance(field, list) else None
    if not entries or not all(isinstance(e, str) for e in entries):
        raise _Malformed("'image' is not a path or a list of paths")
    paths: list[str] = []
    regions: list[Box] = []
    for entry in entries:
        path, sep, box = entry.partition("###")
        if sep:
            regions.append(parse_box(box))
        if path not in paths:  # the region entry names the same file again
            paths.append(path)
    return paths, regions


def _field_boxes(obj: dict[str, Any]) -> list[Box]:
    """Boxes given as fields: ``bboxs`` (list of boxes) or ``bbox`` (one box or a list)."""
    value = obj.get("bboxs", obj.get("bbox"))
    if not value:
        return []
    boxes = value if isinstance(value, list) and value and isinstance(value[0], list) else [value]
    return [_box_value(b) for b in boxes]


def _box_value(value: Any) -> Box:
    if (not isinstance(value, list) or len(value) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise _Malformed(f"malformed box {value!r}: expected [x1, y1, x2, y2]")
    return list(value)


def parse_box(text: str) -> Box:
    """The first ``[x1, y1, x2, y2]`` in ``text``, ints kept as ints."""
    m = _BOX.search(text)
    if not m:
        raise _Malformed(f"no [x1, y1, x2, y2] box in {text[:80]!r}")
    return [float(g) if any(c in g for c in ".eE") else int(g) for g in m.groups()]


def region_rationale(regions: list[Box]) -> str | None:
    """A one-line rationale naming the key region(s), or None when there is none."""
    if not regions:
        return None
    boxes = " and ".join(_fmt_box(b) for b in regions)
    noun = "region is" if len(regions) == 1 else "regions are"
    return f"The key {noun} {boxes} (pixel coordinates x1, y1, x2, y2)."


def _fmt_box(box: Box) -> str:
    return "[" + ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in box) + "]"


@hookimpl
def register_sources(register: Register) -> None:
    register(VisualCoTSource)
