"""The ``grounded`` teacher: deterministic, no model; the embedded default.

It turns the source's own gold rationale (TabMWP ``solution``, LLaVA-CoT staged reasoning,
Visual CoT key regions) into protocol steps. It first calls the tools the image needs — a
table or text image -> ``ocr``; people -> ``face_detection``; knowledge questions -> a RAG
query built from the question — then writes thoughts that quote what those tools really
returned, then walks through the gold rationale in a few steps to the answer. A row whose
source has no rationale gets a minimal tool-then-answer trajectory, marked ``minimal``.

Thoughts quote only the tool output their reasoning uses (the table rows holding the
rationale's numbers), not the whole result the user turn already holds.

In a seeded share of numeric rows (``gap_share``) the final step states the result without
the computation that produces it — the defect LLM teachers show most often — and the step's
grounding note says so (``gold:gap``). The reflection stage's math-gap check then repairs
it with the derivation from the gold rationale, so the default data holds reflections that
arise from a real defect, recorded as made on purpose.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mmat_assets.contracts import StepContext, StepSoFar, Teacher, TeacherError, TeacherReply, TeacherRequest
from mmat_assets.hookspecs import Register, hookimpl
from mmat_assets.toolkit.answers import numbers_in, plain_fractions, rationale_lines, to_number

TEXT_SUBSETS = re.compile(r"tab|chart|doc|text|infographic|infovqa|ocr|dvqa|st.?vqa|plot|figure|table|wiki|screen|receipt", re.I)
TEXT_WORDS = re.compile(r"\b(table|chart|graph|text|written|say|says|read|label|sign|number|title|price|cost)\b", re.I)
PEOPLE_WORDS = re.compile(r"\b(person|people|man|men|woman|women|boy|girl|child|children|face|faces|player|someone)\b", re.I)
KNOWLEDGE = re.compile(r"\b(who (?:painted|wrote|built|designed|founded|invented)|which (?:year|country|city)|"
                       r"when was|where was|what (?:country|city|year)|named after|capital of)\b", re.I)
MAX_QUOTE = 400
PIECE_CHARS = 220  # about this many characters of rationale per reasoning step
MAX_PARTS = 4
#: The grounding note of a row whose final step leaves its derivation out on purpose.
GAP_NOTE = "gold:gap"
#: A value right after ``=`` or ``→`` (TabMWP writes reductions as "a/b → c/d").
_RESULT_AFTER = re.compile(r"[=→]\s*-?\$?-?((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)(?![\d/])")


class GroundedOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gap_share: float = Field(
        default=0.25, ge=0.0, le=1.0,
        description="Share of the numeric rows whose gold rationale computes the result in which the final "
                    "step states the result without that computation (grounding note 'gold:gap'), for the "
                    "reflection stage's math-gap check to repair with the gold derivation; 0 turns it off. "
                    "About 40% of TabMWP rows have such a derivation, so 0.25 puts a reflection in about 10% "
                    "of the RR rows (the paper: about 5%).")
    seed: int = Field(default=42, description="Seed of the choice of gapped rows (hashed with the sample id).")
    quote_chars: int = Field(default=200, ge=40, description="At most this many characters of tool output quoted "
                                                            "in a thought.")


def _compact(text: str, limit: int = MAX_QUOTE) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1].rsplit(" ", 1)[0] + " …"


def _computes(line: str, gold: float) -> bool:
    """Whether a rationale line computes the value ``gold``: it comes right after ``=`` or ``→``."""
    return any(round(abs(float(m[1].replace(",", ""))), 4) == round(abs(gold), 4)
               for m in _RESULT_AFTER.finditer(plain_fractions(line)))


def without_derivation(rationale: str, answer: str) -> str | None:
    """The rationale with the lines that compute the answer left out, or None where it has
    no such line or nothing would be left (a gap there would not be a gap)."""
    gold = to_number(answer)
    if gold is None or "/" in answer:  # a fraction is written, not computed, as a value
        return None
    lines = rationale_lines(rationale)
    kept = [ln for ln in lines if not _computes(ln, gold)]
    if len(kept) == len(lines) or not kept:
        return None
    return "\n".join(kept)


def _chunks(rationale: str, parts: int) -> list[str]:
    """Split a rationale into at most ``parts`` consecutive pieces on line/sentence ends, of
    about equal length (short thoughts, as the paper's are)."""
    lines = [ln.strip() for ln in re.split(r"\n+|(?<=[.!?])\s+(?=[A-Z])", rationale) if ln.strip()]
    if not lines:
        return []
    target = sum(len(ln) for ln in lines) / parts
    pieces: list[list[str]] = [[]]
    for ln in lines:
        if pieces[-1] and sum(len(x) for x in pieces[-1]) + len(ln) / 2 > target and len(pieces) < parts:
            pieces.append([])
        pieces[-1].append(ln)
    return [" ".join(p) for p in pieces]


def _parts(rationale: str) -> int:
    """How many reasoning steps a rationale takes: two, more for a long one (at most
    MAX_PARTS, so the opening tool step and the pieces stay within the default step limit)."""
    return max(2, min(MAX_PARTS, -(-len(rationale) // PIECE_CHARS)))


class GroundedTeacher(Teacher[GroundedOptions]):
    """Deterministic teacher grounded in gold rationales and real tool output."""

    name = "grounded"
    version = "1.1.0"
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
        observed = self._observations(done, rationale, self.options.quote_chars)
        if not rationale:
            return self._step(f"{observed}So the answer is {ctx['answer']}.".strip(), final=True, grounding="minimal")
        gapped = self._gapped(ctx, rationale)
        grounding = GAP_NOTE if gapped else "gold"
        opened_with_tools = bool(done) and bool(done[0]["operators"] or done[0]["rag"])
        # the reasoning must end within the row's step limit, after the opening tool step
        room = ctx.get("max_steps", MAX_PARTS + 1) - (1 if opened_with_tools else 0)
        pieces = _chunks(gapped or rationale, max(1, min(room, _parts(gapped or rationale))))
        index = len(done) - (1 if opened_with_tools else 0)  # reasoning steps written so far
        thought = pieces[min(index, len(pieces) - 1)]
        if index == 0:
            thought = f"{observed}{thought}".strip()
        final = index >= len(pieces) - 1
        if final:
            thought = f"{thought} So the answer is {ctx['answer']}."
        return self._step(thought, final=final, grounding=grounding)

    def _gapped(self, ctx: StepContext, rationale: str) -> str | None:
        """The rationale without its result's derivation, for the seeded share of numeric rows."""
        if ctx.get("answer_type") != "number" or not self._draws_gap(str(ctx.get("sample_id") or "")):
            return None
        return without_derivation(rationale, ctx["answer"])

    def _draws_gap(self, sample_id: str) -> bool:
        digest = hashlib.sha256(f"{self.options.seed}\x1f{sample_id}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < self.options.gap_share

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
    def _observations(done: list[StepSoFar], rationale: str = "", limit: int = MAX_QUOTE) -> str:
        seen = []
        for step in done:
            for r in step["results"]:
                if r["tool"] == "ocr":
                    seen.append(f"The OCR reads: \"{_used_lines(r['text'], rationale, limit)}\".")
                elif r["tool"] == "rag":
                    seen.append(f"The search says: \"{_compact(r['text'], 300)}\".")
                else:
                    seen.append(f"The {r['tool']} tool reports: {_compact(r['text'], 200)}")
        return " ".join(seen) + (" " if seen else "")

    @staticmethod
    def _regions(ctx: StepContext) -> str:
        regions = (ctx.get("meta") or {}).get("regions")
        return f"The key region for this question is at {regions[0]}." if regions else ""


def _used_lines(text: str, rationale: str, limit: int) -> str:
    """The lines of a tool's text that hold a number the rationale uses (and a short header
    line), verbatim; runs of lines that are not next to each other are parted by `` … ``.
    With no such line, the text's beginning, so a thought never quotes more than ``limit``."""
    lines = [" ".join(ln.split()) for ln in text.splitlines() if ln.strip()]
    wanted = {round(abs(n), 4) for n in numbers_in(plain_fractions(rationale))}
    keep = [i for i, ln in enumerate(lines) if wanted & {round(abs(n), 4) for n in numbers_in(ln)}]
    if not keep:
        return _compact(text, limit)
    if keep[0] != 0 and len(lines[0]) <= 60 and not numbers_in(lines[0]):
        keep.insert(0, 0)  # the header names the columns the values sit in
    out, last = "", None
    for i in keep:
        piece = lines[i] if last is None else (" " if i == last + 1 else " … ") + lines[i]
        if len(out) + len(piece) > limit:
            break
        out, last = out + piece, i
    return out or _compact(lines[keep[0]], limit)


@hookimpl
def register_teachers(register: Register) -> None:
    register(GroundedTeacher)
