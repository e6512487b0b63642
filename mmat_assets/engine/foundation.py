"""Foundation: read source rows into samples, normalise, dedup, sample by quota, shard.

Row-by-row work (reading files, hashing images) happens once per source in
:func:`ingest`; everything after it is vectorised polars over metadata only, so it scales
to millions of rows (``benchmarks/foundation.py`` measures it).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import polars as pl

from mmat_assets import records
from mmat_assets.contracts import BadRow, ImageInput, Source, SourceRow
from mmat_assets.engine.images import ImageError, ImageLimits, inspect_image, resolve_image_path

if TYPE_CHECKING:
    from polars.expr.whenthen import ChainedThen, Then
from mmat_assets.media import MediaStore

SHORT_ANSWER = "Answer the question using a single word or phrase."
OPTION_LETTER = "Answer with the option's letter from the given choices directly."
STYLE_BY_TYPE = {
    "number": SHORT_ANSWER,
    "yes_no": SHORT_ANSWER,
    "text": SHORT_ANSWER,
    "option": OPTION_LETTER,
    "free_form": "",
}
_NUMBER = r"^[-+]?\$?\s*(\d{1,3}(,\d{3})+|\d+)?(\.\d+)?%?$|^[-+]?\d+\s*/\s*\d+$"
_LETTER = r"^\(?[A-Za-z]\)?\.?$"


@dataclass
class Ingested:
    """Result of reading one source: good samples, quarantined rows, counters."""

    samples: pl.DataFrame
    quarantine: pl.DataFrame
    counts: dict[str, int] = field(default_factory=dict)


class SourceFailed(RuntimeError):
    """The source's reader cannot go on (missing file, broken document, a reader that raised).

    Raised, never quarantined: a source that stops part way would otherwise lose every later
    row without a word.
    """


# ---------------------------------------------------------------------------- ingest


def ingest(source: Source, source_name: str, media: MediaStore, limits: ImageLimits) -> Ingested:
    """Read every row of ``source``; store its images; quarantine what cannot be used.

    Each row that cannot be used, whatever it raises, becomes that row's quarantine entry
    and the next row is read; :class:`SourceFailed` when the reader itself breaks.
    """
    good: list[dict[str, Any]] = []
    bad: list[dict[str, Any]] = []
    seen_images: dict[Any, dict[str, Any]] = {}
    read = 0  # counted apart from the two lists, so the accounting check can catch a lost row
    for row in _rows(source, source_name):
        read += 1
        if isinstance(row, BadRow):
            bad.append(_quarantine(source_name, row.row_id, "bad_row", row.reason, row.raw))
            continue
        try:
            good.append(_sample(source, source_name, row, media, limits, seen_images))
        except RowError as exc:
            bad.append(_quarantine(source_name, row.row_id, exc.reason, str(exc), _raw(row)))
        except Exception as exc:  # any other fault of one row is that row's, not the source's
            bad.append(_quarantine(source_name, row.row_id, "unusable_row", f"{type(exc).__name__}: {exc}",
                                   _raw(row)))
    samples = pl.DataFrame(good, schema=records.FOUNDATION_COLUMNS) if good else _empty_foundation()
    quarantine = pl.DataFrame(bad, schema=records.QUARANTINE_SCHEMA) if bad else records.empty_quarantine()
    return Ingested(samples, quarantine, {"read": read, "ok": len(good), "quarantined": len(bad)})


def _rows(source: Source, source_name: str) -> Iterator[SourceRow | BadRow]:
    """The reader's rows; anything it yields that is not a row is a BadRow of its own."""
    n = 0
    try:
        for row in source.read():
            n += 1
            if isinstance(row, (SourceRow, BadRow)):
                yield row
            else:
                yield BadRow(f"item {n}", f"the reader yielded a {type(row).__name__}, not a row",
                             repr(row)[:200])
    except Exception as exc:
        where = "cannot be read" if n == 0 else f"stopped after {n} row{'' if n == 1 else 's'}"
        raise SourceFailed(f"source {source_name!r} ({source.name}) {where}: "
                           f"{type(exc).__name__}: {exc}") from exc


class RowError(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _empty_foundation() -> pl.DataFrame:
    return pl.DataFrame(schema=records.FOUNDATION_COLUMNS)


def _quarantine(source: str, row_id: Any, reason: str, detail: Any, raw: Any) -> dict[str, Any]:
    # str(): a third-party BadRow may carry anything; safe_text: the entry itself must be storable
    return {"source": source, "source_row_id": safe_text(str(row_id)), "stage": "foundation",
            "reason": reason, "detail": safe_text(str(detail)), "raw": safe_text(str(raw)[:10_000])}


def safe_text(text: str) -> str:
    """``text`` with lone surrogates written as ``\\udXXX`` escapes: storable as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _raw(row: SourceRow) -> str:
    try:
        return json.dumps({"question": row.question, "answer": row.answer, "subset": row.subset,
                           "images": [i.path for i in row.images]}, ensure_ascii=False, default=repr)
    except Exception:  # a row odd enough to fail here is still quarantined, with what repr shows
        return repr(row)[:2000]


def _check_text(sample: dict[str, Any]) -> None:
    """Every text of the sample must be storable as UTF-8 (Parquet refuses lone surrogates)."""
    for key, value in sample.items():
        texts = value if isinstance(value, list) else [value]
        for text in texts:
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as exc:
                    raise RowError("invalid_text", f"{key!r} is not valid UTF-8 text: lone surrogate "
                                   f"U+{ord(text[exc.start]):04X} at position {exc.start}") from None


def _sample(source: Source, source_name: str, row: SourceRow, media: MediaStore,
            limits: ImageLimits, seen: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    question = (row.question or "").strip()
    if not question:
        raise RowError("empty_question", "the question is empty")
    if not str(row.answer or "").strip():
        raise RowError("empty_answer", "the gold answer is empty")
    sample: dict[str, Any] = {
        "sample_id": "",
        "source": source_name,
        "dataset": source.dataset or source.name,
        "subset": row.subset or "",
        "source_row_id": str(row.row_id),
        "license": row.license or source.row_license(),
        "images": [],
        "image_key": "",
        "question": question,
        "choices": [str(c) for c in row.choices],
        "answer": str(row.answer).strip(),
        "answer_type": row.answer_type,
        "rationale": row.rationale,
        "style": None,
        "meta": json.dumps(row.meta, ensure_ascii=False, sort_keys=True, default=str),
        "shard": None,
    }
    _check_text(sample)  # before any image is stored for a row that cannot be kept
    images = [_store_image(source, img, media, limits, seen) for img in row.images]
    sample.update(sample_id=records.sample_id(source_name, row.row_id, question), images=images,
                  image_key=images[0]["sha256"] if images else "")
    return sample


def _store_image(source: Source, img: ImageInput, media: MediaStore, limits: ImageLimits,
                 seen: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    key = img.path if img.path is not None else hashlib.sha256(img.data or b"").hexdigest()
    if key in seen:  # many questions share one image: validate and store it once
        return seen[key]
    try:
        if img.path is not None:
            data = resolve_image_path(source.image_root(), img.path).read_bytes()
        else:
            data = img.data or b""
        info = inspect_image(data, limits)
    except ImageError as exc:
        raise RowError(exc.reason, str(exc)) from None
    except OSError as exc:
        raise RowError("unreadable_image", f"cannot read image {img.path!r}: {exc}") from None
    digest, uri = media.put(data, info.ext)
    ref = {"sha256": digest, "uri": uri, "width": info.width, "height": info.height}
    seen[key] = ref
    return ref


# ------------------------------------------------------------ vectorised stage logic


def normalised_question() -> pl.Expr:
    """Question folded for duplicate detection: case, spacing and end punctuation."""
    return (
        pl.col("question").str.to_lowercase().str.replace_all(r"\s+", " ")
        .str.strip_chars().str.strip_chars_end("?.! ")
    )


def infer_answer_type() -> pl.Expr:
    """Answer type where the source gave none: option letter, yes/no, number, text."""
    ans = pl.col("answer").str.strip_chars()
    has_choices = pl.col("choices").list.len() > 0
    return (
        pl.when(pl.col("answer_type").is_not_null()).then(pl.col("answer_type"))
        .when(has_choices & ans.str.contains(_LETTER)).then(pl.lit("option"))
        .when(ans.str.to_lowercase().is_in(["yes", "no"])).then(pl.lit("yes_no"))
        .when(ans.str.contains(_NUMBER)).then(pl.lit("number"))
        .when(ans.str.count_matches(" ", literal=True) <= 5).then(pl.lit("text"))
        .otherwise(pl.lit("free_form"))
    )


def style_constraint() -> pl.Expr:
    """SPEC §2.1: one style sentence per answer type, so answer styles agree across sources."""
    expr: Then | ChainedThen = pl.when(pl.lit(False)).then(pl.lit(""))
    for kind, text in STYLE_BY_TYPE.items():
        expr = expr.when(pl.col("answer_type") == kind).then(pl.lit(text))
    return expr.otherwise(pl.lit(SHORT_ANSWER))


def normalise(df: pl.DataFrame | pl.LazyFrame) -> pl.LazyFrame:
    """Fill answer type and style constraint; the gold answer itself is never changed."""
    return df.lazy().with_columns(answer_type=infer_answer_type()).with_columns(style=style_constraint())


def dedup(df: pl.DataFrame | pl.LazyFrame) -> pl.LazyFrame:
    """Drop exact duplicates: same first image and same normalised question (first kept)."""
    return (
        df.lazy().with_columns(_qkey=normalised_question())
        .unique(subset=["image_key", "_qkey"], keep="first", maintain_order=True)
        .drop("_qkey")
    )


def shard_of(n_shards: int) -> pl.Expr:
    """Stable shard by image hash, so all questions about one image share a shard.

    Rows without an image fall back to their sample id. Taken from the hex digest itself,
    never from a process-dependent hash.
    """
    key = pl.when(pl.col("image_key") != "").then(pl.col("image_key")).otherwise(pl.col("sample_id"))
    return (key.str.slice(0, 12).str.to_integer(base=16) % n_shards).cast(pl.Int32)


def assign_shards(df: pl.DataFrame | pl.LazyFrame, n_shards: int) -> pl.LazyFrame:
    return df.lazy().with_columns(shard=shard_of(n_shards))


def quota_rank(seed: int, ids: Iterable[str]) -> list[str]:
    """Seeded, process-independent sort key for each id."""
    return [hashlib.sha256(f"{seed}:{i}".encode()).hexdigest() for i in ids]


def duplicate_count(df: pl.DataFrame) -> int:
    """Rows :func:`dedup` drops, counted on their own (not as a difference of heights)."""
    if df.is_empty():
        return 0
    first = pl.struct(pl.col("image_key"), normalised_question()).is_first_distinct()
    return int(df.select((~first).sum()).item())


def sample_quota(df: pl.DataFrame, quota: int | Mapping[str, int] | None, seed: int) -> pl.DataFrame:
    """Keep at most ``quota`` rows per subset, chosen by a seeded hash (stable across reruns)."""
    return _quota(df, quota, seed)[0]


def _quota(df: pl.DataFrame, quota: int | Mapping[str, int] | None, seed: int) -> tuple[pl.DataFrame, int]:
    """The rows :func:`sample_quota` keeps, and how many it drops."""
    if quota is None or df.is_empty():
        return df, 0
    ranked = df.with_columns(_rank=pl.Series(quota_rank(seed, df["sample_id"].to_list())))
    if isinstance(quota, int):
        limit = pl.lit(quota)
    else:
        limit = pl.col("subset").replace_strict(dict(quota), default=None, return_dtype=pl.Int64)
    keep = (pl.col("_rank").rank("ordinal").over("subset") <= limit) | limit.is_null()
    marked = ranked.with_columns(_keep=keep)
    over = int(marked.select((~pl.col("_keep")).sum()).item())
    return marked.filter(pl.col("_keep")).drop("_rank", "_keep"), over


@dataclass
class Prepared:
    """A source's rows after Foundation's per-source steps, and what each step dropped."""

    samples: pl.DataFrame
    duplicates: int = 0
    over_quota: int = 0


def prepare_source_counted(df: pl.DataFrame, quota: int | Mapping[str, int] | None, seed: int,
                           n_shards: int) -> Prepared:
    """Per-source Foundation: normalise, dedup, quota, shard, counting what is dropped."""
    normalised = normalise(df).collect()
    out = assign_shards(dedup(normalised), n_shards).collect()
    kept, over = _quota(out, quota, seed)
    return Prepared(kept, duplicate_count(normalised), over)


def prepare_source(df: pl.DataFrame, quota: int | Mapping[str, int] | None, seed: int,
                   n_shards: int) -> pl.DataFrame:
    """Per-source Foundation: normalise, dedup, quota, shard (all rows stay in order)."""
    return prepare_source_counted(df, quota, seed, n_shards).samples


def row_accounting(ing: Ingested, prepared: Prepared) -> dict[str, int]:
    """Every term of rows read = kept + quarantined + dropped duplicates + dropped by quota."""
    return {"rows_read": ing.counts["read"], "rows_kept": prepared.samples.height,
            "rows_quarantined": ing.quarantine.height, "rows_dropped_duplicate": prepared.duplicates,
            "rows_dropped_by_quota": prepared.over_quota}


def foundation_shard(frames: Iterable[pl.DataFrame], shard: int) -> pl.DataFrame:
    """One shard of the Foundation table: its rows from every source, deduped across them."""
    parts = [f.lazy().filter(pl.col("shard") == shard) for f in frames]
    if not parts:
        return records.empty_samples()
    merged = dedup(pl.concat(parts, how="vertical")).collect()
    return records.conform(merged)
