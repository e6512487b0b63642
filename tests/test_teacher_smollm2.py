"""The ``openai`` teacher against a real local model: SmolLM2-135M behind ``transformers serve``.

A 135M model often writes JSON that no repair saves, so both outcomes are legitimate: a
reply whose content is a JSON object, or ``TeacherError("unparseable")``. What must hold
is that the server really answered the teacher's requests.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from mmat_assets.contracts import TeacherError, TeacherRequest
from mmat_plugins.teachers_openai import OpenAITeacher
from tests.smollm2_server import DONE_MARKER, SmolLM2Server, run_child, server_or_skip

pytestmark = pytest.mark.slow

STEP_SCHEMA = {
    "title": "step", "type": "object",
    "properties": {"thought": {"type": "string"}, "operators": {"type": "array"},
                   "rag": {"type": "object"}, "next_action": {"type": "string"}},
    "required": ["thought", "operators", "rag", "next_action"],
}
SYSTEM = (
    "You are a careful reasoner. Reply with one JSON object only, with the keys "
    '"thought" (one short reasoning step), "operators" (a list, possibly empty, of tool '
    'names from: image_caption, label_bbox, ocr, face_detection), "rag" '
    '({"needed": false, "query": null}) and "next_action" ("continue" or "final_answer").'
)
QUESTION = (
    "Table: pencils | 3\nerasers | 5\n"
    "Question: How many pencils and erasers are there in all? The answer is 8. "
    "Please start your reasoning."
)


@pytest.fixture(scope="module")
def smollm2() -> Iterator[SmolLM2Server]:
    yield from server_or_skip()


def test_a_real_step_request_through_the_openai_teacher(smollm2: SmolLM2Server) -> None:
    teacher = OpenAITeacher({"base_url": smollm2.base_url, "model": smollm2.model,
                             "vision": False, "max_tokens": 80, "timeout_s": 120,
                             "max_retries": 1})
    assert teacher.availability().ok  # a loopback server needs no key
    request = TeacherRequest(kind="step", prompt_version="smoke-1", json_schema=STEP_SCHEMA,
                             messages=[{"role": "system", "content": SYSTEM},
                                       {"role": "user", "content": QUESTION}])
    try:
        reply = teacher.complete(request)
    except TeacherError as err:
        assert err.reason == "unparseable", str(err)
        assert not str(err).endswith("''"), "the model answered nothing at all"
    else:
        assert isinstance(json.loads(reply.content), dict)
        assert reply.prompt_tokens > 0 and reply.completion_tokens > 0 and reply.attempts >= 1
    answered = smollm2.log_tail(200).count('"POST /v1/chat/completions HTTP/1.1" 200')
    assert answered >= 1, smollm2.log_tail()
    teacher.close()


def test_a_server_that_cannot_start_fails_with_its_log(tmp_path: Path) -> None:
    if importlib.util.find_spec("fastapi") is None:
        pytest.skip("fastapi is not installed (see requirements/teachers.txt)")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}", encoding="utf-8")
    (broken / DONE_MARKER).write_text("", encoding="utf-8")
    with pytest.raises(RuntimeError, match="server log"):
        SmolLM2Server(broken, start_timeout_s=60).start()


def test_the_converter_child_starts_on_a_machine_with_no_cached_folder() -> None:
    # On a fresh machine the first test to need the model converts it in this child process;
    # run as a file path, it died at its own `from tests.` import and took 31 tests with it.
    out = run_child()  # exactly as convert() starts it
    assert out.returncode == 2, out.stderr[-2000:]  # no subcommand: the usage, from a module that imported
    assert "python -m tests.smollm2_server convert" in out.stdout
