"""The ``openai`` teacher against a real model that honours a JSON schema: SmolLM2-135M behind
``llama_cpp.server``, over TabMWP rows through the rationale and reflection stages.

Through ``transformers serve`` (no JSON mode) nearly every reply of this 135M model is
unparseable. Here the server constrains decoding to the step schema the engine sends, so
every reply parses: what may still fail is the model's reasoning (a bad step, the step limit,
a reflection check), and each such row must end failed with its reason. The model reads no
images, so each row carries its TabMWP table as text, as a text-only teacher gets it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mmat_assets import protocol
from mmat_assets.engine import stages
from mmat_plugins.teachers_openai import OpenAITeacher
from tests.conftest import TABMWP
from tests.llama_server import LlamaServer, server_or_skip
from tests.stage_fakes import EchoTool, environment, samples

ROWS = 8
REASONS = {"teacher_refusal", "teacher_rate_limited", "teacher_timeout", "teacher_http_error", "bad_step",
           "step_limit", "tool_error", "wrong_answer", "unsupported_claim", "math_gap", "cheating"}


def tabmwp_rows(count: int) -> list[dict[str, Any]]:
    problems = json.loads((TABMWP / "problems.json").read_text(encoding="utf-8"))
    rows = []
    for pid in sorted(problems)[:count]:
        p = problems[pid]
        rows.append({"question": f"Table: {p['table_title']}\n{p['table']}\n\n{p['question']}",
                     "answer": p["answer"], "source_row_id": pid, "images": [], "image_key": None})
    return rows


@pytest.fixture(scope="module")
def llama() -> Iterator[LlamaServer]:
    yield from server_or_skip()


@pytest.mark.slow
def test_every_tabmwp_row_parses_and_ends_a_sample_or_failed_with_a_reason(llama: LlamaServer,
                                                                           tmp_path: Path) -> None:
    # max_tokens covers the longest step the schema allows, so no reply is cut off
    teacher = OpenAITeacher({"base_url": llama.base_url, "model": llama.model, "vision": False,
                             "json_mode": "json_object_schema", "max_tokens": 320, "timeout_s": 300,
                             "max_retries": 0, "concurrency": 1})
    env = environment(teacher, {"ocr": EchoTool()}, tmp_path, max_steps=1, concurrency=1)
    reflected = stages.run_reflections(stages.run_rationales(samples(tmp_path, tabmwp_rows(ROWS)), env), env)
    teacher.close()

    assert reflected.height == ROWS
    outcomes = reflected.to_dicts()
    assert not [r for r in outcomes if r["failure"] == "teacher_unparseable"], outcomes
    for row in outcomes:
        if row["status"] == "ok":
            rr = stages.rr_samples(reflected.filter(reflected["sample_id"] == row["sample_id"]))
            assert protocol.parse_rr(rr["turns"][0]).answer == row["answer"]
        else:
            assert row["status"] == "failed" and row["failure"] in REASONS, row
            assert row["failure_detail"]
    # every row's first step really came from the model and parsed into a step
    assert all(r["trajectory"] for r in outcomes), [(r["failure"], r["failure_detail"]) for r in outcomes]


# ----------------------------------------------------------------------- what makes it work, fast


def test_the_step_schema_bounds_every_string_and_names_only_the_available_tools() -> None:
    import re

    from mmat_assets.engine.rationale import step_schema

    schema = step_schema({"ocr": EchoTool(), "label_bbox": EchoTool()})
    props = schema["properties"]
    assert props["thought"]["maxLength"] and props["operators"]["maxItems"]
    assert all("maxLength" in s for s in props["rag"]["properties"]["query"]["anyOf"] if s["type"] == "string")
    pattern = re.compile(props["operators"]["items"]["pattern"])
    assert [bool(pattern.match(o)) for o in ("ocr", "label_bbox[cat|dog]", "face_detection", "ocr]", 'ocr["x]')] \
        == [True, True, False, False, False]
    assert step_schema({})["properties"]["operators"]["maxItems"] == 0


def test_json_object_schema_mode_sends_the_schema_and_steps_down_on_a_400() -> None:
    from mmat_assets.contracts import TeacherRequest
    from mmat_assets.engine.rationale import STEP_SCHEMA
    from tests.openai_fake import FakeOpenAI

    request = TeacherRequest(kind="step", prompt_version="t1", json_schema=STEP_SCHEMA,
                             messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                    {"type": "text", "text": "b"}]}])
    with FakeOpenAI() as fake:
        teacher = OpenAITeacher({"base_url": fake.base_url, "json_mode": "json_object_schema", "vision": False})
        teacher.complete(request)
    assert fake.bodies[0]["response_format"] == {"type": "json_object", "schema": STEP_SCHEMA}
    # a text-only model's server gets text parts as one string (llama.cpp's templates need it)
    assert fake.bodies[0]["messages"][0]["content"] == "a\nb"
    with FakeOpenAI(reject_formats={"json_object"}) as fake:
        teacher = OpenAITeacher({"base_url": fake.base_url, "json_mode": "json_object_schema"})
        teacher.complete(request)
    assert [b.get("response_format") for b in fake.bodies] == [
        {"type": "json_object", "schema": STEP_SCHEMA}, {"type": "json_object"}, None]
    assert teacher.json_mode == "none"


def test_a_reply_with_raw_line_breaks_in_its_strings_is_repaired() -> None:
    from mmat_plugins.teachers_openai import repair_json

    assert repair_json('{"thought": "first\nsecond", "operators": []}') == {"thought": "first\nsecond",
                                                                          "operators": []}
