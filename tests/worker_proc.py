"""Collecting a worker subprocess's exit code and log within a deadline."""

from __future__ import annotations

import subprocess

WORKER_TIMEOUT_S = 60


def finish(proc: subprocess.Popen[bytes], timeout_s: float = WORKER_TIMEOUT_S) -> tuple[int, str]:
    """The worker's exit code and the tail of its output; a worker past ``timeout_s`` is killed."""
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
    return proc.returncode, output.decode(errors="replace")[-3000:]
