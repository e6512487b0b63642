"""What content-hash data versions cost, next to what the assets already pay.

Every table asset hashes its output (``mmat_assets.versions.frame_version``) and the stage
assets hash the shard they read, so each shard is hashed about twice per stage. This
script builds the Foundation benchmark's synthetic rows (default 1,000,000), shards them
with the engine, and times in the same run, on the same frames:

- baseline: writing every shard as zstd Parquet (what the IO manager does anyway);
- hashing: ``frame_version`` of every shard, and of the whole source table once.

It prints the ratio hashing / Parquet writing. Usage::

    python benchmarks/data_versions.py [--rows 1000000] [--shards 256] [--repeat 3]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foundation import generate  # noqa: E402  (the same synthetic rows)

from mmat_assets.engine import foundation as fe  # noqa: E402
from mmat_assets.versions import frame_version  # noqa: E402


def best_of(repeat: int, fn) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows to generate")
    ap.add_argument("--shards", type=int, default=256, help="shard count")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each; the best is kept")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.parquet"
        generate(args.rows, path)
        source = fe.prepare_source(pl.read_parquet(path), None, 42, args.shards)
    shards = list(source.partition_by("shard"))
    size = source.estimated_size("mb")

    def write_all() -> None:
        for df in shards:
            df.write_parquet(io.BytesIO(), compression="zstd", statistics=True)

    def hash_all() -> None:
        for df in shards:
            frame_version(df)

    # interleaved, so both see the same machine load
    write_s = hash_s = float("inf")
    for _ in range(args.repeat):
        write_s = min(write_s, best_of(1, write_all))
        hash_s = min(hash_s, best_of(1, hash_all))
    whole_s = best_of(args.repeat, lambda: frame_version(source))
    print(f"{source.height:,} rows, {len(shards)} shards, {size:,.0f} MB in memory")
    print(f"parquet write, all shards: {write_s:.2f} s   ({size / write_s:,.0f} MB/s)")
    print(f"frame_version, all shards: {hash_s:.2f} s   ({size / hash_s:,.0f} MB/s)")
    print(f"frame_version, whole source table once: {whole_s:.2f} s")
    print(f"hashing / parquet writing: {hash_s / write_s:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
