"""Export helpers: the record an exporter receives, and the files it writes.

An :class:`~mmat_assets.contracts.Exporter` gets its records as :class:`Record` lists by
format (``rr``, ``orr``), already pre-flighted by the host. Exports are relocatable: every
path an exported file holds is relative to the export folder (:func:`relative_to`), and
images are copied in under their content-hash names (:func:`copy_images`).
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The placeholder that stands for one image in a record's message text.
IMAGE_TAG = "<image>"
#: What marks a licence as non-commercial (``CC BY-NC-SA 4.0``, "non-commercial use only").
NON_COMMERCIAL = re.compile(r"\bNC\b|non-?commercial", re.I)


@dataclass
class Record:
    """One training record in the neutral form every exporter starts from."""

    id: str
    format: str  # rr | orr
    messages: list[dict[str, str]]  # first user turn carries one <image> tag per image
    images: list[str]  # local image files
    meta: dict[str, Any] = field(default_factory=dict)


def is_non_commercial(licence: str) -> bool:
    """Whether a licence string forbids commercial use."""
    return bool(NON_COMMERCIAL.search(licence or ""))


def copy_images(records: list[Record], out_dir: Path) -> dict[str, str]:
    """Copy every image once into ``out_dir/images`` (content-addressed names kept); return
    each local path's new path relative to ``out_dir``."""
    dest = out_dir / "images"
    dest.mkdir(parents=True, exist_ok=True)
    mapping: dict[str, str] = {}
    for rec in records:
        for path in rec.images:
            if path not in mapping:
                target = dest / Path(path).name
                if not target.exists():
                    shutil.copyfile(path, target)
                mapping[path] = f"images/{target.name}"
    return mapping


#: Writes one format's records: ``(format, records, images) -> the file written``, where
#: ``images`` maps each record's local image path to its path relative to the export folder.
FormatWriter = Callable[[str, list[Record], Mapping[str, str]], Path]


def write_formats(records: Mapping[str, list[Record]], out_dir: Path, write: FormatWriter) -> dict[str, str]:
    """Copy each format's images into ``out_dir/images`` and write the format's file with
    ``write``; return ``{format: file written}``, what an exporter's result starts from."""
    return {fmt: str(write(fmt, recs, copy_images(recs, out_dir))) for fmt, recs in records.items()}


#: Like :data:`FormatWriter`, but also returns the format's entry in the export's index file.
IndexedWriter = Callable[[str, list[Record], Mapping[str, str]], tuple[Path, dict[str, Any]]]


def write_indexed_formats(records: Mapping[str, list[Record]], out_dir: Path, write: IndexedWriter,
                          index: Path) -> dict[str, str]:
    """:func:`write_formats`, plus an index file naming every format's file, as training
    frameworks want one (InternVL's meta JSON, LLaMA-Factory's ``dataset_info.json``): each
    format is the dataset ``mmat_<format>`` there. The index is returned under its stem."""
    entries: dict[str, dict[str, Any]] = {}

    def one(fmt: str, recs: list[Record], images: Mapping[str, str]) -> Path:
        path, entries[f"mmat_{fmt}"] = write(fmt, recs, images)
        return path

    written = write_formats(records, out_dir, one)
    index.write_text(json.dumps(entries, indent=2), encoding="utf-8")
    written[index.stem] = str(index)
    return written


def relative_to(path: str | Path, folder: Path) -> str:
    """``path`` as written in an export: relative to the export folder (POSIX separators)."""
    p = Path(path)
    try:
        return p.resolve().relative_to(folder.resolve()).as_posix()
    except ValueError:  # outside the folder: keep only the name, never a local path
        return p.name


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write one JSON object a line (UTF-8, not ASCII-escaped); return the rows written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def licence_counts(records: list[Record]) -> list[dict[str, Any]]:
    """Rows per ``(source, licence)``, non-commercial ones marked: what a dataset card lists."""
    counts = Counter((r.meta.get("source"), r.meta.get("license")) for r in records)
    return [{"source": s, "license": lic, "rows": n, "non_commercial": is_non_commercial(str(lic))}
            for (s, lic), n in sorted(counts.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1])))]


__all__ = [
    "IMAGE_TAG",
    "NON_COMMERCIAL",
    "FormatWriter",
    "IndexedWriter",
    "Record",
    "copy_images",
    "is_non_commercial",
    "licence_counts",
    "relative_to",
    "write_formats",
    "write_indexed_formats",
    "write_jsonl",
]
