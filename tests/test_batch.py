"""Batch mode of the ``openai`` teacher against a local Batch-API-compatible server.

Each shard's turn k leaves as one batch; answers land in the request cache, so batch and
online runs of the same replies give the same tables (the batch price aside), a rerun
submits nothing, expired and failed items are submitted again a bounded number of times
before their rows are quarantined with the reason, and a run killed while polling resumes
polling its batches instead of submitting them again (``python -m tests.test_batch`` is
that run's worker process).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from upath import UPath

from mmat_assets.engine import stages
from mmat_assets.engine.cache import ResultCache
from mmat_assets.engine.rationale import Environment, StageSettings, TeacherRejected
from mmat_assets.contracts import TeacherError
from mmat_assets.toolkit.batch import BatchCollector, BatchLimits, batch_progress_under, split_lines
from mmat_plugins.judges_teacher import TeacherJudge
from mmat_plugins.teachers_openai import OpenAITeacher
from tests.batch_fake import FakeBatchAPI
from tests.openai_fake import FakeOpenAI
from tests.stage_fakes import EchoTool, samples, step
from tests.worker_proc import finish

REPO = Path(__file__).resolve().parents[1]
ROWS = 6
WORKER_TIMEOUT_S = 60
BUCKET = "mmat-batch"
# A turn leaves as soon as every live row waits; collect_s only bounds the wait for a row the
# engine did not count. Rows finish their tools one after another, and on a loaded machine two
# of them can be more than 0.2 s apart: a window that short split a turn's batch in two.
FAST = {"poll_s": 0.02, "poll_max_s": 0.05, "collect_s": 3.0}
PRICES = {"fake-teacher": {"input_per_1k": 0.0025, "output_per_1k": 0.01}}


def reply(body: dict[str, Any], conclusion: str = "a is 12 and b is 5, so 12 + 5 = 17. So the answer is 17.") -> str:
    """Turn 0 reads the table with OCR; turn 1 concludes; judges score and fill math gaps."""
    messages = body["messages"]
    if "strict reviewer" in json.dumps(messages[0]):
        return json.dumps({"reason": "a step is skipped", "thought": "12 + 5 = 17."})
    if "Score this" in json.dumps(messages[-1]):
        return json.dumps({"score": 0.75, "reasons": "coherent"})
    if not any(m["role"] == "assistant" for m in messages):
        return json.dumps(step("The image is a table; I read it.", ["ocr"]))
    return json.dumps(step(conclusion, final=True))


def gap_reply(body: dict[str, Any]) -> str:
    """A conclusion that computes nothing: reflection asks its math-gap judge."""
    return reply(body, "So the answer is 17.")


def teacher(base_url: str, mode: str = "batch", **batch: Any) -> OpenAITeacher:
    return OpenAITeacher({"base_url": base_url, "model": "fake-teacher", "mode": mode, "max_retries": 0,
                          "timeout_s": 20, "prices": PRICES, "batch": {**FAST, **batch}})


def environment(t: OpenAITeacher, cache_dir: Path, root: UPath | None = None) -> Environment:
    def cache(namespace: str) -> ResultCache:
        return ResultCache(root, namespace, 0, work_dir=cache_dir)

    return Environment(t, t.name, {"ocr": EchoTool()}, None, cache("tools"), cache("retrieval"), cache("teacher"),
                       Path, StageSettings(max_steps=3, concurrency=2))


def rationales(rows: pl.DataFrame, t: OpenAITeacher, cache_dir: Path, root: UPath | None = None) -> pl.DataFrame:
    env = environment(t, cache_dir, root)
    try:
        return stages.run_rationales(rows, env)
    finally:
        for cache in (env.tool_cache, env.retrieval_cache, env.request_cache):
            if cache is not None:
                cache.close()


def comparable(df: pl.DataFrame) -> pl.DataFrame:
    """The table without what differs by mode or by run: the price paid, cache hits."""
    def strip(prov: str) -> str:
        p = json.loads(prov)
        p["teacher_calls"] = [{k: v for k, v in c.items() if k not in {"cached", "cost_usd"}}
                              for c in p["teacher_calls"]]
        return json.dumps(p, sort_keys=True)

    return df.with_columns(pl.col("provenance").map_elements(strip, return_dtype=pl.String))


def spent(df: pl.DataFrame) -> float:
    return sum(c["cost_usd"] for p in df["provenance"] for c in json.loads(p)["teacher_calls"])


@pytest.fixture
def rows(tmp_path: Path) -> pl.DataFrame:
    return samples(tmp_path, [{"question": f"What is a + b? ({i})", "answer": "17"} for i in range(ROWS)])


@pytest.fixture
def online(rows: pl.DataFrame, tmp_path: Path) -> pl.DataFrame:
    with FakeOpenAI(reply=reply) as fake:
        return rationales(rows, teacher(fake.base_url, "online"), tmp_path / "online")


@pytest.fixture
def server() -> Iterator[FakeBatchAPI]:
    with FakeBatchAPI(reply=reply) as fake:
        yield fake


def assert_accounted(df: pl.DataFrame, n: int) -> None:
    """Every row came out, as a sample or failed with a reason and a detail."""
    assert df.height == n
    bad = df.filter(pl.col("status") != "ok")
    assert bad.filter(pl.col("failure").is_null() | pl.col("failure_detail").is_null()).height == 0


# ---------------------------------------------------------------------- the happy path


def test_each_turn_is_one_batch_and_output_matches_online(rows: pl.DataFrame, online: pl.DataFrame,
                                                          server: FakeBatchAPI, tmp_path: Path) -> None:
    t = teacher(server.base_url)
    env = environment(t, tmp_path / "batch")
    batch = stages.run_rationales(rows, env)

    assert batch.filter(pl.col("status") == "ok").height == ROWS
    meta = t.shard_metadata(env.request_cache)
    assert meta["batches"] == 2 and meta["batch_items"] == 2 * ROWS and meta["batch_status"] == "completed: 2"
    assert server.batch_sizes == [ROWS, ROWS]  # turn 0 of every row, then turn 1
    assert set(server.submissions.values()) == {1} and len(server.submissions) == 2 * ROWS
    assert server.total == 0  # nothing went online
    assert comparable(batch).equals(comparable(online))
    assert spent(batch) == pytest.approx(spent(online) / 2) and spent(online) > 0

    # a rerun on the same cache submits nothing: every answer is in the request cache
    again = rationales(rows, teacher(server.base_url), tmp_path / "batch")
    assert len(server.batch_sizes) == 2 and comparable(again).equals(comparable(batch))


def test_batch_status_reaches_the_progress_view_while_batches_run(rows: pl.DataFrame, server: FakeBatchAPI,
                                                                 tmp_path: Path) -> None:
    """The shard notes its batches beside its cache; the build's view reads them from outside."""
    import io
    import threading

    from rich.console import Console

    from mmat_assets.runner import BuildProgress

    root, started = UPath(tmp_path / "store"), time.time()
    folder = root / "teacher"
    server.hold = True
    done: list[pl.DataFrame] = []
    worker_thread = threading.Thread(target=lambda: done.append(rationales(rows, teacher(server.base_url),
                                                                           tmp_path / "cache", root)))
    worker_thread.start()
    try:
        deadline = time.monotonic() + WORKER_TIMEOUT_S
        while not batch_progress_under(folder, started).statuses and time.monotonic() < deadline:
            time.sleep(0.02)
        seen = batch_progress_under(folder, started)
        assert seen.statuses == {"in_progress": 1} and (seen.done, seen.total) == (0, ROWS)
        out = io.StringIO()
        view = BuildProgress(Console(file=out, force_terminal=False, width=200))
        view.watch_batches(lambda: batch_progress_under(folder, started).text())
        view.watch_spend(lambda: 0.0)
        with view:
            view.start(1)
            view.step("rationales [0]", ROWS, False)
        assert f"batches: 1 in_progress (0/{ROWS} requests in the open ones)" in out.getvalue()
    finally:
        server.hold = False
        worker_thread.join(WORKER_TIMEOUT_S)
    assert done and done[0].filter(pl.col("status") == "ok").height == ROWS
    assert batch_progress_under(folder, started).text() == "batches: 2 completed"
    assert batch_progress_under(folder, time.time() + 1).text() == ""  # a later build counts its own


def test_a_turn_over_the_request_limit_is_split(rows: pl.DataFrame, server: FakeBatchAPI, tmp_path: Path) -> None:
    df = rationales(rows, teacher(server.base_url, max_requests=4), tmp_path / "c")
    assert df.filter(pl.col("status") == "ok").height == ROWS
    assert server.batch_sizes == [4, 2, 4, 2]
    assert split_lines([b"x" * 10] * 5, 100, 25) == [[b"x" * 10] * 2, [b"x" * 10] * 2, [b"x" * 10]]


def test_quality_judge_requests_go_as_one_batch(rows: pl.DataFrame, server: FakeBatchAPI, tmp_path: Path) -> None:
    t = teacher(server.base_url)
    env = environment(t, tmp_path / "c")
    df = stages.run_rationales(rows, env)
    judge = TeacherJudge()
    judge.attach_teachers({"openai": t})
    scored = stages.score_quality(df, judge, env)
    assert scored["quality"].to_list() == [0.75] * ROWS
    assert server.batch_sizes == [ROWS, ROWS, ROWS]


def test_reflection_judges_go_as_one_batch_and_match_online(rows: pl.DataFrame, tmp_path: Path) -> None:
    def reflected(fake: FakeOpenAI, mode: str) -> pl.DataFrame:
        env = environment(teacher(fake.base_url, mode), tmp_path / mode)
        return stages.run_reflections(stages.run_rationales(rows, env), env)

    with FakeOpenAI(reply=gap_reply) as fake:
        online = reflected(fake, "online")
    with FakeBatchAPI(reply=gap_reply) as server:
        batch = reflected(server, "batch")
    assert batch["reflected"].to_list() == [True] * ROWS
    assert server.batch_sizes == [ROWS, ROWS, ROWS]  # two turns, then every row's math-gap judge
    assert comparable(batch).equals(comparable(online))


def test_the_key_never_reaches_outputs_or_the_cache(rows: pl.DataFrame, tmp_path: Path) -> None:
    key = "sk-batch-secret-0123456789"

    def echo(body: dict[str, Any]) -> str:
        return json.dumps(step(f"The key is {key}. So the answer is 17.", final=True))

    with FakeBatchAPI(reply=echo) as server:
        t = OpenAITeacher({**teacher(server.base_url).options.model_dump(), "api_key": key})
        df = rationales(rows, t, tmp_path / "c")
    assert df.filter(pl.col("status") == "ok").height == ROWS
    assert key not in df.write_json() and "The key is ***" in df["trajectory"][0]
    assert all(key.encode() not in p.read_bytes() for p in (tmp_path / "c").rglob("*") if p.is_file())


# ---------------------------------------------------------------------- faults


class Transport:
    """An in-memory Batch API whose uploads fail from the ``fail_from``-th one on."""

    def __init__(self, fail_from: int) -> None:
        self.fail_from, self.files, self.created = fail_from, list[bytes](), list[str]()

    async def upload(self, data: bytes) -> str:
        if len(self.files) >= self.fail_from:
            raise RuntimeError("upload refused")
        self.files.append(data)
        return f"file-{len(self.files) - 1}"

    async def create(self, file_id: str) -> str:
        self.created.append(file_id)
        return f"batch-{file_id}"

    async def find(self, file_id: str) -> str | None:
        return None

    async def retrieve(self, batch_id: str) -> dict[str, Any]:
        return {"status": "completed", "output_file_id": batch_id.removeprefix("batch-")}

    async def content(self, file_id: str) -> bytes:
        lines = [json.loads(line) for line in self.files[int(file_id.removeprefix("file-"))].splitlines()]
        return b"".join(json.dumps({"custom_id": line["custom_id"], "response": {
            "status_code": 200, "body": {"echo": line["body"]["n"]}}}).encode() + b"\n" for line in lines)


def test_a_failed_upload_fails_only_what_it_carried() -> None:
    async def go() -> list[Any]:
        collector = BatchCollector(Transport(fail_from=1), BatchLimits(max_requests=2, poll_s=0.01))
        collector.set_live(4, None)
        sends = [collector.send(f"r{n}", {"n": n}) for n in range(4)]
        return await asyncio.gather(*sends, return_exceptions=True)

    first, second, third, fourth = asyncio.run(go())
    assert [first.body, second.body] == [{"echo": 0}, {"echo": 1}]
    assert isinstance(third, TeacherError) and third.reason == "batch_failed" and "upload refused" in str(third)
    assert isinstance(fourth, TeacherError)


def test_expired_and_failed_items_are_resubmitted_then_quarantined(rows: pl.DataFrame, online: pl.DataFrame,
                                                                   tmp_path: Path) -> None:
    ids: list[str] = []

    def row_of(cid: str) -> int:
        if cid not in ids:
            ids.append(cid)
        return ids.index(cid)

    # turn-0 item of row 0 always expires; row 1's fails once; row 2's expires once
    def expire(cid: str, tries: int) -> bool:
        return row_of(cid) == 0 or (row_of(cid) == 2 and tries == 0)

    def fail_item(cid: str, tries: int) -> bool:
        return row_of(cid) == 1 and tries == 0

    with FakeBatchAPI(reply=reply, expire=expire, fail_item=fail_item) as server:
        df = rationales(rows, teacher(server.base_url, resubmits=2), tmp_path / "c")

    assert_accounted(df, ROWS)
    failed = df.filter(pl.col("status") != "ok")
    assert failed["failure"].to_list() == ["teacher_batch_expired"]
    assert "batch_expired" in failed["failure_detail"][0] and "3 submission" in failed["failure_detail"][0]
    assert server.submissions[ids[0]] == 3  # first submission and two more, then quarantined
    assert server.submissions[ids[1]] == 2 and server.submissions[ids[2]] == 2
    assert max(server.submissions.values()) == 3
    # the rows that came through are the online rows, byte for byte
    ok = df.filter(pl.col("status") == "ok")
    assert comparable(ok).equals(comparable(online.filter(pl.col("sample_id").is_in(ok["sample_id"].to_list()))))


def test_a_failed_batch_is_submitted_again(rows: pl.DataFrame, online: pl.DataFrame, tmp_path: Path) -> None:
    with FakeBatchAPI(reply=reply, fail_batch=lambda index: index == 0) as server:
        df = rationales(rows, teacher(server.base_url), tmp_path / "c")
    assert server.batch_sizes == [ROWS, ROWS, ROWS]  # turn 0 failed whole, again, then turn 1
    assert set(server.submissions.values()) == {1, 2}
    assert comparable(df).equals(comparable(online))


def test_a_batch_failing_every_time_quarantines_its_rows(rows: pl.DataFrame, tmp_path: Path) -> None:
    with FakeBatchAPI(reply=reply, fail_batch=lambda index: True) as server:
        df = rationales(rows, teacher(server.base_url, resubmits=1), tmp_path / "c")
    assert_accounted(df, ROWS)
    assert df["failure"].to_list() == ["teacher_batch_failed"] * ROWS
    assert "injected" in df["failure_detail"][0]
    assert set(server.submissions.values()) == {2}


def test_a_cancelled_batch_is_submitted_again(rows: pl.DataFrame, online: pl.DataFrame, server: FakeBatchAPI,
                                              tmp_path: Path) -> None:
    server.hold = True
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(rationales, rows, teacher(server.base_url), tmp_path / "c")
        deadline = time.monotonic() + WORKER_TIMEOUT_S
        while not server.batches and time.monotonic() < deadline:
            time.sleep(0.02)
        cancel = urllib.request.Request(f"{server.base_url}/batches/batch_0/cancel", data=b"{}", method="POST")
        with urllib.request.urlopen(cancel, timeout=10) as resp:
            assert json.loads(resp.read())["status"] == "cancelled"
        server.hold = False
        df = run.result(timeout=WORKER_TIMEOUT_S)
    assert server.batch_sizes == [ROWS, ROWS, ROWS]  # turn 0 cancelled, turn 0 again, turn 1
    assert sorted(server.submissions.values()) == [1] * ROWS + [2] * ROWS
    assert comparable(df).equals(comparable(online))


def test_a_rejected_response_format_steps_down_in_the_next_batch(rows: pl.DataFrame, tmp_path: Path) -> None:
    with FakeOpenAI(reply=reply, reject_formats={"json_schema"}) as fake:
        online = rationales(rows, teacher(fake.base_url, "online"), tmp_path / "online")
    with FakeBatchAPI(reply=reply, reject_formats={"json_schema"}) as server:
        t = teacher(server.base_url)
        batch = rationales(rows, t, tmp_path / "batch")
    assert t.json_mode == "json_object"
    assert server.batch_sizes == [ROWS, ROWS, ROWS]  # 400s, the same turn as json_object, turn 1
    assert all(cid.endswith(".1") for cid in list(server.submissions)[ROWS:2 * ROWS])
    assert comparable(batch).equals(comparable(online))


def test_a_rejected_key_stops_the_shard(rows: pl.DataFrame, tmp_path: Path) -> None:
    with FakeBatchAPI(reply=reply, reject_key=True) as server, pytest.raises(TeacherRejected, match="API key"):
        rationales(rows, teacher(server.base_url), tmp_path / "c")


# ---------------------------------------------------------------------- kill -9 while polling


def worker(rows: Path, out: Path, cache: Path, base_url: str, s3: str = "") -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "tests.test_batch", str(rows), str(out), str(cache), base_url,
                             *(["--s3-endpoint", s3] if s3 else [])],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    url = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": url}.items():
            mp.setenv(key, value)
        import boto3

        boto3.client("s3", endpoint_url=url).create_bucket(Bucket=BUCKET)
        try:
            yield url
        finally:
            moto.stop()


@pytest.mark.slow
@pytest.mark.parametrize("store", ["local", "s3"])
def test_a_run_killed_while_polling_resumes_polling(rows: pl.DataFrame, online: pl.DataFrame, server: FakeBatchAPI,
                                                   tmp_path: Path, store: str, request: pytest.FixtureRequest) -> None:
    path, cache = tmp_path / "rows.parquet", tmp_path / "cache"
    endpoint = request.getfixturevalue("s3") if store == "s3" else ""
    rows.write_parquet(path)
    server.hold = True  # batches stay in progress: the worker polls until it is killed
    proc = worker(path, tmp_path / "killed.parquet", cache, server.base_url, endpoint)
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    while server.polls < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    rc, log = finish(proc)
    assert rc == -signal.SIGKILL and server.polls >= 3, log
    assert server.batch_sizes == [ROWS]

    server.hold = False
    # on S3 the rerun is another machine: a fresh local cache, only the store in common
    resume_cache = tmp_path / "elsewhere" if endpoint else cache
    rc, log = finish(worker(path, tmp_path / "resumed.parquet", resume_cache, server.base_url, endpoint))
    assert rc == 0, log
    resumed = pl.read_parquet(tmp_path / "resumed.parquet")
    assert set(server.submissions.values()) == {1} and len(server.submissions) == 2 * ROWS
    assert server.batch_sizes == [ROWS, ROWS]  # turn 0 polled again, not resubmitted
    assert comparable(resumed).equals(comparable(online))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run one shard's rationales in batch mode.")
    parser.add_argument("rows", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("cache_dir", type=Path)
    parser.add_argument("base_url")
    parser.add_argument("--s3-endpoint", default="", help="keep the caches under s3://BUCKET/run there")
    args = parser.parse_args(argv)
    root = UPath(f"s3://{BUCKET}/run", endpoint_url=args.s3_endpoint) if args.s3_endpoint else None
    rationales(pl.read_parquet(args.rows), teacher(args.base_url), args.cache_dir, root).write_parquet(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
