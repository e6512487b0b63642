"""Retrievers: LanceDB hybrid search over real Wikipedia summaries; web search over HTTP."""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from mmat_assets.assets.retrievers import build_retriever_assets
from mmat_assets.config import ProjectConfig
from mmat_assets.engine.tools import configured_retrievers
from mmat_assets.resources import StorageResource
from mmat_plugins.retrievers_lancedb import LanceDBRetriever
from mmat_plugins.retrievers_web import QuotaExceededError, WebSearchError, WebSearchRetriever
from tests.conftest_tools import tool_registry

#: Hand-written questions; any listed title answers the question (its text names the answer).
QUESTIONS: list[tuple[str, set[str]]] = [
    ("Who painted A Sunday Afternoon on the Island of La Grande Jatte?",
     {"Georges Seurat", "A Sunday Afternoon on the Island of La Grande Jatte"}),
    ("Which planet is known as the Red Planet?", {"Mars"}),
    ("Who wrote the novel Pride and Prejudice?", {"Jane Austen", "Pride and Prejudice"}),
    ("What is the largest ocean on Earth?", {"Pacific Ocean"}),
    ("Which metal has the chemical symbol Fe?", {"Iron"}),
    ("What is the capital city of Japan?", {"Tokyo"}),
    ("Who was the first person to walk on the Moon?", {"Neil Armstrong"}),
    ("Which organ pumps blood through the body?", {"Heart"}),
    ("Which river flows through Cairo?", {"Nile"}),
    ("Which composer wrote the Ninth Symphony with the Ode to Joy?",
     {"Ludwig van Beethoven", "Symphony No. 9 (Beethoven)"}),
]

#: The test embeds each summary's first 32 word pieces (about half the build time of 64).
TEST_OPTIONS = {"embed_max_tokens": 32}


@pytest.fixture(scope="module")
def wiki() -> LanceDBRetriever:
    """The Wikipedia index, kept outside the checkout (``$MMAT_TEST_CACHE``, default
    ``~/.cache/mmat``) so fresh clones reuse it: the build is redone only when its
    fingerprint (corpus, model, options) changes, sparing the ~1-2 minutes of embedding."""
    root = Path(os.environ.get("MMAT_TEST_CACHE") or Path.home() / ".cache" / "mmat")
    workdir = root / "test-lancedb-wiki"
    retriever = LanceDBRetriever(TEST_OPTIONS)
    assert retriever.availability().ok, retriever.availability().reason
    meta = retriever.build(workdir)
    assert meta["rows"] > 9_000
    return retriever


# --------------------------------------------------------------------- lancedb


@pytest.mark.slow
def test_wikipedia_questions_find_their_article(wiki: LanceDBRetriever) -> None:
    misses = []
    for question, titles in QUESTIONS:
        top = [p.title for p in wiki.search(question, k=3)]
        if not titles & set(top):
            misses.append((question, top))
    assert len(QUESTIONS) - len(misses) >= 8, misses


@pytest.mark.slow
def test_passages_carry_text_source_and_order(wiki: LanceDBRetriever) -> None:
    passages = wiki.search("Who painted A Sunday Afternoon on the Island of La Grande Jatte?", 3)
    assert len(passages) == 3
    assert [p.score for p in passages] == sorted((p.score for p in passages), reverse=True)
    best = next(p for p in passages if "Seurat" in p.text)
    assert best.source.startswith("https://en.wikipedia.org/wiki/")
    assert wiki.search("   ", 3) == [] and wiki.search("Mars", 0) == []
    assert len(wiki.search('odd "query: with (syntax) AND *', 2)) == 2


@pytest.mark.slow
def test_build_is_reused_when_nothing_changed(wiki: LanceDBRetriever) -> None:
    again = LanceDBRetriever(TEST_OPTIONS)
    meta = again.build(wiki.index_dir())
    assert meta["reused"] is True
    assert again.search("Which planet is known as the Red Planet?", 1)[0].title == "Mars"


def _corpus(path: Path) -> Path:
    docs = [{"title": "Zorblax", "text": "Zorblax is a purple fruit grown on Kepler moons."},
            {"title": "Quintor", "text": "Quintor is a board game played with nine stones."},
            {"title": "Empty", "text": ""}]
    path.write_text("\n".join(json.dumps(d) for d in docs), encoding="utf-8")
    return path


@pytest.mark.slow
def test_configured_corpus_and_asset(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path / "docs.jsonl")
    cfg = ProjectConfig.model_validate({"sources": {}, "retrievers": {
        "lancedb": {"options": {"corpus": str(corpus)}}, "web_search": {"enabled": False}}})
    assets = build_retriever_assets(cfg, tool_registry())
    assert [a.key.to_user_string() for a in assets] == ["retrievers/lancedb"]
    storage = StorageResource(root=str(tmp_path / "store"))
    result = dg.materialize(assets, resources={"storage": storage})
    meta: Any = result.get_asset_materialization_events()[0].materialization.metadata
    assert meta["dagster/row_count"].value == 2
    assert meta["available"].value is True
    assert (tmp_path / "store" / "retrievers" / "lancedb" / "meta.json").is_file()
    probes = meta["probes"].value
    assert len(probes) == 3 and all(p["error"] is None for p in probes)
    # The rationale stage finds the asset's index through configured_retrievers.
    retriever, _ = configured_retrievers(tool_registry(), cfg,
                                         index_root=tmp_path / "store" / "retrievers")["lancedb"]
    assert retriever is not None
    assert retriever.search("purple fruit", 1)[0].title == "Zorblax"


def test_lancedb_unavailable_reasons(tmp_path: Path) -> None:
    avail = LanceDBRetriever({"corpus": str(tmp_path / "missing.jsonl")}).availability()
    assert not avail.ok and "corpus file not found" in avail.reason
    avail = LanceDBRetriever({"model": str(tmp_path / "no-model")}).availability()
    assert not avail.ok and "embedding model directory not found" in avail.reason


# ------------------------------------------------------------------ web search


class Backend:
    """State of the local search server: what it answers next, what it saw."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.failures_left = 0
        self.requests: list[dict[str, Any]] = []


def _handler(backend: Backend) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep test output clean
            pass

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            url = urllib.parse.urlparse(self.path)
            query = urllib.parse.parse_qs(url.query)
            backend.requests.append({"path": url.path, "query": query,
                                     "auth": self.headers.get("Authorization")})
            if backend.mode == "slow":
                time.sleep(0.6)
            if backend.failures_left > 0:
                backend.failures_left -= 1
                return self._send(503, b"busy")
            if backend.mode == "missing":
                return self._send(404, b"no")
            results = [{"title": f"Result {i}", "content": f"{query['q'][0]} snippet {i}",
                        "url": f"http://example.invalid/{i}"} for i in range(5)]
            results.insert(1, {"title": "no content", "url": "http://example.invalid/x"})
            self._send(200, json.dumps({"results": results}).encode())

        def _send(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, Backend]]:
    backend = Backend()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(backend))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", backend
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture()
def backend(server: tuple[str, Backend]) -> Backend:
    backend = server[1]
    backend.mode, backend.failures_left = "ok", 0
    backend.requests.clear()
    return backend


def web(server: tuple[str, Backend], **options: Any) -> WebSearchRetriever:
    return WebSearchRetriever({"base_url": server[0], "backoff_s": 0.01, **options})


def test_web_search_returns_passages(server: tuple[str, Backend], backend: Backend,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMAT_TEST_SEARCH_KEY", "s3cret")
    retriever = web(server, api_key_env="MMAT_TEST_SEARCH_KEY", params={"language": "en"})
    passages = retriever.search("grande jatte", k=3)
    assert [p.title for p in passages] == ["Result 0", "Result 1", "Result 2"]
    assert passages[0].text == "grande jatte snippet 0"
    assert passages[0].source == "http://example.invalid/0"
    seen = backend.requests[0]
    assert seen["path"] == "/search" and seen["query"]["format"] == ["json"]
    assert seen["query"]["language"] == ["en"] and seen["auth"] == "Bearer s3cret"


def test_web_search_retries_transient_failures(server: tuple[str, Backend],
                                               backend: Backend) -> None:
    backend.failures_left = 2
    retriever = web(server, retries=2)
    assert len(retriever.search("x", 2)) == 2
    assert retriever.requests_sent == 3


def test_web_search_times_out_then_fails_clearly(server: tuple[str, Backend], backend: Backend,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMAT_TEST_SEARCH_KEY", "s3cret")
    backend.mode = "slow"
    retriever = web(server, timeout_s=0.2, retries=1, api_key_env="MMAT_TEST_SEARCH_KEY")
    start = time.perf_counter()
    with pytest.raises(WebSearchError, match="after 2 attempts") as err:
        retriever.search("x")
    assert time.perf_counter() - start < 2.0
    assert retriever.requests_sent == 2
    assert "s3cret" not in str(err.value)


def test_web_search_does_not_retry_client_errors(server: tuple[str, Backend],
                                                 backend: Backend) -> None:
    backend.mode = "missing"
    retriever = web(server, retries=3)
    with pytest.raises(WebSearchError, match="HTTP 404"):
        retriever.search("x")
    assert retriever.requests_sent == 1


def test_web_search_quota(server: tuple[str, Backend], backend: Backend) -> None:
    retriever = web(server, quota=2)
    retriever.search("a")
    retriever.search("b")
    with pytest.raises(QuotaExceededError, match="quota of 2 queries"):
        retriever.search("c")
    assert len(backend.requests) == 2


def test_web_search_unavailable_without_backend_or_key(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "base_url" in WebSearchRetriever().availability().reason
    monkeypatch.delenv("MMAT_TEST_NO_KEY", raising=False)
    avail = WebSearchRetriever({"base_url": "http://127.0.0.1:9",
                                "api_key_env": "MMAT_TEST_NO_KEY"}).availability()
    assert not avail.ok and "MMAT_TEST_NO_KEY" in avail.reason
    with pytest.raises(WebSearchError):
        WebSearchRetriever().search("x")
