"""The tool-result cache: keys, hit/miss counts, killed runs, many writers, S3 on moto."""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from upath import UPath

from mmat_assets.contracts import Passage, Retriever, Tool, ToolResult
from mmat_assets.engine.cache import ResultCache, cache_key
from mmat_assets.engine.tools import call_tool, file_sha256, search_cached
from mmat_plugins.tools_face import FaceDetectionTool
from tests.conftest_tools import astronaut_png, tabmwp_image, tabmwp_problems  # noqa: F401
from tests.moto_s3 import moto_s3


class Counting(Tool):
    """Wraps a real tool and counts how often it really runs."""

    name = "face_detection"

    def __init__(self, inner: Tool) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def run(self, image: Path, args: Mapping[str, Any]) -> ToolResult:
        self.calls += 1
        return self.inner.run(image, args)


class Flaky(Tool):
    name = "flaky"

    def run(self, image: Path, args: Mapping[str, Any]) -> ToolResult:
        return ToolResult("", error="temporary failure")


@pytest.fixture(scope="module")
def images(astronaut_png: Path) -> list[Path]:
    return [astronaut_png] + [tabmwp_image(pid) for pid in list(tabmwp_problems())[:5]]


def run_all(tool: Tool, images: list[Path], cache: ResultCache) -> list[Any]:
    return [call_tool(tool, p, file_sha256(p), {}, cache) for p in images]


# ---------------------------------------------------------------------- keys


def test_key_depends_on_every_part() -> None:
    base = cache_key("ocr", "1.0.0", {"a": 1, "b": [1, 2]}, "abc", {"min_score": 0.5})
    assert base == cache_key("ocr", "1.0.0", {"b": [1, 2], "a": 1}, "abc", {"min_score": 0.5})
    for other in (cache_key("ocr", "1.0.1", {"a": 1, "b": [1, 2]}, "abc", {"min_score": 0.5}),
                  cache_key("face", "1.0.0", {"a": 1, "b": [1, 2]}, "abc", {"min_score": 0.5}),
                  cache_key("ocr", "1.0.0", {"a": 2, "b": [1, 2]}, "abc", {"min_score": 0.5}),
                  cache_key("ocr", "1.0.0", {"a": 1, "b": [1, 2]}, "abd", {"min_score": 0.5}),
                  cache_key("ocr", "1.0.0", {"a": 1, "b": [1, 2]}, "abc", {"min_score": 0.6})):
        assert other != base


# -------------------------------------------------------------------- local


def test_second_run_does_no_tool_work(tmp_path: Path, images: list[Path]) -> None:
    tool = Counting(FaceDetectionTool())
    with ResultCache(tmp_path / "store", "tools", 3, work_dir=tmp_path / "w1") as cache:
        first = run_all(tool, images, cache)
        assert (cache.stats.hits, cache.stats.misses, cache.stats.writes) == (0, 6, 6)
    assert tool.calls == 6
    # Another machine: a fresh work dir, so every hit must come from the storage root.
    with ResultCache(tmp_path / "store", "tools", 3, work_dir=tmp_path / "w2") as cache:
        second = run_all(tool, images, cache)
        assert (cache.stats.hits, cache.stats.misses) == (6, 0)
        assert cache.stats.loaded == 6
    assert tool.calls == 6
    assert [c.text for c in second] == [c.text for c in first]
    assert all(c.cached for c in second) and not any(c.cached for c in first)
    assert second[0].text.startswith("There is one face")
    shard = tmp_path / "store" / "tools" / "3"
    assert len(list(shard.glob("*.sqlite"))) == 1  # one segment per run
    # the answers published for concurrent runs are in the segment now: removed, like the leases
    assert not [p for p in shard.rglob("*") if p.is_file() and p.suffix != ".sqlite" and p.name != ".guard"]


def test_errors_are_not_cached(tmp_path: Path, images: list[Path]) -> None:
    cache = ResultCache(tmp_path / "store", "tools", 0, work_dir=tmp_path / "w")
    for _ in range(2):
        call = call_tool(Flaky(), images[0], None, {}, cache)
        assert call.error == "temporary failure" and not call.cached
    assert cache.stats.writes == 0 and len(cache) == 0
    cache.close()


def test_a_store_made_again_at_the_same_place_starts_empty(tmp_path: Path) -> None:
    """The work file outlives a deleted store; the store made again must not get its answers."""
    root, key = tmp_path / "store", "a" * 64
    first = ResultCache(root, "teacher", 0)  # no work_dir: the work file is in the system temp folder
    first.put(key, {"content": "paid for once"})
    first.close()
    works = [first.local_path]
    try:
        reopened = ResultCache(root, "teacher", 0)
        assert reopened.get(key) == {"content": "paid for once"}
        reopened.close()
        shutil.rmtree(root)
        again = ResultCache(root, "teacher", 0)
        works.append(again.local_path)
        assert again.get(key) is None
        again.close()
        assert works[0].exists() and works[1] != works[0]  # the old work file is left, not read
    finally:
        for work in works:
            shutil.rmtree(work.parent.parent, ignore_errors=True)


def test_killed_run_keeps_its_results(tmp_path: Path) -> None:
    cache = ResultCache(tmp_path / "store", "tools", 1, work_dir=tmp_path / "w")
    cache.put("k1", {"text": "one"})
    cache._db.close()  # killed: never flushed, never closed
    assert not (tmp_path / "store" / "tools" / "1").exists()
    again = ResultCache(tmp_path / "store", "tools", 1, work_dir=tmp_path / "w")
    assert again.get("k1") == {"text": "one"}
    assert len(list((tmp_path / "store" / "tools" / "1").iterdir())) == 1  # uploaded on open
    again.close()
    elsewhere = ResultCache(tmp_path / "store", "tools", 1, work_dir=tmp_path / "other")
    assert elsewhere.get("k1") == {"text": "one"}
    elsewhere.close()


def test_many_writers_lose_nothing_and_get_compacted(tmp_path: Path) -> None:
    store = tmp_path / "store"
    writers = [ResultCache(store, "tools", 7, work_dir=tmp_path / f"w{i}", compact_over=3)
               for i in range(5)]  # all open at once, as on five machines
    for i, cache in enumerate(writers):
        cache.put(f"key{i}", {"text": str(i)})
    for cache in writers:
        cache.close()
    assert len(list((store / "tools" / "7").iterdir())) == 5
    reader = ResultCache(store, "tools", 7, work_dir=tmp_path / "r", compact_over=3)
    assert [reader.get(f"key{i}") for i in range(5)] == [{"text": str(i)} for i in range(5)]
    reader.close()
    assert len(list((store / "tools" / "7").iterdir())) == 1  # compacted into one segment
    late = ResultCache(store, "tools", 7, work_dir=tmp_path / "late")
    assert late.get("key4") == {"text": "4"}
    late.close()


def test_flush_interval_uploads_during_the_run(tmp_path: Path) -> None:
    cache = ResultCache(tmp_path / "store", "tools", 2, work_dir=tmp_path / "w",
                        flush_interval_s=3600)
    cache.put("a", {"text": "a"})
    assert cache.stats.uploads == 0  # not due yet
    cache.flush_interval_s = 0
    cache.put("b", {"text": "b"})
    assert cache.stats.uploads == 1
    cache.close()
    assert cache.stats.uploads == 1  # nothing new since: close uploads nothing


def test_retrieval_results_are_cached(tmp_path: Path) -> None:
    class Fixed(Retriever):
        name = "fixed"
        calls = 0

        def search(self, query: str, k: int = 3) -> list[Passage]:
            self.calls += 1
            return [Passage(f"about {query}", title="T", source="s", score=0.5)][:k]

    retriever = Fixed()
    with ResultCache(tmp_path / "store", "retrieval", 0, work_dir=tmp_path / "w") as cache:
        first, cached1 = search_cached(retriever, "seurat", 3, cache)
        second, cached2 = search_cached(retriever, "seurat", 3, cache)
    assert (cached1, cached2, retriever.calls) == (False, True, 1)
    assert first == second == [Passage("about seurat", "T", "s", 0.5)]


# ----------------------------------------------------------------------- S3


@pytest.fixture(scope="module")
def s3_root() -> Iterator[str]:
    with moto_s3("mmat-cache", endpoint_env=True) as url:
        yield url


@pytest.mark.slow
def test_cache_on_s3(s3_root: str, tmp_path: Path, images: list[Path]) -> None:
    root = UPath("s3://mmat-cache/run", endpoint_url=s3_root)
    tool = Counting(FaceDetectionTool())
    with ResultCache(root, "tools", 5, work_dir=tmp_path / "a") as cache:
        run_all(tool, images, cache)
        assert (cache.stats.hits, cache.stats.misses) == (0, 6)
    with ResultCache(root, "tools", 5, work_dir=tmp_path / "b") as cache:
        calls = run_all(tool, images, cache)
        assert (cache.stats.hits, cache.stats.misses) == (6, 0)
    assert tool.calls == 6 and all(c.cached for c in calls)
    objects = [p for p in (root / "tools" / "5").iterdir()]
    assert len(objects) == 1 and objects[0].name.endswith(".sqlite")  # answers and leases cleaned up
