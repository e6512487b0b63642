"""``mmat build --launch``: the selection as a backfill the Dagster daemon runs, k shards per run,
one run per shard at a time; and the instance configuration that holds a second run of a shard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml

from mmat_assets.cli import DAGSTER_YAML, ensure_dagster_home
from tests.conftest import REPO, write_project
from tests.test_cli import _run_build

SHARDS, PER_RUN = 16, 4
DAEMON_START_S = 180
#: The daemon's loops wait 30 s between iterations; a test need not (only the test's daemon).
FAST_DAEMON = ("import dagster._daemon.controller as c; c.DEFAULT_DAEMON_INTERVAL_SECONDS = 2; "
               "from dagster._daemon.cli import main; main()")


def qa_project(tmp: Path) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    data = REPO / "tests" / "fixtures" / "qa_table"
    return write_project(tmp, {"qa": {"plugin": "qa_table", "options": {
        "path": str(data / "qa.jsonl"), "license": "CC0-1.0", "image_root": str(data),
        "columns": {"question": "prompt", "answer": "gold", "id": "qid", "image": "img"}}}},
        shards=SHARDS, foundation={"shards_per_run": PER_RUN})


def home_of(cfg: Path) -> Path:
    home = cfg.parent / "home"
    old = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = str(home)
    try:
        ensure_dagster_home(cfg)
    finally:
        if old is None:
            os.environ.pop("DAGSTER_HOME", None)
        else:
            os.environ["DAGSTER_HOME"] = old
    return home


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A project and a ``dagster-daemon run`` serving it from its own Dagster home."""
    cfg = qa_project(tmp_path / "launched")
    home = home_of(cfg)
    env = {**os.environ, "DAGSTER_HOME": str(home), "MMAT_CONFIG": str(cfg)}
    log = (tmp_path / "daemon.log").open("w")
    proc = subprocess.Popen([sys.executable, "-c", FAST_DAEMON, "run", "-f", "definitions.py"], cwd=REPO,
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with dg.DagsterInstance.from_config(str(home)) as instance:
            deadline = time.monotonic() + DAEMON_START_S
            from mmat_assets.launch import missing_daemons

            while missing_daemons(instance):
                assert proc.poll() is None, (tmp_path / "daemon.log").read_text()[-3000:]
                assert time.monotonic() < deadline, (tmp_path / "daemon.log").read_text()[-3000:]
                time.sleep(1)
        yield cfg, home
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the daemon, its code server and any run it started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()


def comparable(summary: dict[str, Any]) -> list[dict[str, Any]]:
    return [{k: a[k] for k in ("asset", "partitions", "rows", "status", "counts", "errors")}
            for a in summary["assets"]]


@pytest.mark.slow
def test_launch_runs_the_selection_as_batched_backfill_runs(daemon: tuple[Path, Path], tmp_path: Path) -> None:
    cfg, home = daemon
    local = qa_project(tmp_path / "local")
    serial = _run_build(local, local.parent / "home", "--select", "group:foundation", "--json", "--workers", "1",
                        timeout=300)
    assert serial.returncode == 0, serial.stdout[-3000:] + serial.stderr[-3000:]

    out = _run_build(cfg, home, "--select", "group:foundation", "--launch", "--json", timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads(out.stdout)
    assert comparable(summary) == comparable(json.loads(serial.stdout))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/backfill": summary["backfill"]}))
        shard_runs = [r for r in runs if dg.AssetKey("foundation_samples") in (r.asset_selection or ())]
        assert len(shard_runs) == SHARDS // PER_RUN and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
        ranges = sorted((r.tags["dagster/asset_partition_range_start"], r.tags["dagster/asset_partition_range_end"])
                        for r in shard_runs)
        assert ranges == [("00", "03"), ("04", "07"), ("08", "11"), ("12", "15")]
        # every step ran in its run worker's own process (deployment.executor: in_process)
        for run in shard_runs:
            started = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.RUN_START)
            (worker,) = {e.dagster_event.pid for e in started if e.dagster_event}
            steps = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_START)
            assert steps and {e.dagster_event.pid for e in steps if e.dagster_event} == {worker}, run.run_id
        # every shard materialized exactly once, each with its own row count
        mats = instance.fetch_materializations(dg.AssetKey("foundation_samples"), limit=1000).records
        parts = sorted(m.partition_key for m in mats)
        assert parts == [f"{i:02d}" for i in range(SHARDS)]
        rows = sum(m.asset_materialization.metadata["dagster/row_count"].value for m in mats)
    assert rows == next(a["rows"] for a in summary["assets"] if a["asset"] == "foundation_samples") > 0
    assert summary["runs"] == len(runs)


def test_launch_without_a_daemon_says_how_to_start_one(tmp_path: Path) -> None:
    cfg = qa_project(tmp_path)
    out = _run_build(cfg, home_of(cfg), "--select", "group:foundation", "--launch", timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    text = " ".join(out.stderr.split())
    assert "--launch needs a Dagster daemon" in text and "dagster-daemon run" in text, text


def _run(instance: dg.DagsterInstance, tags: dict[str, str]) -> dg.DagsterRun:
    return instance.create_run_for_job(dg.GraphDefinition("noop").to_job(), tags=tags)


def test_the_instance_holds_a_second_run_of_a_shard_until_the_first_ends(tmp_path: Path) -> None:
    """The limits mmat writes load into a queued coordinator, and Dagster's own dequeue
    counter holds back a run whose shard (or batch) is already running, and only that."""
    from dagster._core.run_coordinator import QueuedRunCoordinator
    from dagster._utils.tags import TagConcurrencyLimitsCounter

    home = home_of(qa_project(tmp_path))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        coordinator = instance.run_coordinator
        assert isinstance(coordinator, QueuedRunCoordinator)
        limits = coordinator.get_run_queue_config().tag_concurrency_limits
        batch = {"dagster/asset_partition_range_start": "00", "dagster/asset_partition_range_end": "03"}
        running = [_run(instance, batch), _run(instance, {"dagster/partition": "05"})]
        counter = TagConcurrencyLimitsCounter(limits, running)
        assert counter.is_blocked(_run(instance, batch))  # the same batch again: queued
        assert counter.is_blocked(_run(instance, {"dagster/partition": "05"}))  # the same shard again
        assert not counter.is_blocked(_run(instance, {"dagster/partition": "06"}))
        assert not counter.is_blocked(_run(instance, {**batch, "dagster/asset_partition_range_start": "04"}))
    # the team deployment's instance holds shards apart the same way
    infra = yaml.safe_load((REPO / "infra" / "dagster.yaml").read_text())["run_coordinator"]
    local = yaml.safe_load(DAGSTER_YAML)["run_coordinator"]
    assert infra["class"] == local["class"]  # (the team's also caps runs in progress)
    assert infra["config"]["tag_concurrency_limits"] == local["config"]["tag_concurrency_limits"]


def test_a_run_of_several_shards_records_each_shard_on_its_own(tmp_path: Path) -> None:
    """A batched run (a multi_run backfill's, several shard keys in one run) writes each shard
    where a run of that shard alone would, and records each with its own path and row count."""
    from mmat_assets.runner import _definitions, execute

    cfg = qa_project(tmp_path)
    defs = _definitions(cfg, "local")[0]
    with dg.DagsterInstance.ephemeral() as instance:
        source = [k for k in defs.resolve_asset_graph().get_all_asset_keys() if "qa" in k.path and len(k.path) > 1]
        assert not execute(defs, source, None, instance).failures
        assets = list(defs.assets or []) + list(defs.asset_checks or [])
        result = dg.materialize(assets, selection=[dg.AssetKey("foundation_samples")], instance=instance,
                                resources=defs.resources, raise_on_error=False,
                                tags={"dagster/asset_partition_range_start": "00",
                                      "dagster/asset_partition_range_end": "03"})
        assert result.success
        mats = {m.partition_key: m.asset_materialization for m in instance.fetch_materializations(
            dg.AssetKey("foundation_samples"), limit=100).records}
    assert sorted(mats) == ["00", "01", "02", "03"]
    paths = {part: Path(str(mat.metadata["path"].value)) for part, mat in mats.items()}
    assert all(path.stem == part and path.is_file() for part, path in paths.items()), paths
    import polars as pl

    for part, mat in mats.items():
        assert mat.metadata["dagster/row_count"].value == pl.read_parquet(paths[part]).height


def _job_executors(cfg: Path) -> dict[str, str]:
    """The executor each kind of launched run gets: a backfill's (the implicit asset job) and
    each sized deployment job's."""
    from mmat_assets.runner import _definitions

    defs = _definitions(cfg, "local")[0]
    jobs = {"backfill": defs.resolve_implicit_global_asset_job_def()}
    jobs |= {name: defs.resolve_job_def(name) for name in ("foundation_shards", "teacher_shards", "training")}
    return {name: job.executor_def.name for name, job in jobs.items()}


def test_launched_runs_execute_their_steps_in_the_run_worker(tmp_path: Path) -> None:
    """A launched run executes its steps in its run worker's process (a process per step costs
    seconds of start-up each); ``deployment.executor`` brings back a process per step."""
    assert set(_job_executors(qa_project(tmp_path / "default")).values()) == {dg.in_process_executor.name}
    cfg = qa_project(tmp_path / "multi")
    doc = yaml.safe_load(cfg.read_text())
    cfg.write_text(yaml.safe_dump({**doc, "deployment": {"executor": "multiprocess"}}))
    assert set(_job_executors(cfg).values()) == {dg.multiprocess_executor.name}
    doc["deployment"] = {"executor": "k8s"}
    cfg.write_text(yaml.safe_dump(doc))
    with pytest.raises(Exception, match="executor"):
        _job_executors(cfg)


def test_the_instances_monitor_their_runs(tmp_path: Path) -> None:
    """mmat's own dagster.yaml and the team deployment's turn on Dagster's run monitoring: a run
    whose worker never comes up, or that hangs while being canceled, is ended by the daemon, and
    the pool slots of a run that ended without freeing them are given back."""
    home = home_of(qa_project(tmp_path))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.run_monitoring_enabled
        assert 0 < instance.run_monitoring_start_timeout_seconds <= 600
        assert 0 < instance.run_monitoring_cancel_timeout_seconds <= 600
        assert 0 < instance.run_monitoring_poll_interval_seconds <= 120
        assert 0 < instance.run_monitoring_settings["free_slots_after_run_end_seconds"] <= 600
    local = yaml.safe_load(DAGSTER_YAML)["run_monitoring"]
    for path in ("dagster.yaml", "ecs/dagster.yaml", "k8s/dagster.yaml"):
        assert yaml.safe_load((REPO / "infra" / path).read_text())["run_monitoring"] == local, path


@pytest.mark.slow
def test_the_daemon_fails_a_run_whose_worker_never_came_up(tmp_path: Path) -> None:
    """On a real instance (PostgreSQL, the team deployment's run monitoring, a daemon serving
    the project): a launched run whose worker died before it started the run is failed by the
    daemon within a bounded wait, instead of staying STARTING forever. The start timeout is
    shortened here; the keys are infra/dagster.yaml's."""
    from dagster._core.events import DagsterEvent, DagsterEventType

    from tests.pg_instance import Daemon, Postgres, pg_tool, write_home

    if pg_tool("initdb") is None:
        pytest.skip("PostgreSQL is not installed (make postgres)")
    cfg = qa_project(tmp_path / "proj")
    with Postgres() as pg:
        home = write_home(tmp_path / "home", pg, 2)
        doc = yaml.safe_load((home / "dagster.yaml").read_text())
        assert doc["run_monitoring"]["enabled"] is True
        doc["run_monitoring"] |= {"start_timeout_seconds": 2, "poll_interval_seconds": 1}
        (home / "dagster.yaml").write_text(yaml.safe_dump(doc))
        daemon = Daemon(home, cfg, tmp_path / "daemon.log").start()
        try:
            with dg.DagsterInstance.from_config(str(home)) as instance:
                run = _run(instance, {"dagster/partition": "00"})
                # what instance.launch_run records before the launcher starts the worker
                instance.report_dagster_event(DagsterEvent(event_type_value=DagsterEventType.RUN_STARTING.value,
                                                           job_name=run.job_name), run_id=run.run_id)
                deadline = time.monotonic() + 90
                while (status := instance.get_run_by_id(run.run_id).status) == dg.DagsterRunStatus.STARTING:
                    assert time.monotonic() < deadline, "the run is still STARTING: " + daemon.tail()
                    time.sleep(1)
                assert status == dg.DagsterRunStatus.FAILURE
                failed = [e.message for e in instance.all_logs(run.run_id, of_type=DagsterEventType.RUN_FAILURE)]
                assert any("to start" in (m or "") for m in failed), failed
        finally:
            daemon.stop()
