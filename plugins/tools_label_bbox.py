"""``label_bbox``: open-vocabulary detection with an OWL-ViT / OWLv2 model (transformers).

The paper prompts Grounding DINO with object names; OWLv2 is the open-vocabulary
detector of the same kind that transformers runs on a CPU. No package ships its weights,
so the tool needs a model that is already on this machine: a local directory
(``save_pretrained`` output) or a hub id already in the local Hugging Face cache. It never
downloads: without such a model it reports itself unavailable with the reason.
"""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mmat_assets.contracts import CLAIM_VERBS, Availability, Tool, ToolResult
from mmat_assets.hookspecs import Register, hookimpl
from mmat_assets.toolkit.images import open_rgb

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


class LabelBboxOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(
        default="google/owlv2-base-patch16-ensemble",
        description="OWLv2 / OWL-ViT model: a local directory, or a hub id already in the "
        "local Hugging Face cache (never downloaded).",
    )
    threshold: float = Field(default=0.1, ge=0.0, le=1.0,
                             description="Minimum detection score of a box.")
    nms_iou: float = Field(default=0.3, ge=0.0, le=1.0,
                           description="Boxes of one object overlapping more than this are merged.")
    max_boxes: int = Field(default=10, ge=1, description="Most boxes kept per object name.")
    cache_dir: str | None = Field(default=None,
                                  description="Hugging Face cache directory (default: HF_HOME).")


class LabelBboxTool(Tool[LabelBboxOptions]):
    """Finds named objects; boxes normalised to 0–1 as ``{name: [[x1, y1, x2, y2], ...]}``."""

    name = "label_bbox"
    version = "1.0.0"
    description = (
        "Open-vocabulary object detection: give it object names (args 'objects', a list of "
        "strings) and it returns, as JSON, each name with its boxes [x1, y1, x2, y2] "
        "normalised to 0-1 (an empty list when not found). Use it to locate, count or "
        "compare the positions of objects."
    )
    probe_args = {"objects": ["person", "flag"]}
    claim_patterns = (rf"\b(?:detector|label_bbox) {CLAIM_VERBS}\b",)

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self._loaded: tuple[Any, Any] | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ availability

    def availability(self) -> Availability:
        for module in ("torch", "transformers"):
            if importlib.util.find_spec(module) is None:
                return Availability(False, f"python package {module!r} is not installed")
        if self.model_source() is None:
            return Availability(False, f"detector model {self.options.model!r} is neither a "
                                "local directory with weights nor in the local Hugging Face "
                                "cache (models are never downloaded at run time)")
        return Availability(True)

    def model_source(self) -> str | None:
        """A local directory or a cached hub id to load from, or None; no network access."""
        local = self.resolve_path(self.options.model)
        if local.is_dir():
            return str(local) if _has_weights(local) else None
        return self.options.model if self._in_hf_cache(self.options.model) else None

    def _in_hf_cache(self, repo_id: str) -> bool:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return False
        try:
            found = [try_to_load_from_cache(repo_id, f, cache_dir=self.options.cache_dir)
                     for f in ("config.json", *WEIGHT_FILES)]
        except Exception:  # not a valid repo id: it is a missing local path
            return False
        config, *weights = (isinstance(f, str) for f in found)
        return config and any(weights)

    # ------------------------------------------------------------------------- run

    def load(self) -> tuple[Any, Any]:
        """(processor, model), loaded once per instance from local files only."""
        if self._loaded is None:
            with self._lock:
                if self._loaded is None:
                    self._loaded = self._load()
        return self._loaded

    def _load(self) -> tuple[Any, Any]:
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        source = self.model_source()
        if source is None:
            raise RuntimeError(self.availability().reason)
        kwargs = {"local_files_only": True, "cache_dir": self.options.cache_dir}
        processor = AutoProcessor.from_pretrained(source, **kwargs)
        model = AutoModelForZeroShotObjectDetection.from_pretrained(source, **kwargs).eval()
        return processor, model

    def run(self, image: Path, args: Mapping[str, Any]) -> ToolResult:
        start = time.perf_counter()
        try:
            found = self.detect(image, object_names(args))
        except Exception as exc:
            return ToolResult("", error=f"{type(exc).__name__}: {exc}",
                              latency_s=time.perf_counter() - start)
        text = json.dumps({k: [b["box"] for b in v] for k, v in found.items()})
        return ToolResult(text, {"objects": found}, latency_s=time.perf_counter() - start)

    def detect(self, image: Path, names: list[str]) -> dict[str, list[dict[str, Any]]]:
        """Boxes per name as ``{"box": [x1, y1, x2, y2] in 0-1, "score": s}``, best first."""
        import torch

        img = open_rgb(image)
        processor, model = self.load()
        inputs = processor(text=[names], images=img, return_tensors="pt")
        with torch.inference_mode():
            outputs = model(**inputs)
        width, height = img.size
        result = processor.post_process_grounded_object_detection(
            outputs, threshold=self.options.threshold, target_sizes=[(height, width)])[0]
        return self._per_name(names, result, width, height)

    def _per_name(self, names: list[str], result: Mapping[str, Any], width: int,
                  height: int) -> dict[str, list[dict[str, Any]]]:
        found: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        for box, score, label in zip(result["boxes"].tolist(), result["scores"].tolist(),
                                     result["labels"].tolist(), strict=True):
            found[names[int(label)]].append({"box": _normalise(box, width, height),
                                             "score": round(float(score), 4)})
        return {n: nms(v, self.options.nms_iou)[: self.options.max_boxes]
                for n, v in found.items()}


def object_names(args: Mapping[str, Any]) -> list[str]:
    """``args["objects"]`` as a clean, de-duplicated list (a comma-separated string works)."""
    raw = args.get("objects")
    if isinstance(raw, str):
        raw = raw.split(",")
    names = [str(n).strip() for n in (raw or []) if str(n).strip()]
    if not names:
        raise ValueError("label_bbox needs args['objects']: a non-empty list of object names")
    return list(dict.fromkeys(names))


def _has_weights(path: Path) -> bool:
    return (path / "config.json").is_file() and any((path / f).is_file() for f in WEIGHT_FILES)


def _normalise(box: list[float], width: int, height: int) -> list[float]:
    x1, y1, x2, y2 = box
    clip = lambda v, hi: min(max(float(v) / hi, 0.0), 1.0)  # noqa: E731
    return [round(clip(x1, width), 4), round(clip(y1, height), 4),
            round(clip(x2, width), 4), round(clip(y2, height), 4)]


def _iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def nms(boxes: list[dict[str, Any]], iou: float) -> list[dict[str, Any]]:
    """Greedy non-maximum suppression: OWL predicts one box per patch, many overlap."""
    kept: list[dict[str, Any]] = []
    for cand in sorted(boxes, key=lambda b: -b["score"]):
        if all(_iou(cand["box"], k["box"]) <= iou for k in kept):
            kept.append(cand)
    return kept


@hookimpl
def register_tools(register: Register) -> None:
    register(LabelBboxTool)
