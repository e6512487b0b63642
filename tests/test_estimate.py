"""``mmat estimate``: a 50-row pilot through the real teacher predicts a 400-row run's requests,
tokens and dollars within 10%, and the run that follows reuses every answer the pilot paid for."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from mmat_assets.engine import stages
from mmat_assets.engine.rationale import Environment
from mmat_assets.estimate import Limits, RowUsage, extrapolate, pilot, run_pilot, totals
from mmat_plugins.teachers_openai import OpenAITeacher
from tests.openai_fake import FakeOpenAI
from tests.stage_fakes import environment, samples, step

ROWS, PILOT = 400, 50


def reply(body: dict[str, Any]) -> str:
    """Rows need 1 to 4 steps (by their number), and later steps write longer thoughts, so
    requests and tokens per row vary as they do for real."""
    question = next(p["text"] for p in body["messages"][1]["content"] if p.get("type") == "text")
    number = int(re.search(r"\((\d+)\)", question)[1])  # type: ignore[index]
    done = sum(m["role"] == "assistant" for m in body["messages"])
    need = 1 + (number * 7919) % 4
    thought = "Adding the two numbers from the question. " * (1 + done * 3)
    return json.dumps(step(thought + ("So the answer is 17." if done + 1 >= need else ""), final=done + 1 >= need))


def teacher(fake: FakeOpenAI) -> OpenAITeacher:
    return OpenAITeacher({"base_url": fake.base_url, "model": "gpt-4o", "concurrency": 16, "max_retries": 0,
                          "timeout_s": 20})


def test_a_50_row_pilot_predicts_a_400_row_run_within_10_percent(tmp_path: Path) -> None:
    rows = samples(tmp_path, [{"question": f"What is 12 + 5? ({i})", "answer": "17"} for i in range(ROWS)])
    with FakeOpenAI(reply=reply) as fake:
        env = environment(teacher(fake), {}, tmp_path, concurrency=16, max_steps=6)

        @contextmanager
        def env_for(shard: str) -> Iterator[Environment]:
            yield env

        (estimate,) = run_pilot({"0": rows}, env_for, {"rationales"}, PILOT, seed=1, limits=Limits(16))
        pilot_requests = fake.total
        assert (estimate.stage, estimate.rows, estimate.pilot_rows) == ("rationales", ROWS, PILOT)

        run = stages.run_rationales(rows, env)  # the real run, on the same request cache
        actual = stages.teacher_totals(run)
        assert fake.total - pilot_requests == actual["teacher_calls"] - pilot_requests  # the pilot's are reused
        assert actual["teacher_calls_cached"] == pilot_requests
    for figure, real in (("requests", actual["teacher_calls"]), ("prompt_tokens", actual["prompt_tokens"]),
                         ("completion_tokens", actual["completion_tokens"]), ("usd", actual["cost_usd"])):
        predicted = getattr(estimate, figure)
        assert predicted.value == pytest.approx(real, rel=0.10), (figure, predicted, real)
        assert predicted.low <= predicted.value <= predicted.high and predicted.low < predicted.high
    assert estimate.wall_s.value > 0


def test_wall_time_is_bound_by_concurrency_or_by_the_rate_limits() -> None:
    usages = [RowUsage(2, 1000, 100, 0.01, 4.0)] * 10
    assert totals(usages, 100, Limits(8))["wall_s"] == pytest.approx(100 * 4.0 / 8)
    assert totals(usages, 100, Limits(8, rpm=60))["wall_s"] == pytest.approx(200 / 60 * 60)  # 200 requests at 1/s
    assert totals(usages, 100, Limits(8, tpm=11_000))["wall_s"] == pytest.approx(110_000 / 11_000 * 60)


def test_the_pilot_is_seeded_and_the_interval_narrows_with_more_rows(tmp_path: Path) -> None:
    rows = samples(tmp_path, [{"question": f"q{i}", "answer": "1"} for i in range(100)])
    assert pilot(rows, 10, 3)["sample_id"].to_list() == pilot(rows.reverse(), 10, 3)["sample_id"].to_list()
    assert pilot(rows, 10, 3)["sample_id"].to_list() != pilot(rows, 10, 4)["sample_id"].to_list()
    varied = [RowUsage(1 + i % 3, 100 * (1 + i % 5), 10, 0.001 * (1 + i % 3), 1.0) for i in range(200)]
    small, large = extrapolate("rationales", varied[:20], 1000, Limits(4)), extrapolate("rationales", varied, 1000, Limits(4))
    assert (small.usd.high - small.usd.low) > (large.usd.high - large.usd.low) > 0


@pytest.mark.slow
def test_mmat_estimate_on_a_built_foundation_then_the_build_reuses_the_pilot(tmp_path: Path) -> None:
    from tests.test_budget import _build, _project

    with FakeOpenAI(reply=reply) as fake:
        cfg = _project(tmp_path, fake, 40)
        built = _build(cfg, tmp_path)  # --select *rationales needs the foundation first: build it all once
        assert built.returncode == 0, (built.stdout + built.stderr)[-3000:]
        first = fake.total
        out = subprocess.run([str(Path(sys.executable).with_name("mmat")), "estimate", "--config", str(cfg),
                              "--select", "rationales", "--sample", "10", "--json"], capture_output=True, text=True,
                             env={**os.environ, "DAGSTER_HOME": str(tmp_path / "home")}, timeout=300)
        assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
        (estimate,) = json.loads(out.stdout)
        assert (estimate["stage"], estimate["rows"], estimate["pilot_rows"]) == ("rationales", 40, 10)
        assert fake.total == first  # the pilot's rows were answered by the build before: all cached
        assert estimate["requests"]["value"] == pytest.approx(first, rel=0.3)
        assert estimate["usd"]["low"] <= estimate["usd"]["value"] <= estimate["usd"]["high"]
