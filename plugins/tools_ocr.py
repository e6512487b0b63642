"""``ocr``: PP-OCR text recognition through ``rapidocr`` (ONNX models inside the wheel).

The paper's OCR operator is PaddleOCR; rapidocr runs the same PP-OCR detector and
recogniser on onnxruntime, offline and without torch. The text is flattened in reading
order: boxes are grouped into lines top to bottom, each line read left to right, so a
table reads row by row.
"""

from __future__ import annotations

import importlib.util
from itertools import pairwise
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mmat_assets.contracts import CLAIM_VERBS, Availability, Tool, ToolResult
from mmat_assets.hookspecs import Register, hookimpl
from mmat_assets.toolkit.cpu import cpu_threads
from mmat_assets.toolkit.images import open_rgb


class OcrOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_score: float = Field(
        default=0.5, ge=0.0, le=1.0,
        description="Recognised text below this confidence is dropped from the text.",
    )
    column_gap: float = Field(
        default=0.8, gt=0.0,
        description="A horizontal gap wider than this many line heights separates two "
        "cells of a line with ' | ' instead of a space.",
    )
    max_side: int = Field(
        default=4096, ge=32,
        description="Larger images are scaled down first (bounds time and memory).",
    )


class OcrTool(Tool[OcrOptions]):
    """PP-OCR text recognition; the text in reading order, boxes and scores in data."""

    name = "ocr"
    version = "1.0.0"
    description = (
        "Reads the text in the image (PP-OCR) and returns it in reading order, line by "
        "line; table rows come out as rows with cells separated by ' | '. Use it for "
        "documents, tables, charts, signs and any question about written text or numbers."
    )
    claim_patterns = (rf"\bOCR {CLAIM_VERBS}\b",)

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self._engine: Any = None
        self._lock = threading.Lock()

    def availability(self) -> Availability:
        for module in ("rapidocr", "onnxruntime"):
            if importlib.util.find_spec(module) is None:
                return Availability(False, f"python package {module!r} is not installed")
        return Availability(True)

    def engine(self) -> Any:
        """The rapidocr pipeline, loaded once per tool instance (models take ~1 s)."""
        if self._engine is None:
            with self._lock:
                if self._engine is None:
                    from rapidocr import RapidOCR

                    self._engine = RapidOCR(params=engine_params())
        return self._engine

    def run(self, image: Path, args: Mapping[str, Any]) -> ToolResult:
        start = time.perf_counter()
        try:
            return self._run(image, start)
        except Exception as exc:
            return ToolResult("", error=f"{type(exc).__name__}: {exc}",
                              latency_s=time.perf_counter() - start)

    def _run(self, image: Path, start: float) -> ToolResult:
        import numpy as np

        img = open_rgb(image, max_side=self.options.max_side)
        bgr = np.ascontiguousarray(np.asarray(img)[:, :, ::-1])
        engine = self.engine()
        with self._lock:  # the rapidocr pipeline object is not documented as thread-safe
            out = engine(bgr)
        items = _items(out.boxes, out.txts, out.scores, self.options.min_score)
        text = flatten(items, self.options.column_gap)
        data = {"lines": [[i["text"] for i in line] for line in reading_lines(items)],
                "boxes": [i["box"] for i in items], "texts": [i["text"] for i in items],
                "scores": [i["score"] for i in items], "size": list(img.size)}
        return ToolResult(text, data, latency_s=time.perf_counter() - start)


def engine_params() -> dict[str, Any]:
    """rapidocr's settings: a quiet log (its INFO log prints model paths on every load) and,
    where this process is limited to some threads (a build's worker, a CPU quota), onnxruntime's pools
    sized to them instead of one thread per core."""
    params: dict[str, Any] = {"Global.log_level": "warning"}
    threads = cpu_threads()
    if threads:
        params["EngineConfig.onnxruntime.intra_op_num_threads"] = threads
    return params


def _items(boxes: Any, texts: Sequence[str] | None, scores: Sequence[float] | None,
           min_score: float) -> list[dict[str, Any]]:
    """Recognised snippets above ``min_score`` as dicts with an axis-aligned box."""
    if boxes is None or texts is None:
        return []  # rapidocr returns None fields when it found no text
    out = []
    for poly, text, score in zip(boxes, texts, scores or [1.0] * len(texts), strict=True):
        if float(score) < min_score or not str(text).strip():
            continue
        xs = [float(p[0]) for p in poly]
        ys = [float(p[1]) for p in poly]
        out.append({"text": str(text).strip(), "score": round(float(score), 4),
                    "box": [min(xs), min(ys), max(xs), max(ys)]})
    return out


def reading_lines(items: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Group boxes into lines (top to bottom), each sorted left to right.

    A box joins the current line when its vertical centre lies within half a line height
    of the line's centre: rows of a table, words of a sentence.
    """
    lines: list[list[dict[str, Any]]] = []
    for item in sorted(items, key=lambda i: (i["box"][1] + i["box"][3]) / 2):
        centre = (item["box"][1] + item["box"][3]) / 2
        if lines and abs(centre - _centre(lines[-1])) <= 0.5 * _height(lines[-1]):
            lines[-1].append(item)
        else:
            lines.append([item])
    return [sorted(line, key=lambda i: i["box"][0]) for line in lines]


def _centre(line: list[dict[str, Any]]) -> float:
    return sum((i["box"][1] + i["box"][3]) / 2 for i in line) / len(line)


def _height(line: list[dict[str, Any]]) -> float:
    return max(1.0, sum(i["box"][3] - i["box"][1] for i in line) / len(line))


def flatten(items: list[dict[str, Any]], column_gap: float = 0.8) -> str:
    """The text in reading order: one line per row, wide gaps shown as ' | '."""
    rows = []
    for line in reading_lines(items):
        height = _height(line)
        parts = [line[0]["text"]]
        for prev, cur in pairwise(line):
            gap = cur["box"][0] - prev["box"][2]
            parts.append((" | " if gap > column_gap * height else " ") + cur["text"])
        rows.append("".join(parts))
    return "\n".join(rows)


@hookimpl
def register_tools(register: Register) -> None:
    register(OcrTool)
