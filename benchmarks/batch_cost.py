"""Online vs batch mode: requests, dollars and batches per turn for one shard.

N synthetic rows go through ``run_rationales`` twice with the ``openai`` teacher (model
``gpt-4o``, the default price table): once online against a fake chat-completions server,
once in batch mode against the fake Batch API (``tests/batch_fake.py``), each on a fresh
request cache. Each row takes two turns (a step that continues, then the final step; no
tools). Both servers answer with the same replies and the same token counts, so the
requests must be equal and the batch dollars half the online ones; the batch run should
send each turn as one batch (or as ``ceil(N / max_requests)`` at the request limit).

    python benchmarks/batch_cost.py [--rows 1000] [--max-requests 50000]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import polars as pl

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mmat_assets.engine import stages  # noqa: E402
from mmat_assets.engine.cache import ResultCache  # noqa: E402
from mmat_assets.engine.rationale import Environment, StageSettings  # noqa: E402
from mmat_plugins.teachers_openai import OpenAITeacher  # noqa: E402
from tests.batch_fake import FakeBatchAPI  # noqa: E402
from tests.openai_fake import FakeOpenAI  # noqa: E402
from tests.stage_fakes import samples, step  # noqa: E402

TURNS = 2


def reply(body: dict[str, Any]) -> str:
    """First turn: a step that continues without tools; second: the final step."""
    final = any(m["role"] == "assistant" for m in body["messages"])
    return json.dumps(step("12 + 5 = 17. So the answer is 17." if final else "Reading the question.", final=final))


def run(rows: pl.DataFrame, base_url: str, mode: str, max_requests: int, work: Path) -> tuple[pl.DataFrame, float]:
    teacher = OpenAITeacher({"base_url": base_url, "model": "gpt-4o", "mode": mode, "concurrency": 64,
                             "max_retries": 0, "batch": {"max_requests": max_requests, "poll_s": 0.05,
                                                         "poll_max_s": 0.2}})
    cache = lambda ns: ResultCache(None, ns, 0, work_dir=work / mode)  # noqa: E731
    env = Environment(teacher, teacher.name, {}, None, cache("tools"), cache("retrieval"), cache("teacher"),
                      Path, StageSettings(max_steps=TURNS + 1, concurrency=64))
    started = time.perf_counter()
    df = stages.run_rationales(rows, env)
    return df, time.perf_counter() - started


def dollars(df: pl.DataFrame) -> float:
    return sum(c["cost_usd"] for p in df["provenance"] for c in json.loads(p)["teacher_calls"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--max-requests", type=int, default=50_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = samples(work, [{"question": f"What is a + b? ({i})", "answer": "17"} for i in range(args.rows)])
        with FakeOpenAI(reply=reply) as fake:
            online, online_s = run(rows, fake.base_url, "online", args.max_requests, work)
            online_requests = fake.total
        with FakeBatchAPI(reply=reply) as fake_batch:
            batch, batch_s = run(rows, fake_batch.base_url, "batch", args.max_requests, work)
            batch_requests, sizes = sum(fake_batch.submissions.values()), fake_batch.batch_sizes
    ok = [df.filter(pl.col("status") == "ok").height for df in (online, batch)]
    usd = dollars(online), dollars(batch)
    print(f"rows: {args.rows}, turns per row: {TURNS}, samples ok: online {ok[0]}, batch {ok[1]}")
    print(f"requests: online {online_requests}, batch {batch_requests} "
          f"({'equal' if online_requests == batch_requests else 'DIFFERENT'})")
    print(f"dollars: online ${usd[0]:.4f}, batch ${usd[1]:.4f} (batch/online = {usd[1] / usd[0]:.3f})")
    print(f"batches: {len(sizes)} for {TURNS} turns = {len(sizes) / TURNS:g} per turn; sizes {sizes}")
    print(f"wall: online {online_s:.1f}s, batch {batch_s:.1f}s (fake servers, polling every 0.05-0.2s)")


if __name__ == "__main__":
    main()
