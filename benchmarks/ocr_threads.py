"""OCR with the cores split between processes, as ``mmat build --workers N`` splits them.

The same N TabMWP tables are read through the ``ocr`` tool by one process with onnxruntime's
default pool (a thread per core), by one process limited to one thread, by P processes with
the default pool each (what the workers did before they got their share) and by P processes
limited to ``cores // P`` threads each (``MMAT_CPU_THREADS``, what they do now). Each process
reads its slice of the tables after one warm-up image. Printed: images/s of each setting
(the slowest process sets the pace), its ratio to the first, and whether every setting read
every table to the same text, boxes and scores.

    python benchmarks/ocr_threads.py [--images 40] [--processes 2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TABMWP = REPO.parent / "shared" / "data" / "tabmwp"


def read(args: tuple[list[str], int | None]) -> tuple[float, list[Any]]:
    """Child: OCR ``images`` limited to ``threads`` (None: the default); seconds and results."""
    images, threads = args
    sys.path.insert(0, str(REPO))
    from mmat_assets.toolkit.cpu import THREADS_ENV

    if threads:
        os.environ[THREADS_ENV] = str(threads)
    else:  # "default pool" means onnxruntime's default, even where the caller's shell set a limit
        os.environ.pop(THREADS_ENV, None)
    from mmat_plugins.tools_ocr import OcrTool

    tool = OcrTool({})
    tool.run(Path(images[0]), {})  # loads the models
    start = time.perf_counter()
    results = [tool.run(Path(image), {}) for image in images]
    seconds = time.perf_counter() - start
    return seconds, [[r.text, r.data.get("boxes"), r.data.get("scores")] for r in results]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="OCR throughput with the cores split between processes.")
    ap.add_argument("--images", type=int, default=40, help="TabMWP tables to read (default 40)")
    ap.add_argument("--processes", type=int, default=2, help="processes of the split settings (default 2)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from mmat_assets.toolkit.cpu import cores

    problems = json.loads((TABMWP / "problems.json").read_text(encoding="utf-8"))
    images = [str(TABMWP / "tables" / f"{pid}.png") for pid in list(problems)[:args.images]]
    p, share = args.processes, max(1, cores() // args.processes)
    settings = [("1 process, default pool", 1, None), ("1 process, 1 thread", 1, 1),
                (f"{p} processes, default pool each", p, None),
                (f"{p} processes, {share} thread(s) each", p, share)]
    ctx = mp.get_context("spawn")
    base, texts = 0.0, {}
    for label, procs, threads in settings:
        slices = [images[i::procs] for i in range(procs)]
        with ctx.Pool(procs) as pool:
            out = pool.map(read, [(s, threads) for s in slices])
        rate = len(images) / max(seconds for seconds, _ in out)
        base = base or rate
        texts[label] = sorted(json.dumps(r) for _, results in out for r in results)
        print(f"{label}: {rate:.2f} images/s ({rate / base:.2f}x)", flush=True)
    same = len({json.dumps(t) for t in texts.values()}) == 1
    print(f"{len(images)} tables, {cores()} cores; the same text, boxes and scores in every setting: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
