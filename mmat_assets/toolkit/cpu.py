"""How many CPU threads a model in this process may use.

A build with ``--workers N`` runs N processes side by side. If each of them let its OCR or
torch model start one thread per core, N x cores threads would share the cores and each
process would run slower than alone. On 2 cores (``benchmarks/ocr_threads.py``), OCR over 40
TabMWP tables did 2.57 images/s in one process, 2.03 in two processes with onnxruntime's
default pool each, and 3.44 in two processes of one thread each. So a worker is given its
share (:data:`THREADS_ENV`, ``cores // N``: :func:`worker_share`) before it loads anything,
and a plugin that sizes a thread pool itself asks :func:`cpu_threads`. Runs the instance starts
as local processes (the daemon, the UI) get theirs when their executor is made
(:func:`mmat_assets.deploy.local_run_threads`).

A process may also be held to fewer cores than the machine has: by its CPU affinity, or by a
cgroup CPU quota (a Kubernetes pod's ``limits.cpu``, an ECS task's ``cpu``, ``docker run
--cpus``). A quota leaves every core visible, and onnxruntime and torch size their pools by
the cores they see; a run pod limited to one CPU on a 16-core node would then run 16
threads in one CPU's time. :func:`cores` counts the quota, and :func:`cpu_threads` reports
such a limit, so a run on a cluster sizes its pools to what it was given without any setting.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

#: Threads one process's models may use; set for each worker of a build, or by a user who runs
#: several builds or runs on one machine. Unset: every core this process may run on.
THREADS_ENV = "MMAT_CPU_THREADS"
#: What the numerical libraries read for their own pools (torch's intra-op threads among them).
LIBRARY_ENVS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
#: Where the cgroup file system is mounted (in a container: the container's own cgroup).
CGROUP_ROOT = Path("/sys/fs/cgroup")


def _own_cgroups(proc_cgroup: Path) -> tuple[str, str]:
    """This process's cgroup paths from ``/proc/self/cgroup``: (v2's, v1's ``cpu`` controller's)."""
    v2 = v1 = ""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return v2, v1
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _read_quota(folder: Path, v1: bool) -> tuple[str, str] | None:
    try:
        if not v1:
            quota, period = (folder / "cpu.max").read_text().split()[:2]
            return quota, period
        return ((folder / "cpu.cfs_quota_us").read_text().strip(),
                (folder / "cpu.cfs_period_us").read_text().strip())
    except (OSError, ValueError):
        return None


def quota_cores(root: Path | None = None, proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """The CPUs a cgroup quota gives this process, rounded up (1.5 CPUs: 2), or None where no
    quota is set or none can be read.

    cgroup v2's ``cpu.max`` ("quota period", or "max period": none), then v1's
    ``cpu/cpu.cfs_quota_us`` and ``cpu.cfs_period_us`` (quota -1: none), each first in this
    process's own cgroup (``proc_cgroup``; a service a host's systemd limits), then at the
    mount's top (a container's own cgroup), under ``root`` (default :data:`CGROUP_ROOT`).
    """
    root = CGROUP_ROOT if root is None else root
    v2, v1 = _own_cgroups(proc_cgroup)
    places = [(root / v2.lstrip("/"), False), (root, False),
              (root / "cpu" / v1.lstrip("/"), True), (root / "cpu", True)]
    for folder, is_v1 in places:
        found = _read_quota(folder, is_v1)
        if found is None:
            continue
        try:
            q, p = int(found[0]), int(found[1])
        except ValueError:  # "max": no quota here
            continue
        if q > 0 and p > 0:
            return max(1, math.ceil(q / p))
    return None


def cores() -> int:
    """The cores this process may run on: its CPU affinity where the system has one, and at
    most its cgroup quota (:func:`quota_cores`)."""
    try:
        n = len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    quota = quota_cores()
    return min(n, quota) if quota else n


def cpu_threads() -> int | None:
    """The threads this process's models are limited to: :data:`THREADS_ENV` (a whole number
    of at least 1), else :func:`cores` where that is fewer than the machine's CPUs (a quota or
    an affinity holds the process to them), else None: a library's own default then holds."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if value.isdigit() and int(value) >= 1:
        return int(value)
    n = cores()
    return n if n < (os.cpu_count() or n) else None


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
