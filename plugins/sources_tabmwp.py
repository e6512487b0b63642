"""TabMWP: math word problems over table images (``problems.json`` + ``tables/{id}.png``).

Public format of the TabMWP authors' repository: a JSON object keyed by problem id, each
with question, choices, answer, unit, table text, gold ``solution``, ques_type, ans_type,
grade and split. Licence CC BY-NC-SA 4.0 (non-commercial).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import Field

from mmat_assets.contracts import BadRow, ImageInput, SourceRow
from mmat_assets.hookspecs import Register, hookimpl
from mmat_assets.toolkit.jsonl import excerpt_of, iter_json_members
from mmat_assets.toolkit.sources import PathSource, PathSourceOptions, guarded_records

ANSWER_TYPES = {
    "integer_number": "number",
    "decimal_number": "number",
    "extractive_text": "text",
    "boolean_text": "text",
    "other_text": "text",
}


class TabMWPOptions(PathSourceOptions):
    path: str = Field(description="Directory holding problems.json and tables/.")
    problems_file: str = Field(default="problems.json", description="Problems JSON, relative to path.")
    tables_dir: str = Field(default="tables", description="Table images directory, relative to path.")
    split: str | None = Field(default=None, description="Keep only problems of this split.")


class TabMWPSource(PathSource[TabMWPOptions]):
    """TabMWP problems with their rendered table images and gold solutions."""

    name = "tabmwp"
    version = "1.0.0"
    license = "CC BY-NC-SA 4.0"
    description = "TabMWP math word problems over table images (problems.json + tables/)."
    ground_truth_meta = ("table",)  # the table's text is what the image shows

    def image_root(self) -> Path:
        return self.root / self.options.tables_dir

    def read(self) -> Iterator[SourceRow | BadRow]:
        yield from guarded_records(self._problems(), self._row)

    def _problems(self) -> Iterator[tuple[str, dict[str, Any]] | BadRow]:
        # Parsed problem by problem: one bad value costs that problem, not the file.
        for item in iter_json_members(self.root / self.options.problems_file):
            if isinstance(item, BadRow):
                yield item
            elif not isinstance(item[1], dict):
                yield BadRow(item[0], "problem is not a JSON object", excerpt_of(item[1]))
            elif not self.options.split or item[1].get("split") == self.options.split:
                yield item

    def _row(self, pid: str, p: dict) -> SourceRow | BadRow:
        choices = p.get("choices")
        if choices is not None and not isinstance(choices, list):
            return BadRow(pid, f"'choices' is not a list: {type(choices).__name__}", excerpt_of(p))
        return SourceRow(
            row_id=pid,
            question=str(p.get("question") or ""),
            answer=str(p.get("answer") if p.get("answer") is not None else ""),
            images=[ImageInput(path=f"{pid}.png")],
            subset=f"grade_{p['grade']}" if p.get("grade") is not None else "",
            choices=[str(c) for c in (choices or [])],
            rationale=p.get("solution"),
            answer_type=ANSWER_TYPES.get(str(p.get("ans_type"))),
            meta={k: p.get(k) for k in ("table", "table_title", "unit", "ques_type", "ans_type",
                                        "grade", "split")},
        )


@hookimpl
def register_sources(register: Register) -> None:
    register(TabMWPSource)
