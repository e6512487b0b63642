"""The life of a local model server in a test: launch on a free port, wait until it answers
(with a deadline), keep its log for the failure message, and stop it at teardown. The
``transformers serve`` and ``llama_cpp.server`` fixtures differ only in their command line."""

from __future__ import annotations

import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

S = TypeVar("S", bound="ServedProcess")


def tail_lines(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


class ServedProcess:
    """A server subprocess; subclasses build the command in :meth:`start` and call :meth:`launch`."""

    label = "server"  #: named in the failure message
    health_path = "/v1/models"  #: answers 200 once the server is ready
    poll_s = 0.5

    def __init__(self, start_timeout_s: float) -> None:
        self.start_timeout_s = start_timeout_s
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: tempfile._TemporaryFileWrapper[bytes] | None = None
        #: seconds from launch to the first answer, for reporting
        self.startup_s = 0.0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self: S) -> S:
        raise NotImplementedError

    def launch(self, cmd: list[str], env: Mapping[str, str], log_prefix: str,
               preexec_fn: Callable[[], Any] | None = None) -> None:
        self._log = tempfile.NamedTemporaryFile(prefix=log_prefix, suffix=".log")
        began = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=dict(env),
                                     preexec_fn=preexec_fn)
        self._wait_ready()
        self.startup_s = time.perf_counter() - began

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                self._fail(f"server exited with rc={self.proc.returncode}")
            if self._answers():
                return
            time.sleep(self.poll_s)
        self._fail(f"server did not answer within {self.start_timeout_s:.0f}s")

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{self.health_path}", timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, lines: int = 40) -> str:
        if self._log is None:
            return ""
        return tail_lines(Path(self._log.name).read_text(encoding="utf-8", errors="replace"), lines)

    def _fail(self, why: str) -> None:
        tail = self.log_tail()
        self.stop()
        raise RuntimeError(f"{self.label} failed to start: {why}\n--- server log ---\n{tail}")

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

    def __enter__(self: S) -> S:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
