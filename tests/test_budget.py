"""The spending cap: at half the estimated cost the stage stops within 5% of the cap with its
finished rows kept and the rest ``budget_exhausted``; a higher cap resumes it and the two runs
together send exactly the requests of one uncapped run (counted at the fake server); and a
real ``mmat build --budget`` exits 3 with one line, then completes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from mmat_assets.engine import stages
from mmat_assets.engine.budget import BUDGET_EXIT_CODE, Budget, recorded_spend
from mmat_assets.engine.cache import ResultCache
from mmat_plugins.teachers_openai import OpenAITeacher
from tests.conftest import write_project
from tests.openai_fake import FakeOpenAI
from tests.stage_fakes import environment, samples, step

ROWS = 120
USAGE = (1000, 100)  # tokens per request: gpt-4o list price $0.0035 a request
PER_REQUEST = (USAGE[0] * 0.0025 + USAGE[1] * 0.01) / 1000
CONCURRENCY = 4


def reply(body: dict[str, Any]) -> str:
    """Two steps per row: one that goes on, one that ends."""
    if not any(m["role"] == "assistant" for m in body["messages"]):
        return json.dumps(step("The question needs one addition."))
    return json.dumps(step("12 + 5 = 17. So the answer is 17.", final=True))


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(reply=reply, usage=USAGE) as fake:
        yield fake


def run(fake: FakeOpenAI, tmp: Path, cache: str, budget: float | None) -> pl.DataFrame:
    teacher = OpenAITeacher({"base_url": fake.base_url, "model": "gpt-4o", "concurrency": CONCURRENCY,
                             "max_retries": 0, "timeout_s": 20})
    env = environment(teacher, {}, tmp / cache, concurrency=CONCURRENCY, max_steps=3, budget_usd=budget)
    df = samples(tmp, [{"question": f"What is 12 + 5? ({i})", "answer": "17"} for i in range(ROWS)])
    return stages.run_rationales(df, env)


def spend(tmp: Path, cache: str) -> float:
    return recorded_spend(ResultCache(None, "teacher", 0, work_dir=tmp / cache / "cache"))


def test_a_cap_at_half_the_cost_stops_near_it_and_a_higher_cap_resumes_without_repeats(
        server: FakeOpenAI, tmp_path: Path) -> None:
    with FakeOpenAI(reply=reply, usage=USAGE) as uncapped_server:
        uncapped = run(uncapped_server, tmp_path, "uncapped", None)
        uncapped_requests = uncapped_server.total
    assert uncapped["status"].to_list() == ["ok"] * ROWS and uncapped_requests == 2 * ROWS
    estimated = stages.teacher_totals(uncapped)["cost_usd"]
    assert estimated == pytest.approx(2 * ROWS * PER_REQUEST)

    cap = estimated / 2
    capped = run(server, tmp_path, "mine", cap)
    spent = spend(tmp_path, "mine")
    statuses = capped["status"].value_counts().to_dicts()
    assert cap <= spent <= 1.05 * cap, (spent, cap)
    assert {s["status"] for s in statuses} == {"ok", "budget_exhausted"}, statuses  # none failed
    stopped = capped.filter(pl.col("status") == "budget_exhausted")
    assert stopped["failure"].unique().to_list() == ["budget_exhausted"]
    assert "raise stages.budget_usd" in stopped["failure_detail"][0]
    assert server.total == sum(server.counts.values()) and set(server.counts.values()) == {1}
    assert server.total * PER_REQUEST == pytest.approx(spent)  # every answer sent was recorded

    resumed = run(server, tmp_path, "mine", estimated * 2)
    assert resumed["status"].to_list() == ["ok"] * ROWS
    assert server.total == uncapped_requests and set(server.counts.values()) == {1}  # nothing asked twice
    assert spend(tmp_path, "mine") == pytest.approx(estimated)
    kept = capped.filter(pl.col("status") == "ok")
    again = resumed.filter(pl.col("sample_id").is_in(kept["sample_id"].implode()))
    assert kept["trajectory"].to_list() == again["trajectory"].to_list()  # finished rows as they were


def test_spend_counts_other_processes_answers(tmp_path: Path) -> None:
    """What another shard's cache recorded counts against this one's cap."""
    other = ResultCache(tmp_path / "store", "teacher", 1, work_dir=tmp_path / "w1")
    other.put("a" * 64, {"content": "{}", "cost_usd": 0.75})
    other.close()
    mine = ResultCache(tmp_path / "store", "teacher", 0, work_dir=tmp_path / "w0")
    budget = Budget(1.0, mine)
    assert budget.spent_usd == pytest.approx(0.75) and budget.allows()
    budget.charge(0.3)
    assert not budget.allows()
    mine.close()


# ------------------------------------------------------------------- a real build


def _project(tmp: Path, fake: FakeOpenAI, rows: int) -> Path:
    data = tmp / "qa.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i}", "q": f"What is 12 + 5? ({i})", "a": "17"}) + "\n"
                            for i in range(rows)))
    source = {"plugin": "qa_table", "options": {"path": str(data), "license": "CC0-1.0",
                                                "columns": {"id": "id", "question": "q", "answer": "a"}}}
    teacher = {"plugin": "openai", "options": {"base_url": fake.base_url, "model": "gpt-4o", "max_retries": 0,
                                               "timeout_s": 20, "concurrency": CONCURRENCY}}
    tools = {t: {"enabled": False} for t in ("ocr", "face_detection", "label_bbox", "image_caption")}
    return write_project(tmp, {"qa": source}, shards=2, tools=tools, teachers={"gpt": teacher},
                         stages={"teacher": "gpt", "max_steps": 3, "concurrency": CONCURRENCY})


def _build(cfg: Path, tmp: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DAGSTER_HOME": str(tmp / "home"), "COLUMNS": "200"}
    (tmp / "home").mkdir(exist_ok=True)
    return subprocess.run([str(Path(sys.executable).with_name("mmat")), "build", "--config", str(cfg),
                           "--select", "*rationales", "--workers", "1", *extra],
                          capture_output=True, text=True, env=env, timeout=400)


@pytest.mark.slow
def test_mmat_build_budget_exits_3_with_one_line_then_resumes(tmp_path: Path) -> None:
    rows = 60
    with FakeOpenAI(reply=reply, usage=USAGE) as fake:
        capped = _build(_project(tmp_path, fake, rows), tmp_path, "--budget", str(rows * PER_REQUEST))
        assert capped.returncode == BUDGET_EXIT_CODE, (capped.stdout + capped.stderr)[-3000:]
        lines = [line for line in capped.stderr.splitlines() if "budget reached" in line]
        assert len(lines) == 1 and "rerun" in lines[0], capped.stderr[-2000:]
        sent = fake.total
        assert 0 < sent < 2 * rows
        resumed = _build(tmp_path / "mmat.yaml", tmp_path, "--budget", str(4 * rows * PER_REQUEST))
        assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
        assert fake.total == 2 * rows and set(fake.counts.values()) == {1}  # one uncapped build's requests
