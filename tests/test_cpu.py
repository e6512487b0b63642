"""A build's workers share the cores: each one's models are limited to its share of threads
(``mmat_assets.toolkit.cpu``), so N workers do not start N x cores threads between them."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.utils import make_new_run_id

from mmat_assets.toolkit import cpu
from tests.test_workers import tabmwp_project


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """None of the variables set; whatever a test sets them to (``limit_threads`` writes
    ``os.environ`` itself) is undone after it, so the rest of the session keeps its threads."""
    for name in (cpu.THREADS_ENV, *cpu.LIBRARY_ENVS):
        monkeypatch.setenv(name, "")  # recorded as it was, so the undo restores (or removes) it
        monkeypatch.delenv(name)
    return monkeypatch


def test_nothing_limits_the_threads_unless_the_variable_holds_a_whole_number(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setattr(cpu, "cores", lambda: os.cpu_count() or 1)  # no quota, no affinity
    assert cpu.cpu_threads() is None
    for bad in ("0", "-2", "two", "1.5", ""):
        clean_env.setenv(cpu.THREADS_ENV, bad)
        assert cpu.cpu_threads() is None, bad
    clean_env.setenv(cpu.THREADS_ENV, " 3 ")
    assert cpu.cpu_threads() == 3


@pytest.mark.parametrize(("files", "expected"), [
    ({"cpu.max": "150000 100000\n"}, 2),  # cgroup v2, 1.5 CPUs: rounded up
    ({"cpu.max": "50000 100000\n"}, 1),
    ({"cpu.max": "max 100000\n"}, None),  # v2 without a quota
    ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({"cpu.max": "garbage"}, None),
    ({}, None),  # no cgroup file system
], ids=["v2-1.5", "v2-0.5", "v2-max", "v1-4", "v1-none", "unreadable", "none"])
def test_a_cgroup_quota_is_read_as_whole_cpus(tmp_path: Path, files: dict[str, str], expected: int | None) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cpu.quota_cores(tmp_path) == expected


def test_a_quota_below_the_machines_cpus_limits_the_threads(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A run pod limited to 2 CPUs on a 16-core node: its models get 2 threads, not 16."""
    (tmp_path / "cpu.max").write_text("200000 100000\n")
    clean_env.setattr(cpu, "CGROUP_ROOT", tmp_path)
    clean_env.setattr(cpu.os, "cpu_count", lambda: 16)
    clean_env.setattr(cpu.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert cpu.cores() == 2 and cpu.cpu_threads() == 2 and cpu.worker_share(2) == 1
    clean_env.setenv(cpu.THREADS_ENV, "1")  # a set limit still wins
    assert cpu.cpu_threads() == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    clean_env.delenv(cpu.THREADS_ENV)
    assert cpu.cores() == 16 and cpu.cpu_threads() is None


def test_the_trainer_takes_its_option_else_the_processes_limit(clean_env: pytest.MonkeyPatch) -> None:
    from mmat_plugins.trainers_hf_lora import HFLoRATrainer

    clean_env.setattr(cpu, "cores", lambda: os.cpu_count() or 1)
    assert HFLoRATrainer({})._threads() is None  # torch's own choice
    clean_env.setenv(cpu.THREADS_ENV, "3")
    assert HFLoRATrainer({})._threads() == 3 and HFLoRATrainer({"cpu_threads": 2})._threads() == 2


def test_a_workers_share_divides_the_cores_or_the_set_limit_and_is_at_least_one(
        clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setattr(cpu, "cores", lambda: 2)
    assert [cpu.worker_share(n) for n in (1, 2, 3, 0)] == [2, 1, 1, 2]
    clean_env.setattr(cpu, "cores", lambda: 16)
    assert [cpu.worker_share(n) for n in (1, 2, 3, 32)] == [16, 8, 5, 1]
    clean_env.setenv(cpu.THREADS_ENV, "8")  # a user who gave this build 8 of the 16
    assert cpu.worker_share(2) == 4


def test_limiting_sets_the_libraries_variables_but_keeps_a_users_own(clean_env: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    clean_env.setitem(sys.modules, "torch", types.SimpleNamespace(set_num_threads=calls.append))
    clean_env.setenv("MKL_NUM_THREADS", "7")
    cpu.limit_threads(1)
    assert calls == [1]  # a torch already loaded has its pool resized
    assert os.environ[cpu.THREADS_ENV] == "1" and os.environ["OMP_NUM_THREADS"] == "1"
    assert os.environ["OPENBLAS_NUM_THREADS"] == "1" and os.environ["MKL_NUM_THREADS"] == "7"
    assert cpu.cpu_threads() == 1


def test_ocr_sizes_onnxruntimes_pool_to_the_limit_and_leaves_its_default_without_one(
        clean_env: pytest.MonkeyPatch, tabmwp_dir: Path) -> None:
    from mmat_plugins.tools_ocr import OcrTool

    table = next((tabmwp_dir / "tables").glob("*.png"))

    def intra_op_threads() -> int:
        tool = OcrTool({})
        assert tool.run(table, {}).text  # rapidocr opens its sessions on the first image
        return int(tool.engine().text_det.session.session.get_session_options().intra_op_num_threads)

    clean_env.setattr(cpu, "cores", lambda: os.cpu_count() or 1)  # no quota, no affinity
    assert intra_op_threads() == 0  # onnxruntime's own choice: a thread per core
    clean_env.setenv(cpu.THREADS_ENV, "1")
    assert intra_op_threads() == 1


@pytest.mark.slow
def test_each_worker_of_a_build_is_limited_to_its_share(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    """The pool ``mmat build --workers 2`` uses: the processes that run its tasks have their
    share set (before their definitions load), and the parent is left as it was."""
    from mmat_assets.runner import worker_pool

    clean_env.setattr(cpu, "cores", lambda: 4)  # the share is computed here, in the parent
    clean_env.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    pool = worker_pool(2, tabmwp_project(tmp_path, n=2, shards=2), "local")
    try:
        seen = [pool.submit(cpu.cpu_threads) for _ in range(4)]
        assert {f.result(timeout=120) for f in seen} == {2}
    finally:
        pool.shutdown(wait=True)
    assert cpu.cpu_threads() is None


def test_a_process_in_a_real_cgroup_with_a_quota_sees_the_quota(tmp_path: Path) -> None:
    """A child moved into a cgroup limited to 1 CPU reports 1 core and limits its models to 1
    thread; skipped where this process cannot make a cgroup (not root, no v1 cpu controller)."""
    import subprocess
    import uuid

    if (os.cpu_count() or 1) < 2:
        pytest.skip("one CPU: a 1-CPU quota limits nothing")
    group = cpu.CGROUP_ROOT / "cpu" / f"mmat-test-{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot make a cgroup here: {exc}")
    try:
        try:
            (group / "cpu.cfs_quota_us").write_text(str(int((group / "cpu.cfs_period_us").read_text())))
        except OSError as exc:
            pytest.skip(f"cannot set a cgroup's quota here: {exc}")
        # A child that cannot join the group (a delegated or read-only hierarchy) exits 3: a skip.
        code = ("import os, sys\ntry: open(sys.argv[1], 'w').write(str(os.getpid()))\n"
                "except OSError as e: print(e); sys.exit(3)\n"
                "from mmat_assets.toolkit import cpu; print(cpu.quota_cores(), cpu.cores(), cpu.cpu_threads())")
        env = {k: v for k, v in os.environ.items() if k != cpu.THREADS_ENV}
        out = subprocess.run([sys.executable, "-c", code, str(group / "tasks")], capture_output=True, text=True,
                             env=env, timeout=60)
        if out.returncode == 3:
            pytest.skip(f"cannot move a process into a cgroup here: {out.stdout.strip()}")
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["1", "1", "1"], out.stderr
    finally:
        group.rmdir()


# ----------------------------------------------------------- runs the daemon launches locally


def _threads_job(executor: str) -> dg.JobDefinition:
    """A launched run's job (built by ``reconstructable``): what its step sees as its limit."""
    from mmat_assets.config import DeploymentConfig
    from mmat_assets.deploy import run_executor

    @dg.op
    def threads() -> str:
        return os.environ.get(cpu.THREADS_ENV, "")

    @dg.job(executor_def=run_executor(DeploymentConfig(executor=executor)))
    def seen_threads() -> None:
        threads()

    return seen_threads


def _seen_threads() -> dg.JobDefinition:
    return _threads_job("in_process")


def _seen_threads_per_step() -> dg.JobDefinition:
    return _threads_job("multiprocess")


def _started_elsewhere(instance: dg.DagsterInstance, n: int) -> None:
    for _ in range(n):
        instance.add_run(dg.DagsterRun(job_name="elsewhere", run_id=make_new_run_id(),
                                       status=dg.DagsterRunStatus.STARTED))


def test_a_launched_run_shares_the_cores_with_the_runs_active_beside_it(
        tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    """Through the executor every launched run gets: alone, the run keeps the libraries'
    defaults; beside two started runs on 6 cores it gets a third of them, before its step
    runs; a user's own limit is kept. (``execute_job``'s own run is not yet STARTING when
    its executor is made, as a launched one is, so one more started run stands for it.)"""
    clean_env.setattr(cpu, "cores", lambda: 6)
    with dg.DagsterInstance.local_temp(str(tmp_path)) as instance:
        job = dg.reconstructable(_seen_threads)
        _started_elsewhere(instance, 1)
        with dg.execute_job(job, instance=instance) as alone:
            assert alone.success and alone.output_for_node("threads") == ""
        _started_elsewhere(instance, 2)
        with dg.execute_job(job, instance=instance) as shared:
            assert shared.success and shared.output_for_node("threads") == "2"
        clean_env.setenv(cpu.THREADS_ENV, "3")
        with dg.execute_job(job, instance=instance) as own:
            assert own.output_for_node("threads") == "3"


def test_a_run_of_step_processes_divides_its_share_by_the_steps_at_once(
        tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    """deployment.executor multiprocess: its config still validates, and each step process
    (spawned after the executor is made) inherits the run's share divided by max_concurrent."""
    clean_env.setattr(cpu, "cores", lambda: 4)
    with dg.DagsterInstance.local_temp(str(tmp_path)) as instance:
        with dg.execute_job(dg.reconstructable(_seen_threads_per_step), instance=instance,
                            run_config={"execution": {"config": {"max_concurrent": 2}}}) as result:
            assert result.success and result.output_for_node("threads") == "2"


def test_a_local_runs_share_counts_the_active_runs_and_its_step_processes(
        tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    """Called from a run worker: its own run is among the active ones."""
    from mmat_assets.deploy import local_run_threads

    clean_env.setattr(cpu, "cores", lambda: 4)
    with dg.DagsterInstance.local_temp(str(tmp_path)) as instance:
        _started_elsewhere(instance, 1)  # the calling run
        assert local_run_threads(instance) is None  # nothing else runs: nothing to divide
        assert local_run_threads(instance, processes_per_run=2) == 2
        _started_elsewhere(instance, 1)
        assert local_run_threads(instance) == 2
        assert local_run_threads(instance, processes_per_run=4) == 1  # at least one
        instance.add_run(dg.DagsterRun(job_name="done", run_id=make_new_run_id(),
                                       status=dg.DagsterRunStatus.SUCCESS))
        assert local_run_threads(instance) == 2  # a finished run holds no cores


def test_runs_a_cluster_launcher_starts_keep_their_own_limit(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    """An instance whose launcher starts each run on its own machine (ECS here) divides nothing,
    and does not make the launcher to find that out (it would call ECS)."""
    from mmat_assets.deploy import local_run_threads

    clean_env.setattr(cpu, "cores", lambda: 4)
    (tmp_path / "dagster.yaml").write_text(
        "run_launcher:\n  module: dagster_aws.ecs\n  class: EcsRunLauncher\n"
        "  config: {task_definition: no-such-task, container_name: run}\n")
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        _started_elsewhere(instance, 3)
        assert local_run_threads(instance) is None
        assert instance._run_launcher is None  # still not made
