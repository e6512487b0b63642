"""Scale: a synthetic dataset through foundation and rationales, launched on a real instance.

N synthetic QA rows (a JSONL file read by the ``qa_table`` source; a small set of generated
images reused across rows, so shards are filled by image hash), S shards, ``foundation ->
rationales`` through the ``openai`` teacher against a fixed-latency OpenAI-compatible server
(in its own process; two calls per row, no tools), submitted with ``mmat build --launch`` to a
Dagster instance on PostgreSQL (``initdb`` in a temporary folder) whose daemon runs R runs at
once with the default run launcher.

It prints:
- samples/s against the latency-bound ideal at the total configured concurrency
  (``R * C / (2 * latency)``): end to end (submit to the backfill's end) and over the
  rationale stage alone (first rationale step start to last end); target >= 0.85;
- peak RSS per run (the run worker, with its step processes under the multiprocess executor,
  sampled); target <= 1.5 GB;
- Dagster's overhead per run: the run's wall time (launched to finished) minus the time
  inside its steps (the union of step start..end from the instance's event log); target <= 3 s;
  of it, the start-up (launched to the first step's start: the run worker's process, its
  imports and the project's definitions);
- the extrapolation of the end-to-end rate to the paper's 1.09M samples.

    python benchmarks/scale.py [--rows 100000] [--shards 64] [--runs-at-once 2] [--concurrency 32]
                               [--executor in_process|multiprocess]

``--executor`` is ``deployment.executor`` of the generated project (how a launched run executes
its steps), so the two can be compared on the same machine in one sitting.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from rationale_throughput import CALLS_PER_SAMPLE, serve  # noqa: E402  (the fixed-latency server)
from tests.pg_instance import Daemon, Postgres, write_home  # noqa: E402

PAPER_SAMPLES = 1_090_000
TOOLS = ("ocr", "label_bbox", "face_detection", "image_caption")
SELECT = "group:foundation or key:rationales"
TARGETS = {"ratio": 0.85, "rss_gb": 1.5, "overhead_s": 3.0}
MMAT = str(Path(sys.executable).with_name("mmat"))


def write_source(folder: Path, rows: int, images: int, seed: int = 0) -> Path:
    """``rows`` distinct arithmetic questions over ``images`` small distinct PNGs; the JSONL's path.

    No two rows ask the same question of the same image: the source would drop the second as a
    duplicate, and every row is meant to reach the teacher."""
    from PIL import Image

    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True)
    for i in range(images):
        pixels = bytes(rng.randrange(256) for _ in range(16 * 16 * 3))
        Image.frombytes("RGB", (16, 16), pixels).resize((64, 64)).save(folder / "images" / f"{i}.png")
    path = folder / "qa.jsonl"
    seen: set[tuple[int, int, int]] = set()
    with path.open("w", encoding="utf-8") as out:
        for i in range(rows):
            a, b = rng.randrange(100), rng.randrange(100)
            while (a, b, i % images) in seen:
                a, b = rng.randrange(100), rng.randrange(100)
            seen.add((a, b, i % images))
            out.write(json.dumps({"qid": f"q{i}", "prompt": f"What is {a} + {b}?", "gold": str(a + b),
                                  "img": f"images/{i % images}.png"}) + "\n")
    return path


def write_config(folder: Path, data: Path, args: argparse.Namespace, base_url: str) -> Path:
    cfg = {
        "sources": {"synthetic": {"plugin": "qa_table", "options": {
            "path": str(data), "license": "CC0-1.0", "image_root": str(data.parent),
            "columns": {"question": "prompt", "answer": "gold", "id": "qid", "image": "img"}}}},
        "foundation": {"shards": args.shards, "shards_per_run": args.shards_per_run, "seed": 7},
        "tools": {t: {"enabled": False} for t in TOOLS},
        "teachers": {"fixed": {"plugin": "openai", "options": {
            "base_url": base_url, "model": "fixed-latency", "concurrency": args.concurrency, "timeout_s": 60,
            "max_retries": 2}}},
        "stages": {"teacher": "fixed", "concurrency": args.concurrency, "max_steps": 3},
        "profiles": {"local": {"root": str(folder / "store")}},
        "deployment": {"executor": args.executor},
    }
    path = folder / "mmat.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


class RssSampler(threading.Thread):
    """Peak resident memory of each run worker with its step processes, by the worker's pid.

    The code server starts each run worker as a ``multiprocessing`` spawn child: a run worker is
    a spawned process whose parent was not spawned. The in-process executor runs every step in
    that process; the multiprocess one starts each step as a spawn child of it, summed in."""

    def __init__(self, every_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.every_s, self.done = every_s, threading.Event()
        self.peak: dict[int, int] = {}

    def run(self) -> None:
        import psutil

        while not self.done.wait(self.every_s):
            for proc in psutil.process_iter(["pid", "cmdline"]):
                if not _spawned(proc.info["cmdline"]):
                    continue
                try:
                    parent = proc.parent()
                    if parent is None or _spawned(parent.cmdline()):
                        continue
                    tree = [proc, *proc.children(recursive=True)]
                    rss = sum(p.memory_info().rss for p in tree)
                except psutil.NoSuchProcess:
                    continue
                self.peak[proc.pid] = max(self.peak.get(proc.pid, 0), rss)


def _spawned(cmdline: list[str] | None) -> bool:
    return "--multiprocessing-fork" in (cmdline or ())


def _union(spans: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(spans):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def run_stats(instance: Any, run_id: str) -> dict[str, Any]:
    """Wall (launched to finished), time inside steps, start-up (launched to the first step),
    the worker's pid, rationale step spans."""
    import dagster as dg

    events = [e for e in instance.all_logs(run_id) if e.dagster_event is not None]
    kind = lambda e: e.dagster_event.event_type  # noqa: E731
    launched = next((e.timestamp for e in events if kind(e) == dg.DagsterEventType.RUN_STARTING), events[0].timestamp)
    ended = max(e.timestamp for e in events)
    starts: dict[str, float] = {}
    spans, rationale = [], []
    for e in events:
        step = e.dagster_event.step_key
        if kind(e) == dg.DagsterEventType.STEP_START:
            starts[step] = e.timestamp
        elif kind(e) in (dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE) and step in starts:
            spans.append((starts[step], e.timestamp))
            if step.startswith("rationales"):
                rationale.append((starts[step], e.timestamp))
    pid = next((int(e.message.split("pid: ")[1].split(")")[0]) for e in events
                if kind(e) == dg.DagsterEventType.ENGINE_EVENT and "Started process for run (pid:" in (e.message or "")),
               None)
    wall, inside = ended - launched, _union(spans)
    startup = min(starts.values(), default=ended) - launched
    return {"run": run_id[:8], "wall_s": wall, "steps_s": inside, "overhead_s": wall - inside, "startup_s": startup,
            "pid": pid, "rationale": rationale}


def measure(args: argparse.Namespace, tmp: Path, base_url: str) -> dict[str, Any]:
    import dagster as dg

    data = write_source(tmp / "data", args.rows, args.images)
    config = write_config(tmp, data, args, base_url)
    with Postgres() as pg:
        home = write_home(tmp / "home", pg, args.runs_at_once)
        daemon = Daemon(home, config, tmp / "daemon.log").start()
        sampler = RssSampler()
        sampler.start()
        try:
            env = {**os.environ, "DAGSTER_HOME": str(home), "COLUMNS": "200"}
            started = time.time()
            out = subprocess.run([MMAT, "build", "--config", str(config), "--select", SELECT, "--launch", "--json"],
                                 env=env, capture_output=True, text=True, timeout=args.timeout_s)
            wall = time.time() - started
            sampler.done.set()
            if out.returncode != 0:
                raise SystemExit(f"the launched build failed ({out.returncode}):\n{out.stdout[-3000:]}\n"
                                 f"{out.stderr[-3000:]}\n{daemon.tail()}")
            summary = json.loads(out.stdout)
            with dg.DagsterInstance.from_config(str(home)) as instance:
                runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/backfill": summary["backfill"]}))
                stats = [run_stats(instance, r.run_id) for r in runs]
        finally:
            sampler.done.set()
            daemon.stop()
    for s in stats:
        s["rss_gb"] = sampler.peak.get(s["pid"], 0) / 1e9
    return {"summary": summary, "wall_s": wall, "runs": stats}


def report(args: argparse.Namespace, result: dict[str, Any]) -> bool:
    rows = {a["asset"]: a["rows"] for a in result["summary"]["assets"]}
    ok_rows = rows.get("rationales") == args.rows
    total_c = args.concurrency * args.runs_at_once
    ideal = total_c / (CALLS_PER_SAMPLE * args.latency_ms / 1000)
    runs = result["runs"]
    spans = [span for r in runs for span in r["rationale"]]
    stage_s = max(b for _, b in spans) - min(a for a, _ in spans)
    e2e, stage = args.rows / result["wall_s"], args.rows / stage_s
    shard_runs = [r for r in runs if r["rationale"]]
    rss = max(r["rss_gb"] for r in runs)
    overhead = max(r["overhead_s"] for r in shard_runs)
    print(f"scale: {args.rows} rows, {args.shards} shards, {args.shards_per_run} per run, {len(runs)} runs "
          f"({args.runs_at_once} at once), {CALLS_PER_SAMPLE} calls/row at {args.latency_ms:g} ms, "
          f"concurrency {args.concurrency} per run ({total_c} in all), {args.executor} executor")
    print(f"{'run':10} {'wall s':>8} {'in steps s':>11} {'overhead s':>11} {'of it start-up s':>17} "
          f"{'peak RSS GB':>12}")
    for r in runs:
        print(f"{r['run']:10} {r['wall_s']:8.1f} {r['steps_s']:11.1f} {r['overhead_s']:11.1f} {r['startup_s']:17.1f} "
              f"{r['rss_gb']:12.2f}")
    print(f"rows: {rows}")
    print(f"end to end: {result['wall_s']:.1f} s, {e2e:.1f} samples/s; ideal {ideal:.1f}; ratio {e2e / ideal:.2f}")
    print(f"rationale stage: {stage_s:.1f} s, {stage:.1f} samples/s; ratio {stage / ideal:.2f} "
          f"(target >= {TARGETS['ratio']})")
    print(f"peak RSS per run: {rss:.2f} GB (target <= {TARGETS['rss_gb']}); "
          f"overhead per shard run: at most {overhead:.1f} s (target <= {TARGETS['overhead_s']})")
    hours = PAPER_SAMPLES / e2e / 3600
    print(f"1.09M samples at this rate ({total_c} requests in flight): {hours:.1f} h; "
          f"per run slot {hours * args.runs_at_once:.1f} run-hours")
    if not ok_rows:
        print(f"ERROR: rationales has {rows.get('rationales')} rows, expected {args.rows}")
    return ok_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--shards", type=int, default=64)
    parser.add_argument("--shards-per-run", type=int, default=0, help="default: shards / runs-at-once")
    parser.add_argument("--runs-at-once", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32, help="teacher requests in flight per run")
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--timeout-s", type=float, default=3600.0)
    parser.add_argument("--executor", choices=("in_process", "multiprocess"), default="in_process",
                        help="deployment.executor: how a launched run executes its steps")
    args = parser.parse_args()
    args.shards_per_run = args.shards_per_run or -(-args.shards // args.runs_at_once)
    parent, child = mp.Pipe()
    server = mp.get_context("spawn").Process(target=serve, args=(args.latency_ms / 1000, 1024, True, child),
                                             daemon=True)
    server.start()
    base_url = parent.recv()
    try:
        with tempfile.TemporaryDirectory(prefix="mmat-scale-") as tmp:
            result = measure(args, Path(tmp), base_url)
    finally:
        parent.send("done")
        server.join(timeout=10)
    sys.exit(0 if report(args, result) else 1)


if __name__ == "__main__":
    main()
