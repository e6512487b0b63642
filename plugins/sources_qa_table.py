"""A generic QA table: any JSONL or Parquet file, read through a column mapping.

For datasets without a dedicated source: the options say which column holds the question,
the answer, the image(s) and so on; every other column is kept in ``meta``. Images may be
paths under ``image_root`` (a string or a list of strings), raw bytes, or Hugging Face
image structs (``{"bytes", "path"}``). There is no default licence: the user must state it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from mmat_assets.contracts import BadRow, ImageInput, SourceRow
from mmat_assets.hookspecs import Register, hookimpl
from mmat_assets.toolkit.jsonl import excerpt_of, iter_jsonl_objects
from mmat_assets.toolkit.sources import FileSource, FileSourceOptions, guarded_records

#: Rows per Parquet batch: image columns can be large, so read a slice at a time.
BATCH_ROWS = 256


class _Malformed(ValueError):
    """A cell that does not fit its role; the row becomes a BadRow with this message."""


class QAColumns(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str = Field(description="Column holding the question text.")
    answer: str = Field(description="Column holding the gold answer (a list: its first item is gold).")
    id: str | None = Field(default=None, description="Column holding the row id; default the line/row number.")
    image: str | None = Field(
        default=None, description="Column holding an image path, a list of paths, or image bytes.",
    )
    choices: str | None = Field(default=None, description="Column holding the answer options (a list).")
    rationale: str | None = Field(default=None, description="Column holding a gold rationale.")
    subset: str | None = Field(default=None, description="Column holding the subset name.")
    answer_type: str | None = Field(default=None, description="Column holding the answer type.")

    def mapped(self) -> dict[str, str]:
        """Role -> column for every role that is mapped."""
        return {role: col for role, col in self.model_dump().items() if col is not None}


class QATableOptions(FileSourceOptions):
    path: str = Field(description="The JSONL or Parquet file to read.")
    format: Literal["auto", "jsonl", "parquet"] = Field(
        default="auto", description="File format; 'auto' goes by the extension (.parquet, else JSONL).",
    )
    columns: QAColumns = Field(description="Which column plays which role; unmapped columns go to meta.")
    license: str = Field(description="Licence of the data (required: there is no safe default).")
    dataset: str = Field(default="qa_table", description="Dataset family name recorded on every row.")


class QATableSource(FileSource[QATableOptions]):
    """Any JSONL/Parquet QA table, mapped column by column onto source rows."""

    name = "qa_table"
    version = "1.0.0"
    description = "Generic JSONL/Parquet QA table read through a column mapping (licence required)."

    def __init__(self, options: BaseModel | Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        # The family name is configuration here, not a property of the class.
        self.dataset = self.options.dataset  # type: ignore[misc]

    def file_format(self) -> str:
        if self.options.format != "auto":
            return self.options.format
        return "parquet" if self.file.suffix.lower() in {".parquet", ".pq"} else "jsonl"

    def read(self) -> Iterator[SourceRow | BadRow]:
        records = self._parquet() if self.file_format() == "parquet" else self._jsonl()
        yield from guarded_records(records, self._row)

    def _jsonl(self) -> Iterator[tuple[int, dict[str, Any]] | BadRow]:
        return iter_jsonl_objects(self.file)

    def _parquet(self) -> Iterator[tuple[int, dict[str, Any]]]:
        pf = pq.ParquetFile(self.file)
        cols = self.options.columns
        missing = [c for c in (cols.question, cols.answer) if c not in pf.schema_arrow.names]
        if missing:  # a whole-file problem: say so once rather than per row
            raise ValueError(f"{self.file}: no column(s) {missing} (has {pf.schema_arrow.names})")
        n = 0
        for batch in pf.iter_batches(batch_size=BATCH_ROWS):
            for record in batch.to_pylist():
                n += 1
                yield n, record

    def _row(self, n: int, rec: dict[str, Any]) -> SourceRow | BadRow:
        row_id = _id(rec, self.options.columns.id, n)
        try:
            return self._parse(row_id, rec)
        except _Malformed as exc:
            return BadRow(row_id, str(exc), excerpt_of(rec))

    def _parse(self, row_id: str, rec: dict[str, Any]) -> SourceRow:
        cols = self.options.columns
        for role, col in (("question", cols.question), ("answer", cols.answer)):
            if col not in rec:
                raise _Malformed(f"missing {role} column {col!r}")

        def cell(col: str | None) -> Any:
            return rec.get(col) if col else None

        answer, answers = _answer(rec[cols.answer])
        meta = {k: v for k, v in rec.items() if k not in set(cols.mapped().values())}
        if answers is not None:
            meta["answers"] = answers
        return SourceRow(
            row_id=row_id,
            question=_text(rec[cols.question], "question"),
            answer=answer,
            images=_images(cell(cols.image)),
            subset=_text(cell(cols.subset), "subset"),
            choices=_choices(cell(cols.choices)),
            rationale=_text(cell(cols.rationale), "rationale") or None,
            answer_type=_text(cell(cols.answer_type), "answer_type") or None,
            meta=meta,
        )


def _id(rec: dict[str, Any], col: str | None, n: int) -> str:
    """The id column's value, else the 1-based line (JSONL) or row (Parquet) number."""
    value = rec.get(col) if col else None
    if value is None or isinstance(value, (dict, list, bytes)) or str(value) == "":
        return str(n)
    return str(value)


def _text(value: Any, role: str) -> str:
    if value is None:
        return ""
    if isinstance(value, (dict, list, bytes)):
        raise _Malformed(f"{role} is not text: {type(value).__name__}")
    return str(value).strip()


def _answer(value: Any) -> tuple[str, list[str] | None]:
    """Gold answer; a list gives its first item as gold and all items for meta."""
    if isinstance(value, list):
        answers = [_text(v, "answer") for v in value]
        return (answers[0] if answers else ""), answers
    return _text(value, "answer"), None


def _choices(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)  # options stored as a JSON-encoded list
        except (json.JSONDecodeError, RecursionError) as exc:
            raise _Malformed(f"choices are not a valid JSON list: {exc}") from None
    if not isinstance(value, list):
        raise _Malformed(f"choices are not a list: {type(value).__name__}")
    return [_text(v, "choice") for v in value]


def _images(value: Any) -> list[ImageInput]:
    """A path, bytes, an image struct, or a list of any of those."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    return [_image(v) for v in items]


def _image(value: Any) -> ImageInput:
    if isinstance(value, str) and value:
        return ImageInput(path=value)
    if isinstance(value, bytes) and value:
        return ImageInput(data=value)
    if isinstance(value, dict):  # {"bytes", "path"}: prefer the embedded bytes
        if isinstance(value.get("bytes"), bytes) and value["bytes"]:
            return ImageInput(data=value["bytes"])
        if isinstance(value.get("path"), str) and value["path"]:
            return ImageInput(path=value["path"])
    raise _Malformed(f"image cell is not a path, bytes or image struct: {type(value).__name__}")


@hookimpl
def register_sources(register: Register) -> None:
    register(QATableSource)
