"""Launched runs side by side: each run's models at its share of the cores vs a thread per core.

``mmat build --launch`` hands the demo's shard stages (``--select '*dialogue_files'``, as
``benchmarks/build_parallel.py``) to a ``dagster-daemon`` started here with its own Dagster
home; the daemon starts the backfill's runs as local processes, up to ``max_concurrent_runs``
at once (8 shards at ``--per-run`` shards a run: 2 runs at the demo's 4). Two builds from
nothing, in the same folder so that the paths the tables record agree:

- **a thread per core**: the daemon runs with ``MMAT_CPU_THREADS`` set to the cores, a user's
  own limit that the runs keep, as every run did before runs were sized;
- **shared**: no variable; each run's executor limits its models to the cores over the runs
  active when its worker came up (``mmat_assets.deploy.local_run_threads``).

Prints both wall times (the ``mmat build --launch`` command, launch to last run's end) and the
ratio, and checks that both stored the same tables and JSONL files, byte for byte, and the
same summary.

    python benchmarks/launch_threads.py [--quota 25] [--per-run 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "benchmarks"), str(REPO)]
from build_parallel import check_same, project, stored  # noqa: E402

from tests.pg_instance import FAST_DAEMON  # noqa: E402  (the daemon's loops every 2 s, not 30)

SELECT = "*dialogue_files"
#: Summary fields that measure the run rather than its result: wall time, the backfill's id, and
#: how many runs the daemon made of it (it made 6 of one build and 7 of the other, with the same
#: tables and files: how a backfill's assets are grouped into runs is the daemon's timing).
NOT_COMPARED = ("seconds", "workers", "backfill", "runs")


def launched(cfg: Path, threads: int | None) -> tuple[float, dict, dict[str, str]]:
    """Wall time, summary and stored outputs of one launched build from nothing."""
    import dagster as dg

    from mmat_assets.cli import ensure_dagster_home
    from mmat_assets.launch import missing_daemons
    from mmat_assets.toolkit.cpu import THREADS_ENV

    home, tmp = cfg.parent / "home", cfg.parent / "tmp"
    for folder in (tmp, cfg.parent / "store", home):
        shutil.rmtree(folder, ignore_errors=True)
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != THREADS_ENV}
    env |= {"DAGSTER_HOME": str(home), "TMPDIR": str(tmp), "MMAT_CONFIG": str(cfg)}
    if threads:
        env[THREADS_ENV] = str(threads)
    os.environ["DAGSTER_HOME"] = str(home)
    ensure_dagster_home(cfg)
    log = (cfg.parent / "daemon.log").open("w")
    daemon = subprocess.Popen([sys.executable, "-c", FAST_DAEMON, "run", "-f", "definitions.py"], cwd=REPO,
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with dg.DagsterInstance.from_config(str(home)) as instance:
            while missing_daemons(instance):
                if daemon.poll() is not None:
                    raise SystemExit((cfg.parent / "daemon.log").read_text()[-3000:])
                time.sleep(1)
        start = time.perf_counter()
        out = subprocess.run([str(Path(sys.executable).with_name("mmat")), "build", "--config", str(cfg),
                              "--select", SELECT, "--launch", "--json"], capture_output=True, text=True,
                             env=env, timeout=3600)
        seconds = time.perf_counter() - start
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        daemon.wait(timeout=60)
        log.close()
    if out.returncode != 0:
        raise SystemExit(f"launched build failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    summary = {k: v for k, v in json.loads(out.stdout).items() if k not in NOT_COMPARED}
    return seconds, summary, stored(cfg.parent / "store")


def main() -> int:
    from mmat_assets.toolkit.cpu import cores

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quota", type=int, default=25, help="TabMWP rows per grade (the demo's 25: ~200 problems)")
    ap.add_argument("--per-run", type=int, default=4, help="shards a run (foundation.shards_per_run; the demo's 4)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = project(Path(tmp) / "demo", args.quota)
        doc = yaml.safe_load(cfg.read_text(encoding="utf-8"))
        doc.setdefault("foundation", {})["shards_per_run"] = args.per_run
        cfg.write_text(yaml.safe_dump(doc), encoding="utf-8")
        runs = -(-int(doc["foundation"].get("shards", 8)) // args.per_run)
        each_s, each, each_files = launched(cfg, cores())
        print(f"a thread per core ({runs} shard runs at once, {cores()} threads each): {each_s:.1f} s", flush=True)
        shared_s, shared, shared_files = launched(cfg, None)
        print(f"shared ({cores()} cores over the runs active): {shared_s:.1f} s", flush=True)
    check_same((each, each_files), (shared, shared_files), NOT_COMPARED)
    print(f"speed-up: {each_s / shared_s:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
