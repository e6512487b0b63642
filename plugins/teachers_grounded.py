"""The ``grounded`` teacher: deterministic, no model; the embedded default.

It turns the source's own gold rationale (TabMWP ``solution``, LLaVA-CoT staged reasoning,
Visual CoT key regions) into protocol steps. It first calls the tools the image needs — a
table or text image -> ``ocr``; people -> ``face_detection``; knowledge questions -> a RAG
query built from the question — then writes thoughts that quote what those tools really
returned, then walks through the gold rationale in a few steps to the answer. A row whose
source has no rationale gets a minimal tool-then-answer trajectory, marked ``minimal``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from mmat_assets.contracts import StepContext, StepSoFar, Teacher, TeacherError, TeacherReply, TeacherRequest
from mmat_assets.hookspecs import Register, hookimpl

TEXT_SUBSETS = re.compile(r"tab|chart|doc|text|infographic|infovqa|ocr|dvqa|st.?vqa|plot|figure|table|wiki|screen|receipt", re.I)
TEXT_WORDS = re.compile(r"\b(table|chart|graph|text|written|say|says|read|label|sign|number|title|price|cost)\b", re.I)
PEOPLE_WORDS = re.compile(r"\b(person|people|man|men|woman|women|boy|girl|child|children|face|faces|player|someone)\b", re.I)
KNOWLEDGE = re.compile(r"\b(who (?:painted|wrote|built|designed|founded|invented)|which (?:year|country|city)|"
                       r"when was|where was|what (?:country|city|year)|named after|capital of)\b", re.I)
MAX_QUOTE = 400


def _compact(text: str, limit: int = MAX_QUOTE) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1].rsplit(" ", 1)[0] + " …"


def _chunks(rationale: str, parts: int) -> list[str]:
    """Split a rationale into at most ``parts`` consecutive pieces on line/sentence ends."""
    lines = [ln.strip() for ln in re.split(r"\n+|(?<=[.!?])\s+(?=[A-Z])", rationale) if ln.strip()]
    if not lines:
        return []
    size = -(-len(lines) // parts)
    return [" ".join(lines[i:i + size]) for i in range(0, len(lines), size)]


class GroundedTeacher(Teacher):
    """Deterministic teacher grounded in gold rationales and real tool output."""

    name = "grounded"
    version = "1.0.0"
    model = "grounded-1"
    description = "Deterministic teacher: gold rationale + the tools the image needs (no model, no key)."
    request_kinds = frozenset({"step"})  # works from the step context: it cannot judge or caption

    def complete(self, request: TeacherRequest) -> TeacherReply:
        if request.kind != "step":
            raise TeacherError("unsupported", f"the grounded teacher writes steps only, not {request.kind!r}")
        step = self.next_step(request.step_context())
        return TeacherReply(json.dumps(step, ensure_ascii=False), model=self.model)

    # ----------------------------------------------------------------- planning

    def tools_for(self, ctx: StepContext) -> tuple[list[str], str | None]:
        """The operators the image needs, and a RAG query when the question asks for knowledge."""
        question, available = ctx["question"], set(ctx["tools"])
        wanted = []
        texty = ctx["dataset"] in ("tabmwp",) or TEXT_SUBSETS.search(ctx["subset"] or "") or TEXT_WORDS.search(question)
        if texty and "ocr" in available:
            wanted.append("ocr")
        if PEOPLE_WORDS.search(question) and "face_detection" in available:
            wanted.append("face_detection")
        rag = None
        if ctx["retrieval"] and (ctx["dataset"] == "infoseek" or KNOWLEDGE.search(question)):
            rag = re.sub(r"\s+", " ", question.strip().rstrip("?"))
        return wanted, rag

    def next_step(self, ctx: StepContext) -> dict[str, Any]:
        done = ctx["steps"]
        tools, rag = self.tools_for(ctx)
        if not done and (tools or rag):
            return self._step(self._opening(ctx, tools, rag), tools, rag)
        rationale = (ctx.get("rationale") or "").strip() or self._regions(ctx)
        observed = self._observations(done)
        if not rationale:
            return self._step(f"{observed}So the answer is {ctx['answer']}.".strip(), final=True, grounding="minimal")
        pieces = _chunks(rationale, 2)
        opened_with_tools = bool(done) and bool(done[0]["operators"] or done[0]["rag"])
        index = len(done) - (1 if opened_with_tools else 0)  # reasoning steps written so far
        thought = pieces[min(index, len(pieces) - 1)]
        if index == 0:
            thought = f"{observed}{thought}".strip()
        final = index >= len(pieces) - 1
        if final:
            thought = f"{thought} So the answer is {ctx['answer']}."
        return self._step(thought, final=final, grounding="gold")

    @staticmethod
    def _step(thought: str, operators: list[str] | None = None, rag: str | None = None, final: bool = False,
              grounding: str = "") -> dict[str, Any]:
        return {"thought": thought, "operators": operators or [], "rag": {"needed": rag is not None, "query": rag},
                "next_action": "final_answer" if final else "continue", "grounding": grounding}

    @staticmethod
    def _opening(ctx: StepContext, tools: list[str], rag: str | None) -> str:
        parts = []
        if "ocr" in tools:
            what = "a table" if ctx["dataset"] == "tabmwp" else "text"
            parts.append(f"The image shows {what}; I will read it with OCR first.")
        if "face_detection" in tools:
            parts.append("The question is about people, so I will detect the faces in the image.")
        if rag:
            parts.append("The question needs knowledge the image cannot show, so I will search for it.")
        return " ".join(parts)

    @staticmethod
    def _observations(done: list[StepSoFar]) -> str:
        seen = []
        for step in done:
            for r in step["results"]:
                if r["tool"] == "ocr":
                    seen.append(f"The OCR reads: \"{_compact(r['text'])}\".")
                elif r["tool"] == "rag":
                    seen.append(f"The search says: \"{_compact(r['text'], 300)}\".")
                else:
                    seen.append(f"The {r['tool']} tool reports: {_compact(r['text'], 200)}")
        return " ".join(seen) + (" " if seen else "")

    @staticmethod
    def _regions(ctx: StepContext) -> str:
        regions = (ctx.get("meta") or {}).get("regions")
        return f"The key region for this question is at {regions[0]}." if regions else ""


@hookimpl
def register_teachers(register: Register) -> None:
    register(GroundedTeacher)
