"""A key the server echoes inside a successful reply is never stored: not in the reply the
teacher returns, not in the request cache, and, after a real ``mmat build`` against a fake
server that quotes the key in every reply, in no file under the storage root, the Dagster
home or the local cache directory (Parquet tables and SQLite databases read value by value,
so compression cannot hide a hit)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sqlite3
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from mmat_assets.contracts import TeacherRequest
from mmat_assets.engine.rationale import STEP_SCHEMA, ask
from mmat_plugins.teachers_openai import OpenAITeacher
from tests.conftest import tabmwp_subset, write_project
from tests.openai_fake import FakeOpenAI
from tests.stage_fakes import environment

KEY_ENV = "MMAT_SCRUB_TEST_KEY"
KEY = "sk-scrub-test-CANARY-3b8e1f0a9c7d"
#: Not a secret: proves the scan reaches every place the key would have gone.
MARK = "THOUGHT-MARK-5d1c"
N_PROBLEMS = 2


def echoing(key: str) -> Callable[[dict[str, Any]], str]:
    """Replies whose every thought quotes ``key``, as a model repeating its prompt or a
    proxy's debug banner might. Step 0 reads the table; step 1 answers."""

    def reply(body: dict[str, Any]) -> str:
        texts = [c if isinstance(c, str) else " ".join(str(p.get("text") or "") for p in c if isinstance(p, dict))
                 for c in (m.get("content") or "" for m in body["messages"])]
        answer = re.search(r"Correct answer \(do not quote it\): ([^\n]*)", "\n".join(texts))
        if not any(m["role"] == "assistant" for m in body["messages"]):
            return json.dumps({"thought": f"{MARK} I read the table first (auth {key}).", "operators": ["ocr"],
                               "rag": {"needed": False, "query": None}, "next_action": "continue"})
        return json.dumps({"thought": f"{MARK} key={key}. The table gives it, so the answer is "
                           f"{answer[1] if answer else ''}.", "operators": [],
                           "rag": {"needed": False, "query": None}, "next_action": "final_answer"})

    return reply


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(reply=echoing(KEY)) as fake:
        yield fake


def _teacher(fake: FakeOpenAI) -> OpenAITeacher:
    return OpenAITeacher({"base_url": fake.base_url, "model": "fake-teacher", "api_key_env": KEY_ENV,
                          "timeout_s": 10.0, "max_retries": 1})


@pytest.mark.parametrize("key", [KEY, 'sk-"quoted\\slash\tkey-9f2e'])
def test_reply_and_request_cache_hold_no_key(key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, key)
    with FakeOpenAI(reply=echoing(key)) as fake:
        teacher = _teacher(fake)
        env = environment(teacher, {}, tmp_path)
        request = TeacherRequest("step", [{"role": "system", "content": "s"}, {"role": "user", "content": [
            {"type": "text", "text": "Question: q\nCorrect answer (do not quote it): 7"}]}], "t", STEP_SCHEMA)
        reply, record = asyncio.run(ask(env, request))
        text = teacher.complete({"messages": [{"role": "user", "content": "plain text please"}]})
        teacher.close()
    thought = json.loads(reply.content)["thought"]
    assert key not in thought and "***" in thought and MARK in thought  # also once the JSON is decoded
    assert key not in reply.content and key not in reply.model
    stored = env.request_cache.get(record["request_hash"])  # type: ignore[union-attr]
    assert stored is not None and MARK in stored["content"]
    assert key not in json.loads(stored["content"])["thought"] and key not in json.dumps(stored)
    assert key not in text.content and MARK in text.content  # replies that are not JSON too


# ------------------------------------------------------------------- a real build


def _project(tmp: Path, fake: FakeOpenAI) -> Path:
    tabmwp_subset(tmp / "tabmwp", N_PROBLEMS)
    teacher = {"plugin": "openai", "options": {"base_url": fake.base_url, "model": "fake-teacher",
                                               "api_key_env": KEY_ENV, "timeout_s": 20.0, "max_retries": 1}}
    return write_project(tmp, {"tabmwp": {"plugin": "tabmwp", "options": {"path": "tabmwp"}}}, shards=1,
                         tools={"label_bbox": {"enabled": False}, "image_caption": {"enabled": False},
                                "face_detection": {"enabled": False}},
                         teachers={"gpt": teacher}, stages={"teacher": "gpt", "max_steps": 3, "concurrency": 4})


def _values(path: Path) -> Iterator[bytes]:
    """The file's bytes, then every value inside it where the bytes may be compressed."""
    raw = path.read_bytes()
    yield raw
    if path.suffix == ".parquet":
        yield str(pl.read_parquet(path).to_dicts()).encode()
    if raw.startswith(b"SQLite format 3"):
        yield from _sqlite_values(path)


def _sqlite_values(path: Path) -> Iterator[bytes]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall():
            for row in db.execute(f'SELECT * FROM "{table}"'):
                for value in row:
                    if isinstance(value, bytes):
                        yield value
                        try:
                            yield zlib.decompress(value)  # Dagster compresses its snapshots
                        except zlib.error:
                            pass
                    elif value is not None:
                        yield str(value).encode()
    finally:
        db.close()


def _files_holding(roots: list[Path], needle: str) -> list[str]:
    hits = []
    for root in roots:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            if any(needle.encode() in chunk for chunk in _values(path)):
                hits.append(str(path.relative_to(root.parent)))
    return hits


@pytest.mark.slow
def test_a_key_echoed_in_successful_replies_is_stored_nowhere(server: FakeOpenAI, tmp_path: Path) -> None:
    cfg = _project(tmp_path, server)
    home, tmpdir = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmpdir.mkdir()
    env = {**os.environ, "DAGSTER_HOME": str(home), "TMPDIR": str(tmpdir), KEY_ENV: KEY, "COLUMNS": "200"}
    out = subprocess.run([str(Path(sys.executable).with_name("mmat")), "build", "--config", str(cfg),
                          "--select", "*dialogue_files"], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert server.total >= 2 * N_PROBLEMS and set(server.auth) == {"present"}  # the key was sent
    roots = [tmp_path / "store", home, tmpdir]
    reached = _files_holding(roots, MARK)
    # the replies' text did reach the tables, the JSONL, the caches and the Dagster database
    for where in ("store/tables/rationales/", "store/tables/rr_samples/", "store/tables/orr_samples/",
                  "store/cache/teacher/", "home/", ".jsonl"):
        assert any(where in hit for hit in reached), (where, reached)
    leaks = _files_holding(roots, KEY)
    assert leaks == [], "\n".join(leaks)
    assert KEY not in out.stdout + out.stderr
