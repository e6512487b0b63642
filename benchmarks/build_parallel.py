"""Shards in parallel: ``mmat build --workers 1`` vs ``--workers 2`` on the demo's data.

Builds the demo's shard stages (``--select '*dialogue_files'``: the TabMWP source, Foundation,
the tool assets, rationale, reflection, RR/ORR and the JSONL files; the export, training and
evaluations run once, in one process, either way, so they are left out of the ratio) of a
copy of the demo project: the same TabMWP data, quota and shard count as ``mmat.yaml``. Each
build starts from nothing (no store, no Dagster home, no cached answers) in the same folder,
so that the paths the tables and files record are the same.
Prints both wall times and the speed-up (target >= 1.6x on 2 cores), and checks that both
builds stored the same tables and JSONL files, byte for byte, and the same summary.

    python benchmarks/build_parallel.py [--quota 25] [--workers 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SELECT = "*dialogue_files"
#: Summary fields that measure the run rather than its result, left out of the comparison:
#: wall time, and the worker count (which is what differs between the two builds on purpose).
NOT_COMPARED = ("seconds", "workers")


def project(folder: Path, quota: int) -> Path:
    """The demo project (mmat.yaml) in ``folder``, its storage there too."""
    cfg = yaml.safe_load((REPO / "mmat.yaml").read_text(encoding="utf-8"))
    cfg["sources"]["tabmwp"]["options"]["path"] = str((REPO / cfg["sources"]["tabmwp"]["options"]["path"]).resolve())
    cfg["sources"]["tabmwp"]["quota"] = quota
    cfg["profiles"] = {"local": {"root": str(folder / "store")}}
    folder.mkdir(parents=True)
    path = folder / "mmat.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def build(cfg: Path, workers: int) -> tuple[float, dict, dict[str, str]]:
    """Wall time, summary and stored outputs of one build from nothing."""
    tmp = cfg.parent / "tmp"
    for folder in (tmp, cfg.parent / "store", cfg.parent / "home"):
        shutil.rmtree(folder, ignore_errors=True)
    tmp.mkdir()
    env = {**os.environ, "DAGSTER_HOME": str(cfg.parent / "home"), "TMPDIR": str(tmp)}
    start = time.perf_counter()
    out = subprocess.run([str(Path(sys.executable).with_name("mmat")), "build", "--config", str(cfg), "--select",
                          SELECT, "--workers", str(workers), "--json"], capture_output=True, text=True, env=env,
                         timeout=3600)
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"build with --workers {workers} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    summary = {k: v for k, v in json.loads(out.stdout).items() if k not in NOT_COMPARED}
    return seconds, summary, stored(cfg.parent / "store")


def stored(store: Path) -> dict[str, str]:
    """Every table and JSONL file under ``store``: its path there -> its sha256."""
    return {str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(store.rglob("*")) if p.suffix in (".parquet", ".jsonl") and p.is_file()}


def differences(serial: object, parallel: object, where: str = "") -> list[str]:
    """Where two summaries differ, down to the field (``assets[3].counts.ok: 12 != 11``)."""
    if isinstance(serial, dict) and isinstance(parallel, dict):
        return [d for k in sorted(serial.keys() | parallel.keys(), key=str)
                for d in differences(serial.get(k), parallel.get(k), f"{where}.{k}" if where else str(k))]
    if isinstance(serial, list) and isinstance(parallel, list) and len(serial) == len(parallel):
        return [d for i, (a, b) in enumerate(zip(serial, parallel)) for d in differences(a, b, f"{where}[{i}]")]
    return [] if serial == parallel else [f"{where}: {serial!r} != {parallel!r}"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quota", type=int, default=25, help="TabMWP rows per grade (the demo's 25: ~200 problems)")
    ap.add_argument("--workers", type=int, default=2, help="workers of the parallel build")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = project(Path(tmp) / "demo", args.quota)
        serial_s, serial, serial_files = build(cfg, 1)
        print(f"--workers 1: {serial_s:.1f} s ({serial['runs']} runs)", flush=True)
        parallel_s, parallel, parallel_files = build(cfg, args.workers)
        print(f"--workers {args.workers}: {parallel_s:.1f} s", flush=True)
    check_same((serial, serial_files), (parallel, parallel_files), NOT_COMPARED)
    print(f"speed-up: {serial_s / parallel_s:.2f}x (target >= 1.6x on 2 cores)")
    return 0


def check_same(first: tuple[dict, dict[str, str]], second: tuple[dict, dict[str, str]],
               not_compared: tuple[str, ...]) -> None:
    """Two builds' (summary, stored files) agree: every file byte for byte, the summaries field
    by field; else an AssertionError that names what differs."""
    (a, a_files), (b, b_files) = first, second
    changed = sorted(k for k in a_files.keys() | b_files.keys() if a_files.get(k) != b_files.get(k))
    assert not changed, f"the builds stored different tables or JSONL files: {changed}"
    differ = differences(a, b)
    assert not differ, "the builds' summaries differ (first != second):\n" + "\n".join(differ)
    print(f"identical outputs: {len(a_files)} tables and JSONL files, byte for byte; same summary "
          f"(all but {', '.join(not_compared)})")


if __name__ == "__main__":
    sys.exit(main())
