"""Reading JSONL and JSON files record by record, so one bad record costs only itself.

Every JSONL line is decoded as strict UTF-8 and parsed on its own, so one corrupt line
becomes a :class:`~mmat_assets.contracts.BadRow` naming its line number while the rest of
the file is still read. The file is streamed, never loaded whole: training sets run to
gigabytes. A file that is one JSON object or list is parsed member by member, so there too
one bad value (a lone surrogate, an undecodable byte, nesting too deep to parse) costs only
its own record.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable, Iterable, Iterator
from json.decoder import scanstring  # type: ignore[attr-defined]  # public, though the stubs omit it
from pathlib import Path
from typing import Any, TypeVar

from mmat_assets.contracts import BadRow, SourceRow

#: Characters of a raw line kept in the quarantine table.
RAW_LIMIT = 2000
#: The reason given for a value nested deeper than Python's parser can follow.
TOO_DEEP = "nested too deeply to parse"

_T = TypeVar("_T")
_DECODER = json.JSONDecoder()
_WHITESPACE = re.compile(r"[ \t\n\r]*")
#: Characters that open or close a JSON container, or start a string (which may hold them).
_STRUCTURE = re.compile(r'["\[\]{}]')


def raw_excerpt(data: bytes | str) -> str:
    """A printable excerpt of a raw line (undecodable bytes shown as U+FFFD, lone
    surrogates as ``\\udXXX`` escapes, so the excerpt itself can always be stored)."""
    if isinstance(data, bytes):
        data = data[: RAW_LIMIT * 4].decode("utf-8", errors="replace")
    return data[:RAW_LIMIT].encode("utf-8", "backslashreplace").decode("utf-8")


def excerpt_of(value: Any) -> str:
    """A raw excerpt of a parsed value (never fails, whatever the value holds)."""
    try:
        return raw_excerpt(json.dumps(value, ensure_ascii=False, default=repr))
    except (ValueError, RecursionError):  # a circular or absurdly deep value
        return raw_excerpt(repr(value)[:RAW_LIMIT])


def text_problem(value: Any) -> str | None:
    """Why ``value`` cannot be stored as UTF-8 text (a lone surrogate inside it), or None.

    A JSON ``\\ud800`` escape, or a byte read with ``surrogateescape``, parses into a string
    that Parquet (and any UTF-8 writer) refuses; such a record must not reach a table.
    """
    try:
        json.dumps(value, ensure_ascii=False, default=str).encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(exc.object[exc.start])
        byte = f" (the undecodable byte 0x{code - 0xDC00:02X})" if 0xDC80 <= code <= 0xDCFF else ""
        return f"invalid UTF-8 text: lone surrogate U+{code:04X}{byte}"
    return None


def guarded(row_id: str, record: Any, build: Callable[[], _T]) -> _T | BadRow:
    """``build()``, or a BadRow naming what it raised: one odd record must not end the reader."""
    try:
        return build()
    except Exception as exc:  # any record-level failure is that record's, not the file's
        return BadRow(row_id, f"unusable record: {type(exc).__name__}: {exc}", excerpt_of(record))


def guarded_rows(row_id: str, record: Any,
                 build: Callable[[], Iterable[SourceRow | BadRow]]) -> list[SourceRow | BadRow]:
    """The rows one record yields, or one BadRow for the record if building them raised."""
    result = guarded(row_id, record, lambda: list(build()))
    return [result] if isinstance(result, BadRow) else result


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
            if line.strip():
                yield _parse_line(n, line)


def _parse_line(n: int, line: bytes) -> tuple[int, Any] | BadRow:
    try:
        text = line.decode("utf-8")  # strict: a mangled line must not slip through
    except UnicodeDecodeError as exc:
        return BadRow(line_id(n), f"invalid UTF-8: {exc}", raw_excerpt(line))
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return BadRow(line_id(n), f"invalid JSON: {exc}", raw_excerpt(text))
    except RecursionError:
        return BadRow(line_id(n), f"invalid JSON: {TOO_DEEP}", raw_excerpt(text))
    # strict decoding leaves no surrogates; only a \u escape can make one
    problem = text_problem(value) if "\\u" in text else None
    return BadRow(line_id(n), problem, raw_excerpt(text)) if problem else (n, value)


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


# ------------------------------------------------------------- whole JSON documents


def read_json_text(path: Path) -> str:
    """A JSON file as text; undecodable bytes become lone surrogates (``surrogateescape``)
    so that they cost only the record holding them (see :func:`text_problem`)."""
    return path.read_bytes().removeprefix(codecs.BOM_UTF8).decode("utf-8", errors="surrogateescape")


def iter_json_members(path: Path) -> Iterator[tuple[str, Any] | BadRow]:
    """``(key, value)`` per member of a file holding one JSON object (or ``(index, value)``
    for one JSON list), parsed one member at a time.

    A member that is nested too deeply or holds text that is not valid UTF-8 becomes a BadRow
    and the next member is read. A syntax error leaves no safe place to resume: it raises
    (the file is broken, not one record).
    """
    text = read_json_text(path)
    i = _skip_ws(text, 0)
    opener = text[i:i + 1]
    if opener not in ("{", "["):
        raise ValueError(f"{path}: expected a JSON object or list, found {text[i:i + 20]!r}")
    closer, keyed = ("}", True) if opener == "{" else ("]", False)
    i = _skip_ws(text, i + 1)
    n = 0
    while text[i:i + 1] != closer:
        if keyed:
            key, i = _member_key(text, i)
        else:
            key = str(n)
        start = i
        try:
            value, i = _DECODER.raw_decode(text, i)
        except RecursionError:
            i = _skip_container(text, i)
            yield BadRow(key, f"invalid JSON: {TOO_DEEP}", raw_excerpt(text[start:i]))
        else:
            problem = text_problem(value) or text_problem(key)
            yield BadRow(raw_excerpt(key), problem, raw_excerpt(text[start:i])) if problem else (key, value)
        n += 1
        i = _skip_ws(text, i)
        if text[i:i + 1] == ",":
            i = _skip_ws(text, i + 1)
        elif text[i:i + 1] != closer:
            raise json.JSONDecodeError(f"expected ',' or {closer!r}", text, i)


def _skip_ws(text: str, i: int) -> int:
    return _WHITESPACE.match(text, i).end()  # type: ignore[union-attr]  # always matches


def _member_key(text: str, i: int) -> tuple[str, int]:
    """An object member's key and the index just after its colon (and whitespace)."""
    if text[i:i + 1] != '"':
        raise json.JSONDecodeError("expected a member name in double quotes", text, i)
    key, i = scanstring(text, i + 1)
    i = _skip_ws(text, i)
    if text[i:i + 1] != ":":
        raise json.JSONDecodeError("expected ':'", text, i)
    return key, _skip_ws(text, i + 1)


def _skip_container(text: str, i: int) -> int:
    """The index just past the array/object starting at ``i``, found without recursion."""
    depth = 0
    while (m := _STRUCTURE.search(text, i)) is not None:
        c = m.group()
        if c == '"':
            _, i = scanstring(text, m.end())
            continue
        depth += 1 if c in "[{" else -1
        i = m.end()
        if depth == 0:
            return i
    raise json.JSONDecodeError("unterminated array or object", text, len(text))


__all__ = [
    "RAW_LIMIT",
    "TOO_DEEP",
    "excerpt_of",
    "guarded",
    "guarded_rows",
    "iter_json_members",
    "iter_jsonl",
    "iter_jsonl_objects",
    "line_id",
    "raw_excerpt",
    "read_json_text",
    "text_problem",
]
