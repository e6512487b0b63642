"""Test doubles for the stage engine: scripted teachers and tools (tests only)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import polars as pl
from PIL import Image

from mmat_assets import records
from mmat_assets.contracts import CLAIM_VERBS, Teacher, TeacherError, TeacherReply, TeacherRequest, Tool, ToolResult
from mmat_assets.engine.cache import ResultCache
from mmat_assets.engine.rationale import Environment, StageSettings


class ScriptedTeacher(Teacher):
    """Answers step requests from ``script(context) -> dict | str | Exception`` and judge
    requests from ``judge(check) -> dict | Exception``; counts every call it really makes."""

    name = "scripted"
    model = "scripted-1"

    def __init__(self, script: Callable[[dict[str, Any]], Any], judge: Callable[[str], Any] | None = None) -> None:
        super().__init__()
        self.script, self.judge = script, judge
        self.calls: list[TeacherRequest] = []

    def complete(self, request: TeacherRequest) -> TeacherReply:
        self.calls.append(request)
        if request.kind in ("judge", "score"):
            if self.judge is None:
                raise TeacherError("unsupported", "no judge")
            out = self.judge(request.context.get("check", request.kind))
        else:
            out = self.script(request.context)
        if isinstance(out, Exception):
            raise out
        return TeacherReply(out if isinstance(out, str) else json.dumps(out), 10, 5, 0.001, self.model)


class EchoTool(Tool):
    """A tool that returns fixed text (or raises), for structure tests; it stands in for
    OCR, claim phrasing included."""

    name = "ocr"
    version = "test"
    claim_patterns = (rf"\bOCR {CLAIM_VERBS}\b",)

    def __init__(self, text: str = "a | 12\nb | 5", fail: bool = False) -> None:
        super().__init__()
        self.text, self.fail, self.runs = text, fail, 0

    def run(self, image: Path, args: Mapping[str, Any]) -> ToolResult:
        self.runs += 1
        if self.fail:
            raise RuntimeError("tool exploded")
        return ToolResult(self.text, {"n": 1}, 0.001)


def step(thought: str, ops: list[str] | None = None, final: bool = False, rag: str | None = None) -> dict[str, Any]:
    return {"thought": thought, "operators": ops or [], "rag": {"needed": rag is not None, "query": rag},
            "next_action": "final_answer" if final else "continue"}


def samples(tmp: Path, rows: list[dict[str, Any]]) -> pl.DataFrame:
    """Foundation-shaped rows with a real image each."""
    img = tmp / "img.png"
    Image.new("RGB", (16, 16), "white").save(img)
    out = []
    for i, r in enumerate(rows):
        base = {c: None for c in records.FOUNDATION_COLUMNS}
        base.update(sample_id=f"{i:024x}", source="t", dataset="tabmwp", subset="s", source_row_id=str(i),
                    license="CC0-1.0", images=[{"sha256": "ab" * 32, "uri": str(img), "width": 16, "height": 16}],
                    image_key="ab" * 32, choices=[], answer_type="number", style="Answer briefly.",
                    meta="{}", shard=0)
        base.update(r)
        out.append(base)
    return pl.DataFrame(out, schema=records.FOUNDATION_COLUMNS)


def environment(teacher: Teacher, tools: dict[str, Tool], tmp: Path, **settings: Any) -> Environment:
    cache = lambda ns: ResultCache(None, ns, 0, work_dir=tmp / "cache")  # noqa: E731
    return Environment(teacher, teacher.name, tools, None, cache("tools"), cache("retrieval"), cache("teacher"),
                       lambda uri: Path(uri), StageSettings(**settings))
