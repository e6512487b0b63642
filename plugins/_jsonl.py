"""Line-by-line JSONL reading shared by the built-in sources (a private helper module).

Every line is decoded as strict UTF-8 and parsed on its own, so one corrupt line becomes a
:class:`~mmat_assets.contracts.BadRow` naming its line number while the rest of the file is
still read. The file is streamed, never loaded whole: training sets run to gigabytes.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmat_assets.contracts import BadRow

#: Characters of a raw line kept in the quarantine table.
RAW_LIMIT = 2000


def raw_excerpt(data: bytes | str) -> str:
    """A printable excerpt of a raw line (undecodable bytes shown as U+FFFD)."""
    if isinstance(data, bytes):
        data = data[: RAW_LIMIT * 4].decode("utf-8", errors="replace")
    return data[:RAW_LIMIT]


def line_id(n: int) -> str:
    """Row id of a line that could not be parsed far enough to find its own id."""
    return f"line {n}"


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any] | BadRow]:
    """Yield ``(line number, parsed value)`` per non-blank line, or a BadRow for that line.

    Line numbers start at 1 and count blank lines too, so they match an editor's.
    """
    with path.open("rb") as fh:
        for n, raw in enumerate(fh, start=1):
            line = raw.rstrip(b"\r\n")
            if n == 1:
                line = line.removeprefix(codecs.BOM_UTF8)  # some editors write one
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")  # strict: a mangled line must not slip through
            except UnicodeDecodeError as exc:
                yield BadRow(line_id(n), f"invalid UTF-8: {exc}", raw_excerpt(line))
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                yield BadRow(line_id(n), f"invalid JSON: {exc}", raw_excerpt(text))
                continue
            yield n, value


def iter_jsonl_objects(path: Path) -> Iterator[tuple[int, dict[str, Any]] | BadRow]:
    """Like :func:`iter_jsonl`, but a line holding anything other than an object is bad."""
    for item in iter_jsonl(path):
        if isinstance(item, BadRow):
            yield item
            continue
        n, value = item
        if isinstance(value, dict):
            yield n, value
        else:
            yield BadRow(line_id(n), f"not a JSON object: {type(value).__name__}",
                         raw_excerpt(json.dumps(value, ensure_ascii=False)))
