"""LLaVA-CoT (LLaVA-o1-100k): VQA pairs with staged reasoning, read from ``train.jsonl``.

Public format of the LLaVA-CoT-100k release: one JSON object per line,
``{"id", "image": "<subset>/.../x.jpg", "conversations": [{"from": "human", ...},
{"from": "gpt", ...}, ...]}``. Each gpt turn holds four tagged stages,
``<SUMMARY>``, ``<CAPTION>``, ``<REASONING>`` and ``<CONCLUSION>``. Images sit under one
directory, in a sub-directory per source dataset (``chartqa/``, ``sqa/``, ``ai2d/``,
``geoqa+/``, ...). Licence Apache-2.0 (the images keep their source datasets' terms).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from pydantic import Field

from mmat_assets.contracts import BadRow, ImageInput, SourceRow
from mmat_assets.hookspecs import Register, hookimpl
from mmat_assets.toolkit.jsonl import iter_jsonl_objects, line_id, raw_excerpt
from mmat_assets.toolkit.sources import FileSource, FileSourceOptions, guarded_records

_IMAGE_TAG = re.compile(r"\n?<image>\n?")
_STAGE = re.compile(r"<(SUMMARY|CAPTION|REASONING|CONCLUSION)>(.*?)</\1>", re.S | re.I)
#: Stages that make up the rationale, in order, with the label each gets in it.
RATIONALE_STAGES = (("SUMMARY", "Summary"), ("CAPTION", "Caption"), ("REASONING", "Reasoning"))

_CHOICES_HEADER = re.compile(r"^[ \t]*(?:Options|Choices)[ \t]*:[ \t]*(.*)$", re.I | re.M)
_CHOICE_LINE = re.compile(r"^\s*\(?([A-Z])[.):]\)?\s+(.*\S)\s*$")
_CHOICE_INLINE = re.compile(r"(?:^|[,;]?\s+)\(?([A-Z])[.)]\s+")


class LlavaCoTOptions(FileSourceOptions):
    path: str = Field(description="The train.jsonl file (one conversation per line).")


class LlavaCoTSource(FileSource[LlavaCoTOptions]):
    """LLaVA-CoT conversations: one row per human/gpt pair, staged reasoning as rationale."""

    name = "llava_cot"
    version = "1.0.0"
    license = "Apache-2.0"
    description = "LLaVA-CoT-100k train.jsonl: VQA with SUMMARY/CAPTION/REASONING/CONCLUSION stages."

    def read(self) -> Iterator[SourceRow | BadRow]:
        yield from guarded_records(iter_jsonl_objects(self.file), self._rows, line_id)

    def _rows(self, n: int, obj: dict[str, Any]) -> Iterator[SourceRow | BadRow]:
        base_id = str(obj["id"]) if obj.get("id") is not None else line_id(n)
        raw = raw_excerpt(json.dumps(obj, ensure_ascii=False))
        turns = obj.get("conversations")
        if not isinstance(turns, list) or not turns:
            yield BadRow(base_id, "missing or empty 'conversations' list", raw)
            return
        image = obj.get("image")
        if image is not None and not isinstance(image, str):
            yield BadRow(base_id, f"'image' is not a path string: {type(image).__name__}", raw)
            return
        for k in range(0, len(turns), 2):
            row_id = f"{base_id}#{k // 2}"
            pair = turns[k:k + 2]
            problem = _pair_problem(pair)
            if problem:
                yield BadRow(row_id, problem, raw)
            else:
                yield self._row(row_id, image, pair[0]["value"], pair[1]["value"], raw)

    def _row(self, row_id: str, image: str | None, human: str, gpt: str,
             raw: str) -> SourceRow | BadRow:
        stages = parse_stages(gpt)
        if "CONCLUSION" not in stages:
            return BadRow(row_id, "gpt turn has no <CONCLUSION> stage", raw)
        question = strip_image_tag(human)
        return SourceRow(
            row_id=row_id,
            question=question,
            answer=stages["CONCLUSION"],
            images=[ImageInput(path=image)] if image else [],
            subset=image_subset(image),
            choices=parse_choices(question),
            rationale=staged_rationale(stages),
            meta={"image": image},
        )


def _pair_problem(pair: list[Any]) -> str | None:
    """Why a slice of turns is not a usable human/gpt pair (None when it is)."""
    if len(pair) < 2:
        return "human turn without a gpt reply"
    for turn, role in zip(pair, ("human", "gpt"), strict=True):
        if not isinstance(turn, dict) or turn.get("from") != role:
            return f"expected a {role!r} turn"
        if not isinstance(turn.get("value"), str):
            return f"{role} turn has no text 'value'"
    return None


def strip_image_tag(text: str) -> str:
    """The human text without the ``<image>`` placeholder LLaVA-style data carries."""
    return _IMAGE_TAG.sub("", text).strip()


def parse_stages(text: str) -> dict[str, str]:
    """Tagged stages of a gpt turn, by upper-case tag name (first occurrence wins)."""
    stages: dict[str, str] = {}
    for tag, body in _STAGE.findall(text):
        stages.setdefault(tag.upper(), body.strip())
    return stages


def staged_rationale(stages: dict[str, str]) -> str | None:
    """Summary, caption and reasoning joined with readable stage labels."""
    parts = [f"{label}: {stages[tag]}" for tag, label in RATIONALE_STAGES if stages.get(tag)]
    return "\n\n".join(parts) or None


def image_subset(image: str | None) -> str:
    """First path component of the image path: the source dataset (``chartqa``, ``sqa``...)."""
    if not image:
        return ""
    return image.replace("\\", "/").lstrip("/").split("/", 1)[0]


def parse_choices(question: str) -> list[str]:
    """Options listed after an ``Options:``/``Choices:`` header, as ``A. foo`` or ``(A) foo``.

    Accepts one option per line or all on the header line (``A. x, B. y``); letters must
    run A, B, C... so a stray ``B.`` inside text is not taken for an option.
    """
    header = _CHOICES_HEADER.search(question)
    if not header:
        return []
    inline = header.group(1).strip()
    found = _inline_choices(inline) if inline else _line_choices(question[header.end():])
    letters = [letter for letter, _ in found]
    if not found or letters != [chr(ord("A") + i) for i in range(len(found))]:
        return []
    return [text for _, text in found]


def _line_choices(body: str) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for line in body.strip("\n").splitlines():
        m = _CHOICE_LINE.match(line)
        if not m:
            break  # the option block ends at the first line that is not an option
        found.append((m.group(1), m.group(2).strip()))
    return found


def _inline_choices(text: str) -> list[tuple[str, str]]:
    parts = _CHOICE_INLINE.split(text)
    if parts[0].strip():  # text before the first letter: not an option list
        return []
    return [(parts[i], parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2)]


@hookimpl
def register_sources(register: Register) -> None:
    register(LlavaCoTSource)
