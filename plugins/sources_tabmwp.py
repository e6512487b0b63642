"""TabMWP: math word problems over table images (``problems.json`` + ``tables/{id}.png``).

Public format of the TabMWP authors' repository: a JSON object keyed by problem id, each
with question, choices, answer, unit, table text, gold ``solution``, ques_type, ans_type,
grade and split. Licence CC BY-NC-SA 4.0 (non-commercial).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from mmat_assets.contracts import BadRow, ImageInput, Source, SourceRow
from mmat_assets.hookspecs import Register, hookimpl

ANSWER_TYPES = {
    "integer_number": "number",
    "decimal_number": "number",
    "extractive_text": "text",
    "boolean_text": "text",
    "other_text": "text",
}


class TabMWPOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="Directory holding problems.json and tables/.")
    problems_file: str = Field(default="problems.json", description="Problems JSON, relative to path.")
    tables_dir: str = Field(default="tables", description="Table images directory, relative to path.")
    split: str | None = Field(default=None, description="Keep only problems of this split.")
    license: str = Field(default="CC BY-NC-SA 4.0", description="Licence carried by every row.")


class TabMWPSource(Source):
    """TabMWP problems with their rendered table images and gold solutions."""

    name = "tabmwp"
    dataset = "tabmwp"
    version = "1.0.0"
    license = "CC BY-NC-SA 4.0"
    description = "TabMWP math word problems over table images (problems.json + tables/)."
    Options = TabMWPOptions

    @property
    def root(self) -> Path:
        return self.resolve_path(self.options.path)

    def image_root(self) -> Path:
        return self.root / self.options.tables_dir

    def read(self) -> Iterator[SourceRow | BadRow]:
        problems = json.loads((self.root / self.options.problems_file).read_text(encoding="utf-8"))
        for pid, p in problems.items():
            if not isinstance(p, dict):
                yield BadRow(str(pid), "problem is not a JSON object", json.dumps(p)[:2000])
                continue
            if self.options.split and p.get("split") != self.options.split:
                continue
            yield self._row(str(pid), p)

    def _row(self, pid: str, p: dict) -> SourceRow:
        return SourceRow(
            row_id=pid,
            question=str(p.get("question") or ""),
            answer=str(p.get("answer") if p.get("answer") is not None else ""),
            images=[ImageInput(path=f"{pid}.png")],
            subset=f"grade_{p['grade']}" if p.get("grade") is not None else "",
            choices=[str(c) for c in (p.get("choices") or [])],
            rationale=p.get("solution"),
            answer_type=ANSWER_TYPES.get(str(p.get("ans_type"))),
            meta={k: p.get(k) for k in ("table", "table_title", "unit", "ques_type", "ans_type",
                                        "grade", "split")},
        )


@hookimpl
def register_sources(register: Register) -> None:
    register(TabMWPSource)
