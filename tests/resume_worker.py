"""Runs the rationale stage on one shard in its own process, for the resume test.

    python -m tests.resume_worker ROWS.parquet OUT.parquet CACHE_DIR BASE_URL

The teacher sends one request at a time, so a kill lands between two known requests;
every answered request is in the request cache under ``CACHE_DIR`` before the next is
sent, which is what a rerun resumes from.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import polars as pl

from mmat_assets.engine import stages
from mmat_assets.engine.cache import ResultCache
from mmat_assets.engine.rationale import Environment, StageSettings
from mmat_plugins.teachers_openai import OpenAITeacher
from tests.stage_fakes import EchoTool


def environment(base_url: str, cache_dir: Path) -> Environment:
    teacher = OpenAITeacher({"base_url": base_url, "model": "fake-teacher", "concurrency": 1,
                             "timeout_s": 20, "max_retries": 0})

    def cache(namespace: str) -> ResultCache:
        return ResultCache(None, namespace, 0, work_dir=cache_dir)

    return Environment(teacher, teacher.name, {"ocr": EchoTool()}, None, cache("tools"), cache("retrieval"),
                       cache("teacher"), Path, StageSettings(max_steps=3, concurrency=4))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("rows", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("cache_dir", type=Path)
    parser.add_argument("base_url")
    args = parser.parse_args(argv)
    env = environment(args.base_url, args.cache_dir)
    stages.run_rationales(pl.read_parquet(args.rows), env).write_parquet(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
