"""The deployment on a real instance: Dagster's storage on PostgreSQL, tables, media and caches
on S3 (a moto server), a ``dagster-daemon`` with the queued coordinator and the default run
launcher. A 32-shard backfill runs 4 runs at once (real OCR on TabMWP tables, the ``openai``
teacher against a fake server with latency, in this process so it counts every request).
Mid-way the daemon and one run are killed with SIGKILL; the daemon is restarted, the dead
run ends failed (failed by the code server that started it, or by hand where that server
went down first: the default launcher has no run-worker health check), and the backfill is
re-executed from failure through Dagster's own GraphQL mutation. At the end every shard of
foundation and rationales is materialized exactly once, every teacher request was answered
once, and the tables are the bytes a serial in-process build of the same project wrote.

Slow by nature (a serial build, then about ten runs, each its own processes): a few minutes
on two quiet cores; every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import dagster as dg
import pytest
import yaml

from tests.openai_fake_hooks import HookedFakeOpenAI, _hooked_handler
from tests.pg_instance import REPO, Daemon, Postgres, pg_tool, write_home
from tests.test_exactly_once import finish as finish_build
from tests.test_exactly_once import BUCKET, reply, s3_env, without_cached_flags, write_config

__all__ = ["s3_env"]  # the moto S3 fixture, shared with the exactly-once tests

N_PROBLEMS = 8
SHARDS, PER_RUN, AT_ONCE = 32, 4, 4
SELECT = "*rationales"
#: the request (counted across runs) at which the daemon and the run sending it are killed
KILL_AT = 6
LATENCY_S = 0.1
STEP_TIMEOUT_S = 900  # every wait below is bounded; generous: these 2 cores are shared
MMAT = str(Path(sys.executable).with_name("mmat"))
SHARD_ASSETS = ("foundation_samples", "rationales")

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(pg_tool("initdb") is None, reason="PostgreSQL is not installed (make postgres)")]


# ---------------------------------------------------------------------- the teacher


@dataclass
class Killer:
    """At the ``at``-th request: SIGKILL the daemon and the run worker that sent the request
    (found by the request's client socket), and leave that request unanswered."""

    at: int
    daemon: Daemon | None = None
    fired: threading.Event = field(default_factory=threading.Event)
    victim: int = 0
    dropped: str = ""
    seen: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, peer: tuple[str, int], digest: str) -> bool:
        with self.lock:
            self.seen += 1
            if self.fired.is_set() or self.daemon is None or self.seen < self.at:
                return False
            self.daemon.kill()
            self.victim = kill_run_worker(peer[1])
            self.dropped = digest
            self.fired.set()
            return True


def kill_run_worker(client_port: int) -> int:
    """SIGKILL the run worker whose process, or step process, holds the client end of
    ``client_port``, with its step processes; its pid."""
    import psutil

    owner = next(c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == client_port and c.pid)
    proc = run_worker_of(psutil.Process(owner))
    for p in [*proc.children(recursive=True), proc]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    return int(proc.pid)


def run_worker_of(proc: Any) -> Any:
    """The run worker above a process: the code server starts each run worker, and a run worker
    each step, as a ``multiprocessing`` spawn child; the run worker is the topmost of them."""
    def spawned(p: Any) -> bool:
        return "--multiprocessing-fork" in p.cmdline()

    assert spawned(proc), f"pid {proc.pid} is no run worker nor step: {proc.cmdline()}"
    while (parent := proc.parent()) is not None and spawned(parent):
        proc = parent
    return proc


@dataclass
class PeerFakeOpenAI(HookedFakeOpenAI):
    """The hooked fake server that also tells a hook which client socket a request came on."""

    on_peer: Any = None

    def start(self) -> PeerFakeOpenAI:
        fake = self

        class Handler(_hooked_handler(self)):  # type: ignore[misc]
            def do_POST(self) -> None:
                fake._current.peer = self.client_address
                super().do_POST()

        server = type("Server", (ThreadingHTTPServer,), {"request_queue_size": self.backlog, "daemon_threads": True})
        self._server = server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def fault_for(self, index: int, repeat: int, digest: str, body: dict[str, Any]) -> str | None:
        if self.on_peer is not None and self.on_peer(self._current.peer, digest):
            self._current.digest = digest
            return "__drop__"
        return super().fault_for(index, repeat, digest, body)


# ------------------------------------------------------------------------- helpers


def project(base: Path, base_url: str) -> Path:
    """The exactly-once tests' TabMWP project with 32 shards, 4 per run, one request at a time per
    run (so a killed run leaves no answered request behind it)."""
    path = write_config(base, base_url, N_PROBLEMS)
    cfg = yaml.safe_load(path.read_text())
    cfg["foundation"].update({"shards": SHARDS, "shards_per_run": PER_RUN})
    cfg["teachers"]["fake"]["options"]["concurrency"] = 1
    cfg["stages"]["concurrency"] = 1
    path.write_text(yaml.safe_dump(cfg))
    return path


def s3_client(env: dict[str, str]) -> Any:
    return boto3.client("s3", endpoint_url=env["MMAT_S3_ENDPOINT_URL"], region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def s3_keys(s3: Any) -> list[str]:
    return [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
            for o in page.get("Contents", [])]


def s3_outputs(s3: Any) -> dict[str, bytes]:
    """Every table and dataset file under the profile's root, by key."""
    return {k: s3.get_object(Bucket=BUCKET, Key=k)["Body"].read()
            for k in s3_keys(s3) if k.startswith(("run/tables/", "run/datasets/"))}


def wipe(s3: Any) -> None:
    for key in s3_keys(s3):
        s3.delete_object(Bucket=BUCKET, Key=key)


def mmat(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([MMAT, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen[str], timeout: float = STEP_TIMEOUT_S) -> tuple[int, dict[str, Any], str]:
    return finish_build(proc, timeout)


def wait_for(what: str, ready: Any, timeout: float, tail: Any = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {tail()}"
        time.sleep(0.5)


def reexecute_from_failure(backfill_id: str, env: dict[str, str]) -> str:
    """Dagster's "re-execute from failure" of a finished backfill (the UI's button): a new backfill
    of every targeted asset partition not materialized yet; its id."""
    query = ("mutation($id: String!) { reexecutePartitionBackfill(reexecutionParams: "
             "{parentRunId: $id, strategy: FROM_FAILURE}) { __typename "
             "... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } } }")
    out = subprocess.run([str(Path(sys.executable).with_name("dagster-graphql")), "-f", "definitions.py",
                          "-t", query, "-v", json.dumps({"id": backfill_id})],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT_S)
    assert out.returncode == 0, out.stderr[-3000:]
    # the CLI prints its code server's log lines around the result: read the one JSON object
    start = out.stdout.find('{"data"')
    assert start >= 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.JSONDecoder().raw_decode(out.stdout, start)[0]["data"]["reexecutePartitionBackfill"]
    assert result["__typename"] == "LaunchBackfillSuccess", result
    return str(result["backfillId"])


def materialized(instance: dg.DagsterInstance, asset: str) -> Counter[str | None]:
    """Successful materialization events per partition of ``asset``."""
    records = instance.fetch_materializations(dg.AssetKey(asset), limit=10_000).records
    return Counter(r.partition_key for r in records)


@pytest.fixture
def postgres() -> Iterator[Postgres]:
    with Postgres() as pg:
        yield pg


# ---------------------------------------------------------------------------- test


def test_a_backfill_survives_a_killed_daemon_and_run_and_pays_once(
        tmp_path: Path, postgres: Postgres, s3_env: dict[str, str]) -> None:
    killer = Killer(KILL_AT)
    s3 = s3_client(s3_env)
    with PeerFakeOpenAI(reply=reply, latency_s=LATENCY_S, on_peer=killer) as server:
        (tmp_path / "proj").mkdir()
        config = project(tmp_path / "proj", server.base_url)
        env = {**os.environ, **s3_env, "COLUMNS": "200", "MMAT_CONFIG": str(config), "MMAT_PROFILE": "prod"}
        build = ["build", "--config", str(config), "--profile", "prod", "--select", SELECT, "--json"]

        # the reference: a serial build in this machine's processes, on its own (sqlite) instance
        (tmp_path / "tmp-serial").mkdir()
        rc, serial, log = finish(mmat([*build, "--workers", "1"], {**env, "DAGSTER_HOME": str(tmp_path / "serial"),
                                                                    "TMPDIR": str(tmp_path / "tmp-serial")}))
        assert rc == 0 and serial.get("failed") == 0, log
        reference, paid = s3_outputs(s3), Counter(server.answered)
        assert paid and set(paid.values()) == {1} and killer.seen >= 2 * KILL_AT, (paid, killer.seen)
        wipe(s3)
        server.answered.clear()
        server.counts.clear()
        killer.seen = 0

        home = write_home(tmp_path / "home", postgres, AT_ONCE)
        (tmp_path / "tmp-runs").mkdir()
        denv = {**s3_env, "MMAT_PROFILE": "prod", "TMPDIR": str(tmp_path / "tmp-runs")}
        env["DAGSTER_HOME"] = str(home)
        daemons = [Daemon(home, config, tmp_path / "daemon.log", denv).start()]
        try:
            killer.daemon = daemons[0]
            launched = mmat([*build, "--launch"], env)
            wait_for("the kill", killer.fired.is_set, STEP_TIMEOUT_S, daemons[0].tail)
            daemons.append(Daemon(home, config, tmp_path / "daemon.log", denv).start())
            with dg.DagsterInstance.from_config(str(home)) as instance:
                dead = run_of_pid(instance, killer.victim)
                # the code server that started the worker may have seen it die and failed the run;
                # where it went down first, nothing can see it: the run is failed as an operator would
                if dead.status == dg.DagsterRunStatus.STARTED:
                    instance.report_run_failed(dead, "its run worker was killed (SIGKILL)")
                wait_for("the dead run to fail", lambda: getattr(instance.get_run_by_id(dead.run_id), "status", None)
                         == dg.DagsterRunStatus.FAILURE, STEP_TIMEOUT_S)
                rc, first, log = finish(launched)
                assert rc == 1 and first["backfill"], log  # the failed run reaches the exit code
                running_at_once = most_runs_at_once(instance)

            retry = reexecute_from_failure(first["backfill"], env)
            rc, second, log = finish(mmat([*build, "--follow", retry], env))
            assert rc == 0 and second.get("failed") == 0, log + daemons[-1].tail()

            with dg.DagsterInstance.from_config(str(home)) as instance:
                counts = {asset: materialized(instance, asset) for asset in SHARD_ASSETS}
                runs = instance.get_runs()
        finally:
            for d in daemons:
                d.stop()

    # every shard of every shard asset materialized exactly once
    shards = {f"{i:0{len(str(SHARDS - 1))}d}" for i in range(SHARDS)}  # keys as wide as the last shard's
    for asset, per_part in counts.items():
        assert set(per_part) == shards and set(per_part.values()) == {1}, (asset, per_part)
    assert sum(r.status == dg.DagsterRunStatus.FAILURE for r in runs) == 1 and dead.run_id in {r.run_id for r in runs}
    assert 1 < running_at_once <= AT_ONCE
    # each request answered once, and exactly the serial build's; the one left unanswered at the kill was resent
    assert server.answered == paid
    assert server.counts == paid + Counter({killer.dropped: 1})
    # the tables and dialogue files are the serial build's
    got = s3_outputs(s3)
    assert sorted(got) == sorted(reference)
    for key, data in got.items():
        if data != reference[key]:
            assert key.endswith(".parquet"), f"{key} differs from the serial build's"
            assert without_cached_flags(data).equals(without_cached_flags(reference[key])), key
    assert not [k for k in s3_keys(s3) if k.endswith(".lease")]


def run_of_pid(instance: dg.DagsterInstance, pid: int) -> dg.DagsterRun:
    """The run whose worker process had ``pid`` (the launcher's "Started process for run" event)."""
    for run in instance.get_runs():
        for entry in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
            if f"pid: {pid})" in (entry.message or "") or f"pid: {pid}" in (entry.user_message or ""):
                return run
    raise AssertionError(f"no run has worker pid {pid}")


def most_runs_at_once(instance: dg.DagsterInstance) -> int:
    """The most runs that were in progress at one moment, from their start and end times."""
    edges = []
    for record in instance.get_run_records():
        if record.start_time and record.end_time:
            edges += [(record.start_time, 1), (record.end_time, -1)]
    now = best = 0
    for _, step in sorted(edges):
        now += step
        best = max(best, now)
    return best
