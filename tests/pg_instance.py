"""A real Dagster instance for tests and benchmarks: Debian PostgreSQL on a free loopback port
(``initdb`` in a temporary folder), a ``dagster.yaml`` on it with the queued coordinator and the
default run launcher, and a ``dagster-daemon`` serving the project from that Dagster home.

PostgreSQL refuses to run as root, so where this runs as root the cluster belongs to the
``postgres`` user. Every wait has a deadline; every process started here is stopped on exit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
PG_BIN_DIRS = ("/usr/local/bin", *sorted(str(p) for p in Path("/usr/lib/postgresql").glob("*/bin")))
PG_START_S = 60
DAEMON_START_S = 180
#: The daemon's loops wait 30 s between iterations; a test's daemon need not.
FAST_DAEMON = ("import dagster._daemon.controller as c; c.DEFAULT_DAEMON_INTERVAL_SECONDS = 2; "
               "from dagster._daemon.cli import main; main()")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pg_tool(name: str) -> str | None:
    """The path of a PostgreSQL program (``initdb``, ``pg_ctl``), None where none is installed."""
    for folder in PG_BIN_DIRS:
        if (Path(folder) / name).is_file():
            return str(Path(folder) / name)
    return shutil.which(name)


def _as_owner(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@dataclass
class Postgres:
    """A PostgreSQL cluster of its own on ``port``; database ``postgres``, trust auth.

    Its folder is a fresh one directly in the system's temporary directory: the ``postgres``
    user must be able to reach it, and a test's ``tmp_path`` is private to root."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="mmat-pg-")))
    port: int = 0

    @property
    def data(self) -> Path:
        return self.root / "data"

    def start(self) -> Postgres:
        initdb, pg_ctl = pg_tool("initdb"), pg_tool("pg_ctl")
        assert initdb and pg_ctl, "PostgreSQL is not installed (make postgres)"
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
        subprocess.run(_as_owner([initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres"]),
                       check=True, capture_output=True, timeout=PG_START_S)
        self.port = self.port or free_port()
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=200"
        subprocess.run(_as_owner([pg_ctl, "-D", str(self.data), "-o", opts, "-l", str(self.root / "pg.log"),
                                  "-w", "-t", str(PG_START_S), "start"]),
                       check=True, capture_output=True, timeout=PG_START_S + 10)
        return self

    def stop(self) -> None:
        pg_ctl = pg_tool("pg_ctl")
        if pg_ctl and (self.data / "postmaster.pid").exists():
            subprocess.run(_as_owner([pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", "stop"]),
                           capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Postgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def db(self) -> dict[str, Any]:
        """The ``postgres_db`` block of a Dagster storage config for this cluster.

        The driver is named: SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3, while
        dagster-postgres installs psycopg2."""
        return {"username": "postgres", "password": "", "hostname": "127.0.0.1", "db_name": "postgres",
                "port": self.port, "scheme": "postgresql+psycopg2"}


def instance_yaml(pg: Postgres, max_concurrent_runs: int) -> str:
    """A ``dagster.yaml`` on ``pg``: the team deployment's keys (``infra/dagster.yaml``: PostgreSQL
    storage, the queued coordinator with its one-run-per-shard tag limits, run monitoring) with
    this cluster's address, a run limit, and the default run launcher (one local subprocess per
    run)."""
    infra = yaml.safe_load((REPO / "infra" / "dagster.yaml").read_text(encoding="utf-8"))
    coordinator = infra["run_coordinator"]
    limits = coordinator["config"]["tag_concurrency_limits"]
    return yaml.safe_dump({
        "storage": {"postgres": {"postgres_db": pg.db}},
        "run_coordinator": {"module": coordinator["module"], "class": coordinator["class"],
                            "config": {"max_concurrent_runs": max_concurrent_runs,
                                       "tag_concurrency_limits": limits, "dequeue_interval_seconds": 1}},
        "run_launcher": {"module": "dagster._core.launcher", "class": "DefaultRunLauncher"},
        "run_monitoring": infra["run_monitoring"],
        "telemetry": {"enabled": False},
    }, sort_keys=False)


def write_home(home: Path, pg: Postgres, max_concurrent_runs: int) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(instance_yaml(pg, max_concurrent_runs), encoding="utf-8")
    return home


@dataclass
class Daemon:
    """``dagster-daemon run`` for ``config`` on the Dagster home ``home``; its log in ``log``."""

    home: Path
    config: Path
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    #: every process the daemon started (its code server, run workers), stopped at the end
    seen: set[int] = field(default_factory=set)

    def start(self) -> Daemon:
        import dagster as dg

        from mmat_assets.launch import missing_daemons

        env = {**os.environ, **self.env, "DAGSTER_HOME": str(self.home), "MMAT_CONFIG": str(self.config)}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", FAST_DAEMON, "run", "-f", "definitions.py"],
                                         cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + DAEMON_START_S
        with dg.DagsterInstance.from_config(str(self.home)) as instance:
            # a restarted daemon: its predecessor's heartbeats are old, so wait for fresh ones
            started = time.time()
            while True:
                beats = instance.get_daemon_heartbeats()
                if not missing_daemons(instance) and all(b.timestamp >= started for b in beats.values()):
                    break
                assert self.proc.poll() is None, self.tail()
                assert time.monotonic() < deadline, "daemon did not start: " + self.tail()
                time.sleep(1)
        return self

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def remember_children(self) -> None:
        import psutil

        if self.proc is None:
            return
        with contextlib.suppress(psutil.NoSuchProcess):
            self.seen |= {p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)}

    def kill(self) -> None:
        """SIGKILL the daemon process alone, as a crash would: what it started runs on."""
        assert self.proc is not None
        self.remember_children()
        self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        """The daemon and everything it ever started."""
        import psutil

        self.remember_children()
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        for pid in self.seen:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()


@contextlib.contextmanager
def daemon(home: Path, config: Path, log: Path, env: dict[str, str] | None = None) -> Iterator[Daemon]:
    d = Daemon(home, config, log, env or {}).start()
    try:
        yield d
    finally:
        d.stop()
