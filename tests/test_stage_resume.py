"""Resume after SIGKILL: a rerun repeats no answered teacher request and ends as a clean run.

A worker process runs the rationale stage on 12 rows (24 teacher requests, one in flight
at a time). The fake server kills it with SIGKILL as request ``KILL_AT`` arrives, before
answering. The rerun on the same cache must send only what was never answered, and its
table must equal that of an uninterrupted run on a fresh cache against a fresh server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from mmat_assets.engine import stages
from tests.openai_fake_hooks import HookedFakeOpenAI
from tests.stage_fakes import samples, step
from tests.worker_proc import finish

REPO = Path(__file__).resolve().parents[1]
ROWS = 12
REQUESTS = ROWS * 2  # read with OCR, then answer
KILL_AT = 11  # arrival index: 11 requests answered and stored, the 12th in flight


def reply(body: dict[str, Any]) -> str:
    if not any(m["role"] == "assistant" for m in body["messages"]):
        return json.dumps(step("The image is a table; I read it.", ["ocr"]))
    return json.dumps(step("a is 12 and b is 5, so 12 + 5 = 17. So the answer is 17.", final=True))


class Killer:
    """Kills the armed worker when request ``at`` arrives; that request goes unanswered."""

    def __init__(self, at: int) -> None:
        self.at, self.pid, self.fired = at, 0, False

    def __call__(self, index: int, body: dict[str, Any]) -> bool:
        if index != self.at or not self.pid:
            return False
        os.kill(self.pid, signal.SIGKILL)
        self.fired, self.pid = True, 0
        return True


def worker(rows: Path, out: Path, cache: Path, base_url: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "tests.resume_worker", str(rows), str(out), str(cache), base_url],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def comparable(df: pl.DataFrame) -> pl.DataFrame:
    """The table without what legitimately differs per run: whether a call came from cache."""
    def strip(prov: str) -> str:
        p = json.loads(prov)
        p["teacher_calls"] = [{k: v for k, v in c.items() if k != "cached"} for c in p["teacher_calls"]]
        return json.dumps(p, sort_keys=True)

    return df.with_columns(pl.col("provenance").map_elements(strip, return_dtype=pl.String))


@pytest.fixture
def rows(tmp_path: Path) -> Path:
    path = tmp_path / "rows.parquet"
    samples(tmp_path, [{"question": f"What is a + b? ({i})", "answer": "17"} for i in range(ROWS)]).write_parquet(path)
    return path


@pytest.fixture
def killing_server() -> Iterator[tuple[HookedFakeOpenAI, Killer]]:
    killer = Killer(KILL_AT)
    with HookedFakeOpenAI(reply=reply, latency_s=0.02, on_receive=killer) as fake:
        yield fake, killer


@pytest.mark.slow
def test_a_killed_shard_resumes_without_repeating_answered_requests(
        rows: Path, tmp_path: Path, killing_server: tuple[HookedFakeOpenAI, Killer]) -> None:
    fake, killer = killing_server
    cache = tmp_path / "cache"

    proc = worker(rows, tmp_path / "killed.parquet", cache, fake.base_url)
    killer.pid = proc.pid
    rc, log = finish(proc)
    assert killer.fired and rc == -signal.SIGKILL, log
    assert not (tmp_path / "killed.parquet").exists()
    assert fake.total == KILL_AT + 1 and sum(fake.answered.values()) == KILL_AT

    rc, log = finish(worker(rows, tmp_path / "resumed.parquet", cache, fake.base_url))
    assert rc == 0, log
    resumed = pl.read_parquet(tmp_path / "resumed.parquet")

    # every request answered exactly once over both runs; only the killed one arrived twice
    assert len(fake.answered) == REQUESTS and set(fake.answered.values()) == {1}
    assert sorted(fake.counts.values()) == [1] * (REQUESTS - 1) + [2]
    assert fake.total - (KILL_AT + 1) == REQUESTS - KILL_AT  # the rerun sent only the rest
    assert stages.teacher_totals(resumed)["teacher_calls_cached"] == KILL_AT

    with HookedFakeOpenAI(reply=reply) as clean_server:
        rc, log = finish(worker(rows, tmp_path / "clean.parquet", tmp_path / "fresh-cache", clean_server.base_url))
        assert rc == 0, log
        assert set(clean_server.answered) == set(fake.answered)  # the very same requests
    clean = pl.read_parquet(tmp_path / "clean.parquet")

    assert clean["status"].to_list() == ["ok"] * ROWS
    assert stages.teacher_totals(clean)["teacher_calls_cached"] == 0
    assert comparable(resumed).equals(comparable(clean))
