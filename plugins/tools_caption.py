"""``image_caption``: the paper's two-step, question-focused caption, written by a teacher.

Step 1: a vision-capable teacher sees the image (and the question, when given) and writes
a scene graph as JSON: objects with attributes, and relations between them, keeping what
the question needs. Step 2: the teacher turns that graph into one caption sentence. The
host hands the tool the configured teachers (:meth:`CaptionTool.attach_teachers`); it uses
the one named in option ``teacher``, or else the first one that can see images
(``Teacher.vision``). Without one it is unavailable.

Both steps are :class:`~mmat_assets.contracts.TeacherRequest` of kind ``"caption"``; step 1
carries the image as a ``{"type": "image", "path", "sha256"}`` part and a JSON schema.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mmat_assets.contracts import Availability, TeacherError, TeacherRequest, Tool, ToolResult
from mmat_assets.hookspecs import Register, hookimpl
from mmat_assets.toolkit.images import file_sha256, open_rgb

#: Part of every request's cache key: bump it when a prompt changes.
PROMPT_VERSION = "image_caption/1"
SCENE_GRAPH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "objects": {"type": "array", "items": {
            "type": "object", "required": ["id", "name"],
            "properties": {"id": {"type": "string"}, "name": {"type": "string"},
                           "attributes": {"type": "array", "items": {"type": "string"}}}}},
        "relations": {"type": "array", "items": {
            "type": "object", "required": ["subject", "predicate", "object"],
            "properties": {k: {"type": "string"} for k in ("subject", "predicate", "object")}}},
    },
    "required": ["objects", "relations"],
}
GRAPH_PROMPT = (
    "Describe this image as a scene graph that keeps what matters for the question below.\n"
    "Question: {question}\n"
    "Reply with one JSON object and nothing else, shaped as:\n"
    '{{"objects": [{{"id": "o1", "name": "...", "attributes": ["..."]}}], '
    '"relations": [{{"subject": "o1", "predicate": "...", "object": "o2"}}]}}\n'
    "Use only what is visible; do not answer the question."
)
NO_QUESTION = "(none: describe the main content of the image)"
CAPTION_PROMPT = (
    "Here is a scene graph of an image:\n{graph}\n"
    "Write one sentence that describes the image from this graph, focusing on what the "
    "question needs. Question: {question}\nReply with the sentence only."
)


class CaptionOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    teacher: str | None = Field(
        default=None, description="Name of the configured teacher that writes the scene graph "
        "and the caption (it must see images). Default: the first configured teacher that can.",
    )
    max_objects: int = Field(default=20, ge=1, description="Scene-graph objects kept.")


class CaptionTool(Tool[CaptionOptions]):
    """Question-focused caption from a teacher-written scene graph (two teacher calls)."""

    name = "image_caption"
    version = "1.0.0"
    description = (
        "Describes the image in one sentence focused on the question, built from a scene "
        "graph of the objects, their attributes and relations. Use it first to learn what "
        "the image shows."
    )
    probe_args = {"question": "What does the image show?"}

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.teacher: Any = None

    def attach_teachers(self, teachers: Mapping[str, Any]) -> None:
        """Receive the configured teachers; keep the named one, or the first that sees."""
        name = self.options.teacher
        if name:
            self.teacher = teachers.get(name)
            return
        seeing = [teachers[n] for n in sorted(teachers) if getattr(teachers[n], "vision", False)]
        self.teacher = seeing[0] if seeing else None

    def availability(self) -> Availability:
        name = self.options.teacher
        if self.teacher is None:
            if name:
                return Availability(False, f"teacher {name!r} is not configured")
            return Availability(False, "no vision-capable teacher configured")
        if not getattr(self.teacher, "vision", False):
            return Availability(False, f"teacher {name or self.teacher.name!r} cannot see images")
        return self.teacher.availability()

    def run(self, image: Path, args: Mapping[str, Any]) -> ToolResult:
        start = time.perf_counter()
        try:
            text, data = self.caption(image, str(args.get("question") or ""))
        except TeacherError as exc:
            return ToolResult("", error=f"teacher {exc.reason}: {exc}",
                              latency_s=time.perf_counter() - start)
        except Exception as exc:
            return ToolResult("", error=f"{type(exc).__name__}: {exc}",
                              latency_s=time.perf_counter() - start)
        return ToolResult(text, data, latency_s=time.perf_counter() - start)

    def caption(self, image: Path, question: str) -> tuple[str, dict[str, Any]]:
        """Run both steps; return the sentence and (graph, replies' model and cost)."""
        if self.teacher is None:
            raise RuntimeError(self.availability().reason)
        open_rgb(image)  # a file the teacher could not see fails here, before any paid call
        first = self.teacher.complete(graph_request(image, question))
        graph = parse_scene_graph(first.content, self.options.max_objects)
        second = self.teacher.complete(caption_request(graph, question))
        sentence = parse_caption(second.content)
        replies = [first, second]
        return sentence, {
            "scene_graph": graph,
            "model": first.model,
            "prompt_tokens": sum(r.prompt_tokens for r in replies),
            "completion_tokens": sum(r.completion_tokens for r in replies),
            "cost_usd": sum(r.cost_usd for r in replies),
        }


def graph_request(image: Path, question: str) -> TeacherRequest:
    """Step 1 request: the image and the question, asking for scene-graph JSON."""
    prompt = GRAPH_PROMPT.format(question=question.strip() or NO_QUESTION)
    content = [{"type": "image", "path": str(image), "sha256": file_sha256(image)},
               {"type": "text", "text": prompt}]
    return TeacherRequest(kind="caption", messages=[{"role": "user", "content": content}],
                          prompt_version=PROMPT_VERSION, json_schema=SCENE_GRAPH_SCHEMA,
                          context={"step": "scene_graph", "question": question})


def caption_request(graph: Mapping[str, Any], question: str) -> TeacherRequest:
    """Step 2 request: text only, the graph and the question, asking for one sentence."""
    prompt = CAPTION_PROMPT.format(graph=json.dumps(graph, ensure_ascii=False),
                                   question=question.strip() or NO_QUESTION)
    return TeacherRequest(kind="caption", messages=[{"role": "user", "content": prompt}],
                          prompt_version=PROMPT_VERSION,
                          context={"step": "caption", "question": question,
                                   "scene_graph": dict(graph)})


def _json_object(text: str) -> Any:
    """The first JSON object in a reply, tolerating code fences and chatter around it."""
    text = re.sub(r"```(?:json)?", "", text)
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = json.JSONDecoder().raw_decode(text[start:])
            return obj
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
    raise ValueError(f"no JSON object in teacher reply: {text[:200]!r}")


def parse_scene_graph(text: str, max_objects: int = 20) -> dict[str, Any]:
    """Validate a scene graph reply into ``{"objects": [...], "relations": [...]}``."""
    raw = _json_object(text)
    if not isinstance(raw, dict):
        raise ValueError("scene graph is not a JSON object")
    objects = [_object(o, i) for i, o in enumerate(raw.get("objects") or [])
               if isinstance(o, (dict, str))][:max_objects]
    if not objects:
        raise ValueError("scene graph has no objects")
    ids = {o["id"] for o in objects}
    relations = [_relation(r) for r in raw.get("relations") or [] if isinstance(r, dict)]
    relations = [r for r in relations if r["subject"] in ids and r["object"] in ids]
    return {"objects": objects, "relations": relations}


def _object(obj: dict[str, Any] | str, index: int) -> dict[str, Any]:
    if isinstance(obj, str):
        return {"id": f"o{index + 1}", "name": obj, "attributes": []}
    attrs = obj.get("attributes") or []
    attrs = [attrs] if isinstance(attrs, str) else attrs
    return {"id": str(obj.get("id") or f"o{index + 1}"), "name": str(obj.get("name") or ""),
            "attributes": [str(a) for a in attrs]}


def _relation(rel: dict[str, Any]) -> dict[str, str]:
    return {k: str(rel.get(k) or "") for k in ("subject", "predicate", "object")}


def parse_caption(text: str) -> str:
    """One clean sentence: first non-empty line, quotes and labels stripped."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        raise ValueError("teacher returned an empty caption")
    line = re.sub(r"^(caption|sentence)\s*:\s*", "", lines[0], flags=re.I).strip().strip('"\'')
    if not line:
        raise ValueError("teacher returned an empty caption")
    return line if line.endswith((".", "!", "?")) else line + "."


@hookimpl
def register_tools(register: Register) -> None:
    register(CaptionTool)
