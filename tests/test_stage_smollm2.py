"""The whole rationale → reflection loop with a real model: SmolLM2-135M behind ``transformers serve``.

A 135M model rarely writes a usable step, so what must hold is the engine's contract, not
the model's quality: every row ends ``ok`` with an RR dialogue that parses back, or
``failed`` with one of the recorded reasons; nothing escapes as an exception; and the
server really answered the teacher. Token and step limits keep the run short on a CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mmat_assets import protocol
from mmat_assets.engine import stages
from mmat_plugins.teachers_openai import OpenAITeacher
from tests.smollm2_server import SmolLM2Server, server_or_skip
from tests.stage_fakes import EchoTool, environment, samples

pytestmark = pytest.mark.slow

REASONS = {"teacher_refusal", "teacher_unparseable", "teacher_rate_limited", "teacher_timeout",
           "teacher_http_error", "bad_step", "step_limit", "tool_error", "wrong_answer",
           "unsupported_claim", "math_gap", "cheating"}
ROWS = [{"question": "Table: pencils | 3, erasers | 5. How many pencils and erasers are there in all?",
         "answer": "8"},
        {"question": "Table: a | 12, b | 5. What is a + b?", "answer": "17"}]


@pytest.fixture(scope="module")
def smollm2() -> Iterator[SmolLM2Server]:
    yield from server_or_skip()


def test_the_stage_loop_ends_every_row_ok_or_failed_for_a_reason(smollm2: SmolLM2Server, tmp_path: Path) -> None:
    # The text-only server ignores image parts, so the rows keep their image as in production.
    teacher = OpenAITeacher({"base_url": smollm2.base_url, "model": smollm2.model, "max_tokens": 64,
                             "timeout_s": 120, "max_retries": 0, "repair_attempts": 1, "concurrency": 2})
    env = environment(teacher, {"ocr": EchoTool("pencils | 3\nerasers | 5")}, tmp_path, max_steps=2,
                      concurrency=2)
    reflected = stages.run_reflections(stages.run_rationales(samples(tmp_path, ROWS), env), env)
    teacher.close()

    assert reflected.height == len(ROWS)
    for row in reflected.to_dicts():
        if row["status"] == "ok":
            rr = stages.rr_samples(reflected.filter(reflected["sample_id"] == row["sample_id"]))
            assert protocol.parse_rr(rr["turns"][0]).answer == row["answer"]
        else:
            assert row["status"] == "failed" and row["failure"] in REASONS, row
            assert row["failure_stage"] in {"rationale", "reflection"} and row["failure_detail"]
    answered = smollm2.log_tail(400).count('"POST /v1/chat/completions HTTP/1.1" 200')
    assert answered >= len(ROWS), smollm2.log_tail()  # each row's first step reached the model
