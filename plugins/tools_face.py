"""``face_detection``: YuNet face detection through ``yuface`` (weights compiled in, 1 MB).

The paper used deepface; YuNet is a small, accurate detector that runs in milliseconds on
a CPU with no model download. YuNet loses accuracy above ~960 px, so larger images are
scaled down for detection and the boxes scaled back to the original pixels.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mmat_assets.contracts import CLAIM_VERBS, Availability, Tool, ToolResult
from mmat_assets.hookspecs import Register, hookimpl
from mmat_assets.toolkit.images import open_rgb

#: Images smaller than this on either side hold no detectable face; skip the detector.
MIN_SIDE = 16


class FaceOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    confidence: float = Field(default=0.5, ge=0.0, le=1.0,
                              description="Minimum detector confidence of a face.")
    detect_side: int = Field(default=960, ge=64,
                             description="Longest side the detector sees; larger images are "
                             "scaled down for detection (YuNet degrades above ~960 px).")


class FaceDetectionTool(Tool[FaceOptions]):
    """Counts faces and gives their pixel boxes, in the paper's phrasing."""

    name = "face_detection"
    version = "1.0.0"
    description = (
        "Detects human faces and returns how many there are with their pixel boxes "
        "[x1, y1, x2, y2]. Use it for questions about people: how many, who is where."
    )
    claim_patterns = (r"\bfaces? (?:detected|found)\b", rf"\bface detection {CLAIM_VERBS}\b")

    def availability(self) -> Availability:
        if importlib.util.find_spec("yuface") is None:
            return Availability(False, "python package 'yuface' is not installed")
        return Availability(True)

    def run(self, image: Path, args: Mapping[str, Any]) -> ToolResult:
        start = time.perf_counter()
        try:
            faces = self.detect(image)
        except Exception as exc:
            return ToolResult("", error=f"{type(exc).__name__}: {exc}",
                              latency_s=time.perf_counter() - start)
        boxes = [f["box"] for f in faces]
        data = {"count": len(faces), "boxes": boxes, "scores": [f["score"] for f in faces]}
        return ToolResult(face_text(boxes), data, latency_s=time.perf_counter() - start)

    def detect(self, image: Path) -> list[dict[str, Any]]:
        """Faces as ``{"box": [x1, y1, x2, y2], "score": s}`` in original pixels, left to right."""
        import numpy as np
        import yuface

        img = open_rgb(image)
        width, height = img.size
        if min(width, height) < MIN_SIDE:
            return []
        scale = min(1.0, self.options.detect_side / max(width, height))
        if scale < 1.0:
            img = img.resize((max(1, round(width * scale)), max(1, round(height * scale))))
        # yuface wants contiguous BGR; a strided view gives different (worse) detections.
        bgr = np.ascontiguousarray(np.asarray(img)[:, :, ::-1])
        confs, boxes, _ = yuface.detect(bgr, conf=self.options.confidence)
        faces = [_face(box, conf, scale, width, height)
                 for box, conf in zip(boxes, confs, strict=True)]
        return sorted(faces, key=lambda f: f["box"][0])


def _face(box: Any, conf: Any, scale: float, width: int, height: int) -> dict[str, Any]:
    x, y, w, h = (float(v) / scale for v in box)
    x1, y1 = max(0.0, x), max(0.0, y)
    x2, y2 = min(float(width), x + w), min(float(height), y + h)
    return {"box": [round(x1, 1), round(y1, 1), round(x2, 1), round(y2, 1)],
            "score": round(float(conf) / 100.0, 3)}


def face_text(boxes: list[list[float]]) -> str:
    """The paper's phrasing: 'There is one face with a coordinate: [...]' and so on."""
    if not boxes:
        return "There is no face in the image."
    if len(boxes) == 1:
        return f"There is one face with a coordinate: {_fmt(boxes[0])}"
    return f"There are {len(boxes)} faces with coordinates: " + ", ".join(_fmt(b) for b in boxes)


def _fmt(box: list[float]) -> str:
    return "[" + ", ".join(f"{float(v):.1f}" for v in box) + "]"


@hookimpl
def register_tools(register: Register) -> None:
    register(FaceDetectionTool)
