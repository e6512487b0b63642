"""Tool layer overhead, cache speed-up and retriever latency.

1. OCR over N TabMWP table images through ``call_tool`` with a fresh cache, and through a
   plain ``rapidocr`` loop on the same images in the same run (interleaved per image, so
   machine noise hits both alike). Target: tool layer >= 0.9x the plain throughput.
2. The same calls again through the cache, opened from the storage root in a fresh work
   directory (as another machine would). Target: >= 100x faster than the uncached run.
3. LanceDB hybrid search over the Wikipedia summaries: p50 / p95 latency of Q queries.

    python benchmarks/tools.py [--images 50] [--queries 100] [--index-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from mmat_assets.engine.cache import ResultCache
from mmat_assets.engine.tools import call_tool, file_sha256
from mmat_plugins.retrievers_lancedb import LanceDBRetriever
from mmat_plugins.tools_ocr import OcrTool

TABMWP = Path(__file__).resolve().parents[2] / "shared" / "data" / "tabmwp"


def table_images(n: int) -> list[Path]:
    problems = json.loads((TABMWP / "problems.json").read_text(encoding="utf-8"))
    return [TABMWP / "tables" / f"{pid}.png" for pid in list(problems)[:n]]


def bench_ocr(images: list[Path], store: Path) -> None:
    from rapidocr import RapidOCR

    plain, tool = RapidOCR(params={"Global.log_level": "warning"}), OcrTool()  # same config
    plain(str(images[0]))
    tool.engine()(str(images[0]))  # both engines loaded and warm before timing
    shas = [file_sha256(p) for p in images]
    t_plain = t_tool = 0.0
    with ResultCache(store, "tools", 0, work_dir=store.parent / "work-a") as cache:
        for path, sha in zip(images, shas, strict=True):
            start = time.perf_counter()
            plain(str(path))
            t_plain += time.perf_counter() - start
            start = time.perf_counter()
            call = call_tool(tool, path, sha, {}, cache)
            t_tool += time.perf_counter() - start
            assert call.error is None and not call.cached, call.error
    n = len(images)
    print(f"OCR, {n} TabMWP images")
    print(f"  plain rapidocr loop : {n / t_plain:7.2f} images/s ({t_plain:.2f} s)")
    print(f"  tool layer, no hits : {n / t_tool:7.2f} images/s ({t_tool:.2f} s)")
    print(f"  ratio tool/plain    : {t_plain / t_tool:7.3f}x   (target >= 0.9x)")
    bench_cached(tool, images, shas, store, t_tool)


def bench_cached(tool: OcrTool, images: list[Path], shas: list[str], store: Path,
                 t_tool: float) -> None:
    start = time.perf_counter()
    cache = ResultCache(store, "tools", 0, work_dir=store.parent / "work-b")
    t_open = time.perf_counter() - start
    start = time.perf_counter()
    calls = [call_tool(tool, p, s, {}, cache) for p, s in zip(images, shas, strict=True)]
    t_hits = time.perf_counter() - start
    cache.close()
    assert all(c.cached for c in calls) and cache.stats.hits == len(images)
    print(f"  rerun through cache : {t_hits * 1000:.2f} ms for {len(images)} calls "
          f"(+ {t_open * 1000:.1f} ms to open the shard from storage)")
    print(f"  cache speed-up      : {t_tool / t_hits:,.0f}x calls only, "
          f"{t_tool / (t_hits + t_open):,.0f}x with the open   (target >= 100x)")


def bench_retriever(n: int, index_dir: Path | None, embed_max_tokens: int) -> None:
    options: dict[str, Any] = {"embed_max_tokens": embed_max_tokens}
    if index_dir is not None:
        options["index_dir"] = str(index_dir)
    retriever = LanceDBRetriever(options)
    built = (retriever.index_dir() / "meta.json").is_file()
    start = time.perf_counter()
    retriever.search("warm up", 3)  # loads the encoder; builds the index on first use
    print(f"LanceDB hybrid search ({time.perf_counter() - start:.1f} s to "
          f"{'load' if built else 'build and load'} the index)")
    titles = random.Random(0).sample([d["title"] for d in retriever.documents()], n)
    times, hits = [], 0
    for title in titles:
        query = f"What is {title} known for?"
        start = time.perf_counter()
        top = retriever.search(query, 3)
        times.append(time.perf_counter() - start)
        hits += title in {p.title for p in top}
    q = statistics.quantiles(times, n=100)
    print(f"  {n} queries: p50 {q[49] * 1000:.1f} ms, p95 {q[94] * 1000:.1f} ms, "
          f"title in top 3 for {hits}/{n}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--index-dir", type=Path, default=None,
                        help="LanceDB index directory (reused when its fingerprint matches)")
    parser.add_argument("--embed-max-tokens", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bench_ocr(table_images(args.images), Path(tmp) / "store")
    bench_retriever(args.queries, args.index_dir, args.embed_max_tokens)


if __name__ == "__main__":
    main()
