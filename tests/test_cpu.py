"""A build's workers share the cores: each one's models are limited to its share of threads
(``mmat_assets.toolkit.cpu``), so N workers do not start N x cores threads between them."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest

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
    assert cpu.cpu_threads() is None
    for bad in ("0", "-2", "two", "1.5", ""):
        clean_env.setenv(cpu.THREADS_ENV, bad)
        assert cpu.cpu_threads() is None, bad
    clean_env.setenv(cpu.THREADS_ENV, " 3 ")
    assert cpu.cpu_threads() == 3


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
