"""The ``openai`` teacher against a local fake OpenAI server: happy path, every fault, secrets."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from mmat_assets.contracts import TeacherError, TeacherRequest
from mmat_assets.plugins import load_registry
from mmat_plugins.teachers_openai import OpenAIOptions, OpenAITeacher, repair_json
from tests.openai_fake import FakeOpenAI, step_reply

KEY = "sk-test-0123456789-SECRET-abcdef"
STEP_SCHEMA: dict[str, Any] = {
    "title": "step", "type": "object",
    "properties": {"thought": {"type": "string"}, "operators": {"type": "array"},
                   "rag": {"type": "object"}, "next_action": {"type": "string"}},
    "required": ["thought", "operators", "rag", "next_action"],
}
FAST = {"backoff_base_s": 0.01, "backoff_max_s": 2.0, "timeout_s": 5.0}


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


def make_teacher(server: FakeOpenAI, **options: Any) -> OpenAITeacher:
    return OpenAITeacher({"base_url": server.base_url, "api_key": KEY, **FAST, **options})


def step_request(text: str = "What is 2 + 3? The answer is 5.", **extra: Any) -> TeacherRequest:
    return TeacherRequest(kind="step", prompt_version="t1", json_schema=STEP_SCHEMA,
                          messages=[{"role": "system", "content": "Reply in JSON."},
                                    {"role": "user", "content": text}], **extra)


def decoded_image(body: dict[str, Any]) -> Image.Image:
    part = next(p for p in body["messages"][-1]["content"] if p["type"] == "image_url")
    url = part["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


# ----------------------------------------------------------------------- plugin


def test_registers_as_the_openai_teacher() -> None:
    reg = load_registry(builtins=["mmat_plugins.teachers_openai"], entry_points=False)
    assert reg.errors == []
    assert reg.get("teacher", "openai").cls is OpenAITeacher


def test_defaults_are_gpt4o_with_prices() -> None:
    teacher = OpenAITeacher()
    assert (teacher.model, teacher.vision, teacher.json_mode) == ("gpt-4o", True, "schema")
    assert set(teacher.options.prices) >= {"gpt-4o", "gpt-4o-mini"}
    assert teacher.options.base_url == "https://api.openai.com/v1"


def test_availability_needs_a_key_only_for_remote_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MMAT_TEST_KEY", raising=False)
    remote = OpenAITeacher({"api_key_env": "MMAT_TEST_KEY"})
    assert not remote.availability().ok
    assert "MMAT_TEST_KEY" in remote.availability().reason
    assert OpenAITeacher({"base_url": "http://127.0.0.1:9/v1"}).availability().ok
    assert OpenAITeacher({"base_url": "http://localhost:8000/v1"}).availability().ok
    monkeypatch.setenv("MMAT_TEST_KEY", KEY)
    assert remote.availability().ok


# ----------------------------------------------------------------------- happy path


def test_success_counts_tokens_prices_them_and_sends_downsized_images(tmp_path: Path) -> None:
    image = tmp_path / "table.png"
    Image.new("RGB", (2000, 1000), "white").save(image)
    request = step_request()
    request.messages[-1]["content"] = [{"type": "image", "path": str(image), "sha256": "ab"},
                                       {"type": "text", "text": "What is 2 + 3?"}]
    with FakeOpenAI(usage=(1000, 500)) as server:
        reply = make_teacher(server).complete(request)
    assert json.loads(reply.content) == json.loads(step_reply({}))
    assert (reply.prompt_tokens, reply.completion_tokens, reply.attempts) == (1000, 500, 1)
    assert reply.cost_usd == pytest.approx(1.0 * 0.0025 + 0.5 * 0.01)
    assert reply.model == "gpt-4o" and reply.latency_s > 0
    assert list(server.counts.values()) == [1] and server.auth == ["present"]
    body = server.bodies[0]
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"] == STEP_SCHEMA
    assert max(decoded_image(body).size) == 768
    assert body["messages"][-1]["content"][1] == {"type": "text", "text": "What is 2 + 3?"}
    assert set(body["messages"][-1]["content"][0]) == {"type", "image_url"}


def test_dated_model_snapshots_are_priced_by_longest_prefix() -> None:
    teacher = OpenAITeacher()
    assert teacher._price("gpt-4o-mini-2024-07-18") == teacher.options.prices["gpt-4o-mini"]
    assert teacher._price("gpt-4o-2024-08-06") == teacher.options.prices["gpt-4o"]


def test_plain_dict_requests_with_response_format_get_json(fake: FakeOpenAI) -> None:
    # The caption tool builds requests as dicts asking for a JSON object.
    reply = make_teacher(fake).complete({"kind": "tool", "response_format": {"type": "json_object"},
                                         "messages": [{"role": "user", "content": "JSON please"}]})
    assert isinstance(json.loads(reply.content), dict)
    assert fake.bodies[0]["response_format"] == {"type": "json_object"}


def test_text_requests_are_returned_verbatim(fake: FakeOpenAI) -> None:
    fake.reply = lambda body: "A table of prices."
    request = TeacherRequest(kind="caption", prompt_version="t1",
                             messages=[{"role": "user", "content": "Describe it."}])
    assert make_teacher(fake).complete(request).content == "A table of prices."
    assert "response_format" not in fake.bodies[0]


def test_images_are_refused_for_a_teacher_without_vision(fake: FakeOpenAI, tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    request = step_request()
    request.messages[-1]["content"] = [{"type": "image", "path": str(image)}]
    with pytest.raises(TeacherError) as err:
        make_teacher(fake, vision=False).complete(request)
    assert err.value.reason == "unsupported" and fake.total == 0


# ----------------------------------------------------------------------- JSON handling


def test_rejected_json_schema_falls_back_to_json_object_and_remembers() -> None:
    with FakeOpenAI(reject_formats={"json_schema"}) as server:
        teacher = make_teacher(server)
        first = teacher.complete(step_request("one"))
        teacher.complete(step_request("two"))
    assert json.loads(first.content)["next_action"] == "final_answer"
    assert first.attempts == 2 and teacher.json_mode == "json_object"
    sent = [b.get("response_format", {}).get("type") for b in server.bodies]
    assert sent == ["json_schema", "json_object", "json_object"]


def test_fallback_goes_down_to_no_response_format() -> None:
    with FakeOpenAI(reject_formats={"json_schema", "json_object"}) as server:
        teacher = make_teacher(server)
        reply = teacher.complete(step_request())
    assert json.loads(reply.content)["operators"] == []
    assert teacher.json_mode == "none" and "response_format" not in server.bodies[-1]


def test_sloppy_json_is_repaired_locally_without_asking_again(fake: FakeOpenAI) -> None:
    fake.reply = lambda body: ("Here you go:\n```json\n{'thought': 'Add them', 'operators': [],"
                               " 'rag': {'needed': False, 'query': None},"
                               " 'next_action': 'final_answer',}\n```")
    reply = make_teacher(fake).complete(step_request())
    assert json.loads(reply.content) == {"thought": "Add them", "operators": [],
                                         "rag": {"needed": False, "query": None},
                                         "next_action": "final_answer"}
    assert fake.total == 1


@pytest.mark.parametrize("text, expected", [
    ('{"a": 1, "b": [1, 2,],}', {"a": 1, "b": [1, 2]}),
    ('noise {"a": true, "b": null} noise', {"a": True, "b": None}),
    ("{'a': 'x'} and more", {"a": "x"}),
    ("no object here", None),
    ("{'a': __import__('os')}", None),
])
def test_local_repair_cases(text: str, expected: dict[str, Any] | None) -> None:
    assert repair_json(text) == expected


def test_unrepairable_reply_is_asked_again_with_the_parse_error(fake: FakeOpenAI) -> None:
    replies = iter(["I think the answer is five.", step_reply({})])
    fake.reply = lambda body: next(replies)
    reply = make_teacher(fake).complete(step_request())
    assert json.loads(reply.content)["next_action"] == "final_answer"
    assert reply.attempts == 2 and fake.total == 2
    followup = fake.bodies[1]["messages"]
    assert followup[-2] == {"role": "assistant", "content": "I think the answer is five."}
    assert "could not be parsed as JSON" in followup[-1]["content"]


def test_reply_still_broken_after_repairs_is_unparseable(fake: FakeOpenAI) -> None:
    fake.script = ["malformed", "malformed", "malformed"]
    with pytest.raises(TeacherError) as err:
        make_teacher(fake).complete(step_request())
    assert err.value.reason == "unparseable" and fake.total == 2


# ----------------------------------------------------------------------- faults


def test_429_waits_for_retry_after_then_succeeds(fake: FakeOpenAI) -> None:
    fake.script, fake.retry_after = ["rate_limit", None], "1"
    started = time.perf_counter()
    reply = make_teacher(fake).complete(step_request())
    assert time.perf_counter() - started >= 1.0
    assert reply.attempts == 2 and list(fake.counts.values()) == [2]
    assert fake.statuses == [429, 200]


def test_retry_after_as_an_http_date_is_honoured(fake: FakeOpenAI) -> None:
    fake.script, fake.retry_after = ["rate_limit", None], formatdate(time.time() + 2, usegmt=True)
    started = time.perf_counter()
    reply = make_teacher(fake).complete(step_request())
    assert time.perf_counter() - started >= 0.5  # the date is whole seconds: at least ~1 s ahead
    assert reply.attempts == 2 and fake.statuses == [429, 200]


def test_backoff_without_retry_after_is_the_teachers(fake: FakeOpenAI) -> None:
    # The SDK's own backoff starts at 0.5 s; backoff_base_s 0.01 keeps two retries far below.
    fake.script = ["server_error", "server_error", None]
    started = time.perf_counter()
    reply = make_teacher(fake, backoff_base_s=0.01, backoff_max_s=0.02).complete(step_request())
    assert time.perf_counter() - started < 0.4
    assert reply.attempts == 3 and fake.statuses == [500, 500, 200]


def test_500s_are_retried_then_succeed(fake: FakeOpenAI) -> None:
    fake.script = ["server_error", "server_error", None]
    reply = make_teacher(fake).complete(step_request())
    assert reply.attempts == 3 and fake.statuses == [500, 500, 200]


def test_exhausted_429s_are_rate_limited(fake: FakeOpenAI) -> None:
    fake.script, fake.retry_after = (lambda i, body: "rate_limit"), "0"
    with pytest.raises(TeacherError) as err:
        make_teacher(fake, max_retries=2).complete(step_request())
    assert err.value.reason == "rate_limited" and fake.total == 3


def test_always_slow_server_times_out_after_retries(fake: FakeOpenAI) -> None:
    fake.script, fake.slow_s = (lambda i, body: "slow"), 2.0
    with pytest.raises(TeacherError) as err:
        make_teacher(fake, timeout_s=0.3, max_retries=2).complete(step_request())
    assert err.value.reason == "timeout" and list(fake.counts.values()) == [3]


def test_unreachable_server_is_an_http_error() -> None:
    with FakeOpenAI() as server:
        url = server.base_url
    teacher = OpenAITeacher({"base_url": url, **FAST, "max_retries": 1})
    with pytest.raises(TeacherError) as err:
        teacher.complete(step_request())
    assert err.value.reason == "http_error" and "connection failed" in str(err.value)


def test_client_errors_are_not_retried(fake: FakeOpenAI) -> None:
    fake.script = lambda i, body: "bad_request"
    request = TeacherRequest(kind="caption", prompt_version="t1",
                             messages=[{"role": "user", "content": "Describe it."}])
    with pytest.raises(TeacherError) as err:
        make_teacher(fake).complete(request)
    assert err.value.reason == "http_error" and fake.total == 1


def test_a_400_unrelated_to_response_format_does_not_lower_the_json_mode(fake: FakeOpenAI) -> None:
    fake.script = lambda i, body: "bad_request"
    teacher = make_teacher(fake)
    with pytest.raises(TeacherError) as err:
        teacher.complete(step_request())
    # Each mode was tried once for this request; none worked, so nothing is remembered.
    assert err.value.reason == "http_error" and fake.total == 3
    assert teacher.json_mode == "schema"


@pytest.mark.parametrize("fault", ["refusal", "content_filter"])
def test_refusals_fail_at_once(fake: FakeOpenAI, fault: str) -> None:
    fake.script = [fault]
    with pytest.raises(TeacherError) as err:
        make_teacher(fake).complete(step_request())
    assert err.value.reason == "refusal" and fake.total == 1


def test_seeded_faults_on_a_fraction_of_calls_are_all_recovered() -> None:
    with FakeOpenAI(fault_rate=0.5, seed=3, retry_after="0") as server:
        teacher = make_teacher(server, max_retries=8)
        replies = [teacher.complete(step_request(f"q{i}")) for i in range(8)]
    assert all(json.loads(r.content)["next_action"] == "final_answer" for r in replies)
    assert server.total == sum(r.attempts for r in replies) > 8
    assert {429, 500} <= set(server.statuses)


# ----------------------------------------------------------------------- concurrency


def test_async_concurrency_limit_is_respected() -> None:
    async def run(teacher: OpenAITeacher) -> list[Any]:
        try:
            return await asyncio.gather(*(teacher.acomplete(step_request(f"q{i}")) for i in range(12)))
        finally:
            await teacher.aclose()

    with FakeOpenAI(latency_s=0.15) as server:
        replies = asyncio.run(run(make_teacher(server, concurrency=3)))
    assert len(replies) == 12 and server.max_in_flight == 3
    assert set(server.counts.values()) == {1}


def test_sync_callers_in_threads_share_one_limit() -> None:
    with FakeOpenAI(latency_s=0.1) as server:
        teacher = make_teacher(server, concurrency=2)
        with ThreadPoolExecutor(6) as pool:
            replies = list(pool.map(lambda i: teacher.complete(step_request(f"q{i}")), range(8)))
        teacher.close()
    assert len(replies) == 8 and server.max_in_flight == 2


def test_complete_works_inside_a_running_loop(fake: FakeOpenAI) -> None:
    teacher = make_teacher(fake)

    async def caller() -> str:
        return str(teacher.complete(step_request()).content)  # a sync caller in async code

    assert json.loads(asyncio.run(caller()))["operators"] == []


# ----------------------------------------------------------------------- the key


def test_key_is_sent_but_never_shown(fake: FakeOpenAI, caplog: pytest.LogCaptureFixture,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.DEBUG)
    teacher = make_teacher(fake)
    fake.script = lambda i, body: ["server_error", None][i] if i < 2 else "bad_request"
    teacher.complete(step_request("one"))
    with pytest.raises(TeacherError) as err:
        teacher.complete(step_request("two"))
    assert fake.auth == ["present"] * 5
    shown = [repr(teacher), str(teacher.options), repr(teacher.options), caplog.text,
             str(err.value), repr(err.value), json.dumps(teacher.options.model_dump()),
             teacher.options.model_dump_json()]
    assert caplog.text and all(KEY not in text for text in shown)
    assert "api_key" not in teacher.options.model_dump()


def test_key_from_the_named_env_var_or_an_options_object(fake: FakeOpenAI,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMAT_TEST_KEY", KEY)
    OpenAITeacher({"base_url": fake.base_url, "api_key_env": "MMAT_TEST_KEY"}).complete(step_request())
    monkeypatch.delenv("MMAT_TEST_KEY")
    options = OpenAIOptions(base_url=fake.base_url, api_key=KEY, api_key_env="MMAT_TEST_KEY")
    OpenAITeacher(options).complete(step_request())
    OpenAITeacher({"base_url": fake.base_url, "api_key_env": "MMAT_TEST_KEY"}).complete(step_request())
    assert fake.auth == ["present", "present", "absent"]


def test_azure_key_header_api_version_and_deployment_path(fake: FakeOpenAI) -> None:
    # AsyncAzureOpenAI: the key in 'api-key', the version as a query, the model as deployment
    make_teacher(fake, api_version="2024-10-21").complete(step_request())
    deployment = OpenAITeacher({"base_url": fake.base_url + "/deployments/mine", "api_key": KEY, **FAST,
                                "api_version": "2024-10-21"})
    deployment.complete(step_request())
    assert fake.auth_headers == ["api-key", "api-key"]
    assert fake.paths == ["/v1/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
                          "/v1/deployments/mine/chat/completions?api-version=2024-10-21"]


def test_api_key_header_without_azure(fake: FakeOpenAI) -> None:
    make_teacher(fake, auth_header="api-key").complete(step_request())
    make_teacher(fake).complete(step_request())
    assert fake.auth_headers == ["api-key", "authorization"] and fake.paths == ["/v1/chat/completions"] * 2
