"""How many CPU threads a model in this process may use.

A build with ``--workers N`` runs N processes side by side. If each of them let its OCR or
torch model start one thread per core, N x cores threads would share the cores and each
process would run slower than alone. On 2 cores (``benchmarks/ocr_threads.py``), OCR over 40
TabMWP tables did 2.57 images/s in one process, 2.03 in two processes with onnxruntime's
default pool each, and 3.44 in two processes of one thread each. So a worker is given its
share (:data:`THREADS_ENV`, ``cores // N``: :func:`worker_share`) before it loads anything,
and a plugin that sizes a thread pool itself asks :func:`cpu_threads`.
"""

from __future__ import annotations

import os
import sys

#: Threads one process's models may use; set for each worker of a build, or by a user who runs
#: several builds or runs on one machine. Unset: every core this process may run on.
THREADS_ENV = "MMAT_CPU_THREADS"
#: What the numerical libraries read for their own pools (torch's intra-op threads among them).
LIBRARY_ENVS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def cores() -> int:
    """The cores this process may run on (its CPU affinity where the system has one)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_threads() -> int | None:
    """The threads this process's models are limited to (:data:`THREADS_ENV`, a whole number
    of at least 1), or None where nothing limits them: a library's own default then holds."""
    value = os.environ.get(THREADS_ENV, "").strip()
    return int(value) if value.isdigit() and int(value) >= 1 else None


def worker_share(workers: int) -> int:
    """One of ``workers`` processes' share of this process's threads (:func:`cpu_threads`,
    else :func:`cores`): at least one."""
    return max(1, (cpu_threads() or cores()) // max(1, workers))


def limit_threads(threads: int) -> None:
    """Limit this process's models to ``threads``: :data:`THREADS_ENV` and the libraries'
    variables (those a user set are kept), and torch's pool if torch is already loaded.

    Call it before the models load: onnxruntime and torch size their pools when they start.
    """
    os.environ[THREADS_ENV] = str(threads)
    for name in LIBRARY_ENVS:
        os.environ.setdefault(name, str(threads))
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)
