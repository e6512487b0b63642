"""One plugin of every role written against its base class alone: only the abstract
methods, no optional ones, no host internals. ``tests/test_contracts.py`` builds with them.

It is a real module so that a child process (the trainer runs out of process) can load it.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from mmat_assets.contracts import (Benchmark, BenchmarkItem, Exporter, ImageInput, Judge, Passage, Retriever, Source,
                                   SourceRow, Teacher, TeacherReply, TeacherRequest, Tool, ToolResult, Trainer)
from mmat_assets.hookspecs import Register, hookimpl


def _png(colour: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), colour).save(buf, format="PNG")
    return buf.getvalue()


class PlainSource(Source):
    name = "plain_source"
    license = "CC0-1.0"  # rows without a licence fail the foundation's licence check

    def read(self) -> Iterator[SourceRow]:
        for i, colour in enumerate(("red", "blue")):
            yield SourceRow(f"p{i}", f"What is {20 + i} + 3?", str(23 + i), [ImageInput(data=_png(colour))],
                            answer_type="number")


class PlainTool(Tool):
    name = "plain_tool"
    description = "Says how wide the image is."

    def run(self, image: Path, args: Mapping[str, Any]) -> ToolResult:
        with Image.open(image) as img:
            return ToolResult(f"The image is {img.width} pixels wide.")


class PlainRetriever(Retriever):
    name = "plain_search"

    def search(self, query: str, k: int = 3) -> list[Passage]:
        return [Passage(f"A passage about {query}.", title="Plain")][:k]


class PlainTeacher(Teacher):
    """Step 1 calls the plain tool and searches; step 2 concludes."""

    name = "plain_teacher"

    def complete(self, request: TeacherRequest) -> TeacherReply:
        ctx = request.context
        if request.kind != "step":
            return TeacherReply(json.dumps({}))  # a sound verdict for any judge request
        if not ctx["steps"]:
            step = {"thought": "I look at the image and search first.", "operators": ["plain_tool"],
                    "rag": {"needed": True, "query": "sums"}, "next_action": "continue"}
        else:
            step = {"thought": f"So the answer is {ctx['answer']}.", "operators": [],
                    "rag": {"needed": False, "query": None}, "next_action": "final_answer"}
        return TeacherReply(json.dumps(step))


class PlainJudge(Judge):
    name = "plain_judge"

    def score(self, sample: Mapping[str, Any]) -> tuple[float, str]:
        return 0.5 + 0.1 * len(sample["turns"]) / 100, f"{len(sample['turns'])} turns"


class PlainExporter(Exporter):
    name = "plain_export"

    def export(self, records: Mapping[str, list[Any]], out_dir: Path, context: Mapping[str, Any]) -> dict[str, Any]:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "rr.json"
        path.write_text(json.dumps([r.messages for r in records.get("rr", [])]), encoding="utf-8")
        return {"rr": str(path)}


class PlainTrainer(Trainer):
    name = "plain_trainer"

    def train(self, export_dir: Path, out_dir: Path) -> dict[str, Any]:
        n = len((Path(export_dir) / "train.jsonl").read_text(encoding="utf-8").splitlines())
        out_dir.mkdir(parents=True, exist_ok=True)
        return {"checkpoint": str(out_dir), "steps": n}  # no loss: the metrics are the trainer's own


class PlainBenchmark(Benchmark):
    name = "plain_bench"

    def items(self) -> Iterator[BenchmarkItem]:
        yield BenchmarkItem("b0", "What is 2 + 40?", ["40"], ImageInput(data=_png("green")))
        yield BenchmarkItem("b1", "What is 1 + 1?", ["7"], ImageInput(data=_png("green")))


@hookimpl
def register_sources(register: Register) -> None:
    register(PlainSource)


@hookimpl
def register_tools(register: Register) -> None:
    register(PlainTool)


@hookimpl
def register_retrievers(register: Register) -> None:
    register(PlainRetriever)


@hookimpl
def register_teachers(register: Register) -> None:
    register(PlainTeacher)


@hookimpl
def register_judges(register: Register) -> None:
    register(PlainJudge)


@hookimpl
def register_exporters(register: Register) -> None:
    register(PlainExporter)


@hookimpl
def register_trainers(register: Register) -> None:
    register(PlainTrainer)


@hookimpl
def register_benchmarks(register: Register) -> None:
    register(PlainBenchmark)
