"""The grounded teacher's plans: tools the image needs, gold rationale, minimal fallback."""

from __future__ import annotations

import json

import pytest

from mmat_assets.contracts import TeacherError, TeacherRequest
from mmat_plugins.teachers_grounded import GroundedTeacher


def _ctx(**kw) -> dict:
    base = {"dataset": "tabmwp", "subset": "grade_3", "question": "What is the total?", "answer": "17",
            "rationale": "Add the numbers.\n12 + 5 = 17", "meta": {}, "tools": ["ocr", "face_detection"],
            "retrieval": True, "steps": []}
    base.update(kw)
    return base


def _ask(ctx: dict) -> dict:
    return json.loads(GroundedTeacher().complete(TeacherRequest("step", [], "v", context=ctx)).content)


def test_table_image_reads_with_ocr_then_follows_the_gold_rationale() -> None:
    first = _ask(_ctx())
    assert first["operators"] == ["ocr"] and first["next_action"] == "continue" and not first["rag"]["needed"]
    done = [{"thought": first["thought"], "operators": ["ocr"], "rag": None,
             "results": [{"tool": "ocr", "text": "a | 12\nb | 5"}]}]
    second = _ask(_ctx(steps=done))
    assert second["thought"].startswith('The OCR reads: "a | 12 b | 5".') and "Add the numbers." in second["thought"]
    done.append({"thought": second["thought"], "operators": [], "rag": None, "results": []})
    third = _ask(_ctx(steps=done))
    assert third["next_action"] == "final_answer" and third["thought"].endswith("12 + 5 = 17 So the answer is 17.")
    assert third["grounding"] == "gold"


def test_people_and_knowledge_questions_get_faces_and_search() -> None:
    step = _ask(_ctx(dataset="infoseek", subset="infoseek", question="Who painted the woman in this picture?",
                     rationale=None))
    assert step["operators"] == ["face_detection"]
    assert step["rag"] == {"needed": True, "query": "Who painted the woman in this picture"}
    no_search = _ask(_ctx(dataset="infoseek", subset="x", question="Who painted this?", retrieval=False,
                          rationale=None, tools=[]))
    assert no_search["next_action"] == "final_answer" and no_search["grounding"] == "minimal"


def test_rows_without_a_rationale_get_a_minimal_trajectory() -> None:
    done = [{"thought": "read", "operators": ["ocr"], "rag": None, "results": [{"tool": "ocr", "text": "Total 17"}]}]
    step = _ask(_ctx(rationale=None, steps=done))
    assert step == {"thought": 'The OCR reads: "Total 17". So the answer is 17.', "operators": [],
                    "rag": {"needed": False, "query": None}, "next_action": "final_answer", "grounding": "minimal"}


def test_judging_is_refused_as_unsupported() -> None:
    with pytest.raises(TeacherError) as err:
        GroundedTeacher().complete(TeacherRequest("judge", [], "v"))
    assert err.value.reason == "unsupported"
