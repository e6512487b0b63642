"""The ``teacher_judge`` quality judge (SPEC §2.6): a model scores each finished dialogue
0–1 on coherence, relevance, accuracy, completeness of tool use and visual integration.

It asks a configured teacher that answers ``score`` requests (``Teacher.request_kinds``); a
teacher with no model answers only steps, so with one the judge reports itself unavailable
and no scores are written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mmat_assets.contracts import Availability, Judge, TeacherReply, TeacherRequest
from mmat_assets.hookspecs import Register, hookimpl

PROMPT_VERSION = "quality-1"
SCHEMA = {"type": "object", "properties": {"score": {"type": "number"}, "reasons": {"type": "string"}},
          "required": ["score", "reasons"]}
PROMPT = """\
Score this step-by-step multimodal reasoning dialogue from 0 to 1 for coherence, relevance
to the question, accuracy, completeness of tool use and integration of the visual
evidence. Reply with one JSON object: {{"score": <0..1>, "reasons": "<one or two sentences>"}}.

Dialogue:
{dialogue}"""


class JudgeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    teacher: str | None = Field(default=None, description="Configured teacher that judges (default: the first model-backed one).")


class TeacherJudge(Judge[JudgeOptions]):
    """Scores dialogues with a model-backed teacher."""

    name = "teacher_judge"
    version = "1.0.0"
    prompt_version = PROMPT_VERSION
    description = "Quality score 0-1 with reasons, written by a model-backed teacher."

    def __init__(self, options: BaseModel | Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self.teacher: Any = None

    def attach_teachers(self, teachers: Mapping[str, Any]) -> None:
        """Pick the judging teacher among the configured ones: the first that answers score
        requests (one with no model answers only steps)."""
        wanted = self.options.teacher
        for name, teacher in teachers.items():
            if (wanted is None or name == wanted) and "score" in teacher.request_kinds:
                self.teacher = teacher
                return

    def availability(self) -> Availability:
        if self.teacher is None:
            return Availability(False, "no configured teacher answers score requests")
        return self.teacher.availability()

    def request(self, sample: Mapping[str, Any]) -> TeacherRequest:
        dialogue = "\n".join(f"{t['role'].upper()}: {t['content']}" for t in sample["turns"] if t["role"] != "system")
        return TeacherRequest("score", [{"role": "user", "content": PROMPT.format(dialogue=dialogue)}],
                              PROMPT_VERSION, SCHEMA, {"temperature": 0})

    def parse(self, reply: TeacherReply) -> tuple[float, str]:
        data = json.loads(reply.content)
        score = min(1.0, max(0.0, float(data["score"])))
        return score, str(data.get("reasons", ""))

    def score(self, sample: Mapping[str, Any]) -> tuple[float, str]:
        return self.parse(self.teacher.complete(self.request(sample)))


@hookimpl
def register_judges(register: Register) -> None:
    register(TeacherJudge)
