"""Export: filter RR/ORR samples, pre-flight every record, hand the survivors to an exporter.

Fine-tuning frameworks do not say when they drop or bend a record (ms-swift adds a missing
``<image>`` tag and swaps a failing record for a random one; LLaMA-Factory truncates
through image tokens at ``cutoff_len``; InternVL silently replaces failures). So nothing
is called exported before pre-flight: role order, ``<image>`` placeholders equal to the
images, and — through the configured student's processor — no truncation through image
tokens at the configured max length and a non-empty assistant loss mask. Records that
fail are reported with their reasons and kept out.

Exports are relocatable: every path an exported file holds is relative to the export
folder, and nothing in the folder names a path of the machine that built it, so the folder
can be copied to another machine (or uploaded) and its data version does not depend on
where it was built.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from mmat_assets.toolkit.export import (IMAGE_TAG, NON_COMMERCIAL, Record, copy_images, is_non_commercial,
                                        licence_counts, relative_to, write_jsonl)
from mmat_assets.versions import doc_version


class ExportFilter(BaseModel):
    """Which samples an export takes."""

    model_config = ConfigDict(extra="forbid")
    sources: list[str] | None = Field(default=None, description="Keep only these sources (None: all).")
    licenses: list[str] | None = Field(default=None, description="Keep only these licences (None: all).")
    commercial_only: bool = Field(default=False, description="Drop rows under non-commercial licences.")
    min_quality: float | None = Field(default=None, description="Drop rows scored below this (unscored kept).")
    used_rag: bool | None = Field(default=None, description="True: only RAG rows; False: none; None: any.")
    reflected: bool | None = Field(default=None, description="True: only reflected rows; False: none; None: any.")


def apply_filter(df: pl.DataFrame, f: ExportFilter) -> pl.DataFrame:
    """The rows an export keeps."""
    out = df
    if f.sources is not None:
        out = out.filter(pl.col("source").is_in(f.sources))
    if f.licenses is not None:
        out = out.filter(pl.col("license").is_in(f.licenses))
    if f.commercial_only:
        out = out.filter(~pl.col("license").map_elements(is_non_commercial, return_dtype=pl.Boolean))
    if f.min_quality is not None:
        out = out.filter(pl.col("quality").is_null() | (pl.col("quality") >= f.min_quality))
    if f.used_rag is not None:
        out = out.filter(pl.col("used_rag").fill_null(False) == f.used_rag)
    if f.reflected is not None:
        out = out.filter(pl.col("reflected").fill_null(False) == f.reflected)
    return out


@dataclass
class Rejected:
    id: str
    format: str
    reason: str
    detail: str


def to_record(row: Mapping[str, Any], local_image: Callable[[str], Path]) -> Record:
    """A sample row as a record: ``<image>`` tags put in front of the first user turn."""
    images = [str(local_image(i["uri"])) for i in row["images"] or []]
    messages = [{"role": t["role"], "content": t["content"]} for t in row["turns"] or []]
    for m in messages:
        if m["role"] == "user":
            m["content"] = IMAGE_TAG * len(images) + m["content"]
            break
    meta = {k: row.get(k) for k in ("source", "dataset", "subset", "source_row_id", "license", "used_rag",
                                    "reflected", "checks", "quality", "shard")}
    return Record(str(row["sample_id"]), str(row["format"]), messages, images, meta)


# ------------------------------------------------------------------------ pre-flight


def role_order_error(messages: list[dict[str, str]]) -> str | None:
    """Legal order for every target format: optional system, then user/assistant pairs."""
    roles = [m["role"] for m in messages]
    if roles and roles[0] == "system":
        roles = roles[1:]
    if not roles or len(roles) % 2:
        return f"expected user/assistant pairs, got {len(roles)} turns after the system turn"
    for i, role in enumerate(roles):
        want = "user" if i % 2 == 0 else "assistant"
        if role != want:
            return f"turn {i + 1} is {role!r}, expected {want!r}"
    return None


def structural_errors(rec: Record) -> list[tuple[str, str]]:
    errors = []
    tags = sum(m["content"].count(IMAGE_TAG) for m in rec.messages)
    if tags != len(rec.images):
        errors.append(("image_count_mismatch", f"{tags} <image> placeholders for {len(rec.images)} images"))
    if (err := role_order_error(rec.messages)) is not None:
        errors.append(("role_order", err))
    missing = [p for p in rec.images if not Path(p).is_file()]
    if missing:  # by name: the reasons are written into the export folder
        errors.append(("missing_image", f"image file not found: {Path(missing[0]).name}"))
    return errors


def without_local_paths(text: str, rec: Record) -> str:
    """``text`` with the record's local image paths cut down to file names (the content hashes)."""
    for p in sorted(rec.images, key=len, reverse=True):
        text = text.replace(str(p), Path(p).name)
    return text


Encoder = Callable[[Record], Mapping[str, Any]]


def token_errors(rec: Record, encode: Encoder | None) -> list[tuple[str, str]]:
    """Checks through the student's chat template and processor (when one is configured)."""
    if encode is None:
        return []
    try:
        d = encode(rec)
    except Exception as exc:  # the trainer would fail (or skip) on it: refuse it here, by name
        return [("encode_failed", without_local_paths(f"{type(exc).__name__}: {exc}", rec))]
    errors = []
    if d.get("truncated_through_image"):
        errors.append(("truncated_through_image", "max length cuts into or before the image tokens"))
    elif d.get("truncated"):
        errors.append(("truncated", "longer than the max length; the trainer would cut or drop it"))
    if int(d.get("assistant_tokens", 1)) == 0:
        errors.append(("empty_loss_mask", "no assistant token left to learn from"))
    if d.get("n_image_placeholders") is not None and d.get("n_image_placeholders") != d.get("n_images"):
        errors.append(("image_count_mismatch", f"{d['n_image_placeholders']} placeholders for {d['n_images']} images"))
    return errors


def preflight(records: Iterable[Record], encode: Encoder | None) -> tuple[list[Record], list[Rejected]]:
    """Split records into those safe to export and those rejected, with reasons."""
    ok: list[Record] = []
    bad: list[Rejected] = []
    for rec in records:
        errors = structural_errors(rec)
        if not errors:
            errors = token_errors(rec, encode)
        if errors:
            bad.extend(Rejected(rec.id, rec.format, r, d) for r, d in errors)
        else:
            ok.append(rec)
    return ok, bad


# ---------------------------------------------------------------------------- version


def export_version(exporter: str, version: str, records: Mapping[str, list[Record]],
                   context: Mapping[str, Any]) -> str:
    """Content hash of what an export holds, known before a file is written (a dataset card
    quotes it): the exporter and its version, the card context, and every record with its
    images by file name, which is the image's content hash. No local path enters it, so the
    same data built in two folders or on two machines has one version."""
    recs = {fmt: [{"id": r.id, "format": r.format, "messages": r.messages, "meta": r.meta,
                   "images": [Path(p).name for p in r.images]} for r in rs] for fmt, rs in records.items()}
    return doc_version({"exporter": exporter, "version": version, "context": context, "records": recs})


__all__ = [
    "IMAGE_TAG",
    "NON_COMMERCIAL",
    "Encoder",
    "ExportFilter",
    "Record",
    "Rejected",
    "apply_filter",
    "copy_images",
    "export_version",
    "is_non_commercial",
    "licence_counts",
    "preflight",
    "relative_to",
    "role_order_error",
    "structural_errors",
    "to_record",
    "token_errors",
    "without_local_paths",
    "write_jsonl",
]
