"""Foundation throughput at scale: the engine vs a minimal hand-written polars pipeline.

Generates N QA rows (metadata only: ids, questions, answers, image hashes; ~3 questions per
image, ~5% exact duplicates), then in separate processes (so peak memory is each one's own)
normalises, deduplicates and shards them twice: through ``mmat_assets.engine.foundation``
and through the least code that does the same work. Prints rows/s, peak RSS and the ratio.
Target: engine >= 0.5x the minimal pipeline's throughput, peak memory < 3 GB.

    python benchmarks/foundation.py [--rows 1000000] [--shards 256]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl


def generate(n: int, path: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    n_images = max(n // 3, 1)
    image = rng.integers(0, n_images, n)
    template = rng.integers(0, 50, n)
    dup = rng.random(n) < 0.05  # repeat the previous row's image and question
    image[1:][dup[1:]] = image[:-1][dup[1:]]
    template[1:][dup[1:]] = template[:-1][dup[1:]]
    kinds = rng.integers(0, 4, n)
    answers = np.where(kinds == 0, rng.integers(0, 10_000, n).astype(str),
                       np.where(kinds == 1, "Yes", np.where(kinds == 2, "B", "a red bicycle")))
    df = pl.DataFrame({
        "sample_id": [f"{i:024x}" for i in range(n)],
        "source": "bench",
        "dataset": "bench",
        "subset": [f"subset_{k}" for k in rng.integers(0, 20, n)],
        "source_row_id": [str(i) for i in range(n)],
        "license": "CC0-1.0",
        "images": None,
        "image_key": [hashlib.sha256(str(int(i)).encode()).hexdigest() for i in image],
        "question": [f"What is shown in part {t} of the image?" for t in template],
        "choices": [["A", "B", "C"] if k == 2 else [] for k in kinds],
        "answer": answers,
        "answer_type": None,
        "rationale": None,
        "style": None,
        "meta": "{}",
        "shard": None,
    })
    from mmat_assets import records

    df.cast({c: t for c, t in records.FOUNDATION_COLUMNS.items()}).write_parquet(path)


SHORT = "Answer the question using a single word or phrase."
OPTION = "Answer with the option's letter from the given choices directly."
NUMBER = r"^[-+]?\$?\s*(\d{1,3}(,\d{3})+|\d+)?(\.\d+)?%?$|^[-+]?\d+\s*/\s*\d+$"


def run_engine(path: Path, shards: int) -> int:
    from mmat_assets.engine import foundation as fe

    df = pl.read_parquet(path)
    start = time.perf_counter()
    out = fe.prepare_source(df, None, 42, shards)
    parts = out.partition_by("shard", as_dict=True)
    elapsed = time.perf_counter() - start
    return _report(out, len(parts), elapsed)


def run_minimal(path: Path, shards: int) -> int:
    df = pl.read_parquet(path)
    start = time.perf_counter()
    # Same semantics as the engine (answer type -> style; folded question), least code.
    ans = pl.col("answer").str.strip_chars()
    letter = (pl.col("choices").list.len() > 0) & ans.str.contains(r"^\(?[A-Za-z]\)?\.?$")
    free = ~ans.str.to_lowercase().is_in(["yes", "no"]) & ~ans.str.contains(NUMBER) \
        & (ans.str.count_matches(" ", literal=True) > 5)
    out = (
        df.lazy()
        .with_columns(style=pl.when(letter).then(pl.lit(OPTION)).when(free).then(pl.lit("")).otherwise(pl.lit(SHORT)))
        .with_columns(_q=pl.col("question").str.to_lowercase().str.replace_all(r"\s+", " ")
                      .str.strip_chars().str.strip_chars_end("?.! "))
        .unique(subset=["image_key", "_q"], keep="first", maintain_order=True)
        .drop("_q")
        .with_columns(shard=(pl.col("image_key").str.slice(0, 12).str.to_integer(base=16) % shards))
        .collect()
    )
    parts = out.partition_by("shard", as_dict=True)
    elapsed = time.perf_counter() - start
    return _report(out, len(parts), elapsed)


def _report(out: pl.DataFrame, n_parts: int, elapsed: float) -> int:
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    digest = out.select("sample_id", "style", "shard").hash_rows().sum()  # same rows, styles, shards?
    print(json.dumps({"rows_out": out.height, "shards": n_parts, "seconds": elapsed,
                      "peak_rss_mb": peak_kb / 1024, "digest": int(digest)}))
    return 0


def child(which: str, path: Path, shards: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", which, "--data", str(path), "--shards", str(shards)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows to generate")
    ap.add_argument("--shards", type=int, default=256, help="shard count")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each pipeline; the best is kept")
    ap.add_argument("--child", choices=["engine", "minimal"], help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return (run_engine if args.child == "engine" else run_minimal)(args.data, args.shards)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.parquet"
        t = time.perf_counter()
        generate(args.rows, path)
        print(f"generated {args.rows:,} rows in {time.perf_counter() - t:.1f} s")
        results = {}
        for which in ("minimal", "engine") * args.repeat:  # interleaved: both see the same machine load
            r = child(which, path, args.shards)
            best = results.get(which)
            if best is None or r["seconds"] < best["seconds"]:
                results[which] = {**r, "peak_rss_mb": max(r["peak_rss_mb"], (best or r)["peak_rss_mb"])}
    for which, r in results.items():
        print(f"{which:8s} rows out {r['rows_out']:>9,}  shards {r['shards']:>4}  "
              f"{args.rows / r['seconds']:>12,.0f} rows/s  peak RSS {r['peak_rss_mb']:,.0f} MB")
    assert results["engine"]["digest"] == results["minimal"]["digest"], "pipelines disagree on rows, styles or shards"
    ratio = results["minimal"]["seconds"] / results["engine"]["seconds"]
    print(f"engine/minimal throughput ratio: {ratio:.2f}x (target >= 0.5x); "
          f"engine peak {results['engine']['peak_rss_mb'] / 1024:.2f} GB (target < 3 GB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
