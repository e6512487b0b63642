"""Server faults through the real ``openai`` teacher and the real stage engine.

Each sample row gets a fault plan, applied by the fake server to the calls it can tell
belong to that row (the question text) and step (the finished steps in the dialogue):
none, one fault that a retry or a re-ask cures, the same fault on every call, a different
fault on each retry, or curable faults drawn by a seeded generator on 40% of calls. Every
row must end ``ok`` (and render to RR and ORR) or ``failed`` with the reason of the fault
its calls actually got, and the API key must leave no trace anywhere the run writes, even
when the server echoes it.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from mmat_assets import protocol
from mmat_assets.engine import stages
from mmat_plugins.teachers_openai import OpenAITeacher
from tests.openai_fake_hooks import HookedFakeOpenAI
from tests.stage_fakes import EchoTool, environment, samples, step

KEY_ENV = "MMAT_FAULT_TEST_KEY"
KEY = "sk-fault-test-CANARY-7f3a9c1e5b2d4e6f"
MAX_RETRIES = 2
TIMEOUT_S = 1.0
FINAL = "a is 12 and b is 5, so 12 + 5 = 17. So the answer is 17."
TRANSIENT = ("rate_limit", "server_error", "slow")
SEEDED = (*TRANSIENT, "malformed")
REASK = "Your previous reply could not be parsed"


@dataclass(frozen=True)
class Plan:
    """Which calls of a row get which fault."""

    kind: str  # "clean" | "once" | "always" | "sequence" | "seeded"
    fault: str | None = None
    step: int = 0  # the step whose calls are hit ("always" hits every step)
    sequence: tuple[str, ...] = ()
    expect: str | None = None  # the failure reason, None for ok


PLANS: dict[str, Plan] = {
    "clean-0": Plan("clean"), "clean-1": Plan("clean"), "clean-2": Plan("clean"),
    "once-429": Plan("once", "rate_limit", 0),
    "once-500": Plan("once", "server_error", 1),
    "once-slow": Plan("once", "slow", 0),
    "once-malformed": Plan("once", "malformed", 1),
    "always-429": Plan("always", "rate_limit", expect="teacher_rate_limited"),
    "always-500": Plan("always", "server_error", expect="teacher_http_error"),
    "always-slow": Plan("always", "slow", expect="teacher_timeout"),
    "always-malformed": Plan("always", "malformed", expect="teacher_unparseable"),
    "always-refusal": Plan("always", "refusal", expect="teacher_refusal"),
    "refusal-at-step-1": Plan("once", "refusal", 1, expect="teacher_refusal"),
    # retries spent on three different faults: the last one names the failure
    "429-500-slow": Plan("sequence", step=0, sequence=("rate_limit", "server_error", "slow"),
                         expect="teacher_timeout"),
    **{f"seeded-{i}": Plan("seeded") for i in range(6)},
}


def question(body: dict[str, Any]) -> str:
    """The row a request belongs to: the question in its opening user message."""
    parts = body["messages"][1]["content"]
    text = next(p["text"] for p in parts if p.get("type") == "text")
    return text.split("\n", 1)[0].removeprefix("Question: ")


def finished_steps(body: dict[str, Any]) -> int:
    """Steps already taken: assistant turns that hold a valid step (a malformed reply
    being re-asked does not count)."""
    count = 0
    for m in body["messages"]:
        if m["role"] == "assistant":
            try:
                count += isinstance(json.loads(m["content"]), dict)
            except ValueError:
                pass
    return count


def is_reask(body: dict[str, Any]) -> bool:
    last = body["messages"][-1]["content"]
    return isinstance(last, str) and last.startswith(REASK)


class Injector:
    """The server's fault script; remembers what it injected on which row and step."""

    def __init__(self, seed: int = 3) -> None:
        self.seed = seed
        self.lock = threading.Lock()
        self.attempts: Counter[str] = Counter()  # per body: retries are the same body again
        self.log: dict[str, list[tuple[int, str | None]]] = defaultdict(list)

    def __call__(self, index: int, body: dict[str, Any]) -> str | None:
        q, n = question(body), finished_steps(body)
        with self.lock:
            key = json.dumps(body, sort_keys=True)
            attempt = self.attempts[key]
            self.attempts[key] += 1
            fault = self.decide(PLANS[q], q, n, attempt, is_reask(body))
            self.log[q].append((n, fault))
        return fault

    def decide(self, plan: Plan, q: str, n: int, attempt: int, reask: bool) -> str | None:
        if plan.kind == "always":
            return plan.fault
        if plan.kind == "once":
            return plan.fault if n == plan.step and attempt == 0 and not reask else None
        if plan.kind == "sequence":
            return plan.sequence[attempt] if n == plan.step and attempt < len(plan.sequence) else None
        if plan.kind == "seeded" and attempt < MAX_RETRIES:
            # a seeded 40% of calls fail, within the retry budget and never on the one re-ask,
            # so every seeded row must recover
            rng = random.Random(f"{self.seed}:{q}:{n}:{reask}:{attempt}")
            return rng.choice(TRANSIENT if reask else SEEDED) if rng.random() < 0.4 else None
        return None


def reply(body: dict[str, Any]) -> str:
    """Step 0 reads the table with OCR; step 1 computes the answer from what OCR read."""
    if finished_steps(body) == 0:
        return json.dumps(step("The image is a table; I read it.", ["ocr"]))
    return json.dumps(step(FINAL, final=True))


@pytest.fixture
def server() -> Iterator[tuple[HookedFakeOpenAI, Injector]]:
    injector = Injector()
    fake = HookedFakeOpenAI(reply=reply, script=injector, retry_after="0.05", slow_s=TIMEOUT_S * 2.5,
                            echo_auth=True)
    with fake:
        yield fake, injector


def run_stages(fake: HookedFakeOpenAI, tmp: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    teacher = OpenAITeacher({"base_url": fake.base_url, "model": "fake-teacher", "api_key_env": KEY_ENV,
                             "concurrency": 8, "timeout_s": TIMEOUT_S, "max_retries": MAX_RETRIES,
                             "backoff_base_s": 0.02, "backoff_max_s": 0.2})
    env = environment(teacher, {"ocr": EchoTool()}, tmp, concurrency=20, max_steps=4)
    df = samples(tmp, [{"question": q, "answer": "17"} for q in PLANS])
    rationales = stages.run_rationales(df, env)
    return rationales, stages.run_reflections(rationales, env)


def test_every_row_ends_ok_or_failed_for_the_fault_it_got(
        server: tuple[HookedFakeOpenAI, Injector], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    fake, injector = server
    monkeypatch.setenv(KEY_ENV, KEY)
    caplog.set_level(logging.DEBUG)
    rationales, reflected = run_stages(fake, tmp_path)  # an escaping exception fails the test here

    rows = {r["question"]: r for r in reflected.to_dicts()}
    assert sorted(rows) == sorted(PLANS)
    for q, plan in PLANS.items():
        row, injected = rows[q], [f for _, f in injector.log[q]]
        if plan.expect is None:
            assert (row["status"], row["failure"]) == ("ok", None), (q, injected, row["failure_detail"])
        else:
            assert (row["status"], row["failure"], row["failure_stage"]) == ("failed", plan.expect, "rationale"), \
                (q, injected, row["failure_detail"])
    assert_faults_were_really_injected(injector)
    assert_ok_rows_render(reflected)
    assert_no_key_anywhere(fake, [rationales, reflected], caplog)


def assert_faults_were_really_injected(injector: Injector) -> None:
    """Guards against a plan that silently never fires (the row would pass as clean)."""
    log = injector.log
    calls = MAX_RETRIES + 1
    assert [f for _, f in log["always-429"]] == ["rate_limit"] * calls
    assert [f for _, f in log["always-500"]] == ["server_error"] * calls
    assert [f for _, f in log["always-slow"]] == ["slow"] * calls
    assert [f for _, f in log["always-refusal"]] == ["refusal"]  # a refusal is final, not retried
    assert [f for _, f in log["always-malformed"]] == ["malformed", "malformed"]  # one re-ask, then given up
    assert [f for _, f in log["429-500-slow"]] == ["rate_limit", "server_error", "slow"]
    assert log["refusal-at-step-1"] == [(0, None), (1, "refusal")]
    for q in ("once-429", "once-500", "once-slow", "once-malformed"):
        assert sum(f is not None for _, f in log[q]) == 1, (q, log[q])
    seeded = [f for q, entries in log.items() if q.startswith("seeded") for _, f in entries]
    assert {f for f in seeded if f} == set(SEEDED), seeded  # every recoverable kind got exercised
    assert all(not any(f for _, f in log[q]) for q in PLANS if PLANS[q].kind == "clean")


def assert_ok_rows_render(reflected: pl.DataFrame) -> None:
    ok = reflected.filter(pl.col("status") == "ok")
    assert ok.height == sum(p.expect is None for p in PLANS.values())
    rr, orr = stages.rr_samples(reflected), stages.orr_samples(reflected)
    assert rr.height == orr.height == ok.height
    for turns in rr["turns"]:
        t = protocol.parse_rr(turns)
        assert t.answer == "17" and t.steps[0].results == [protocol.Result("ocr", "a | 12\nb | 5")]
    for turns in orr["turns"]:
        assert protocol.parse_orr(turns).answer == "17"
    for prov in ok["provenance"]:  # both steps' answered requests are on record
        assert [c["kind"] for c in json.loads(prov)["teacher_calls"]] == ["step", "step"]


def assert_no_key_anywhere(fake: HookedFakeOpenAI, frames: list[pl.DataFrame],
                           caplog: pytest.LogCaptureFixture) -> None:
    assert set(fake.auth) == {"present"}  # the key really was sent, on every request
    assert KEY not in caplog.text
    assert all(KEY not in r.getMessage() and KEY not in str(r.args) for r in caplog.records)
    for df in frames:
        assert KEY not in str(df.to_dicts())
        assert all(KEY not in prov for prov in df["provenance"].drop_nulls())
    assert KEY not in str(fake.bodies) and KEY not in str(fake.paths)
    # the server echoed the key in its error bodies: what reached the rows is the scrubbed text
    assert any("Bearer ***" in d for d in frames[0]["failure_detail"].drop_nulls())
