"""The one record schema that flows through every stage.

A **sample** is one QA pair about one or more images. Foundation fills the identity and
question columns; later stages fill the trajectory, tool-call and provenance columns,
which stay null until then. Media is held by reference: each image is a content hash plus
a URI into the content-addressed media store, never bytes in a table.

============== ================================ ===========================================
column         type                             meaning
============== ================================ ===========================================
sample_id      str                              sha256 of (source, source_row_id, question),
                                                first 24 hex digits; stable across runs
source         str                              configured source name (``tabmwp``)
dataset        str                              dataset family (``tabmwp``, ``llava_cot``...)
subset         str                              sub-dataset (``chartqa``, ``grade_5``...)
source_row_id  str                              the row's id in its source file
license        str                              licence of the row's source, carried to export
images         list[struct{sha256,uri,w,h}]     images by reference into the media store
image_key      str                              sha256 of the first image (shard key; ""
                                                when the row has no image)
question       str                              the question as the source wrote it
choices        list[str]                        options of a multiple-choice question
answer         str                              gold answer, unchanged
answer_type    str                              number | option | yes_no | text | free_form
rationale      str?                             gold rationale when the source has one
style          str                              style constraint appended to the question
meta           str                              JSON of source-specific extras
shard          int                              shard the row belongs to
status         str?                             ok | failed, after a stage ran on the row
failure        str?                             why a row left the training outputs
failure_stage  str?                             rationale | reflection
failure_detail str?                             the failure's message
trajectory     str?                             JSON of the reasoning (protocol.Trajectory)
steps          int?                             assistant steps in the trajectory
grounding      str?                             gold | gold:gap (derivation left out on purpose) | minimal (grounded teacher) | ""
used_rag       bool?                            the dialogue searched (ORR drops RAG text)
checks         list[str]?                       reflection checks that fired
reflected      bool?                            a reflection fix was inserted
format         str?                             rr | orr (integration outputs)
turns          list[struct{role,content}]?      rendered dialogue, system prompt first
tool_calls     list[struct{...}]?               each tool call: tool, version, args,
                                                cache key, result text, error
quality        float?                           quality-judge score 0-1
quality_reasons str?                            the judge's reasons
provenance     str?                             JSON: teacher calls (model, prompt
                                                version, request hash, tokens, cost), ...
lineage        str?                             JSON list: each asset partition that wrote
                                                the row, its code version and the data
                                                versions it read (not part of data versions)
============== ================================ ===========================================

Quarantined rows keep the same columns plus ``stage`` and ``reason`` (see
:data:`QUARANTINE_SCHEMA`), so nothing read is ever lost.
"""

from __future__ import annotations

import hashlib

import polars as pl

IMAGE_REF = pl.Struct(
    {"sha256": pl.String, "uri": pl.String, "width": pl.Int32, "height": pl.Int32}
)
TURN = pl.Struct({"role": pl.String, "content": pl.String})
TOOL_CALL = pl.Struct(
    {
        "tool": pl.String,
        "version": pl.String,
        "args": pl.String,
        "cache_key": pl.String,
        "text": pl.String,
        "error": pl.String,
    }
)

FOUNDATION_COLUMNS: dict[str, pl.DataType] = {
    "sample_id": pl.String(),
    "source": pl.String(),
    "dataset": pl.String(),
    "subset": pl.String(),
    "source_row_id": pl.String(),
    "license": pl.String(),
    "images": pl.List(IMAGE_REF),
    "image_key": pl.String(),
    "question": pl.String(),
    "choices": pl.List(pl.String),
    "answer": pl.String(),
    "answer_type": pl.String(),
    "rationale": pl.String(),
    "style": pl.String(),
    "meta": pl.String(),
    "shard": pl.Int32(),
}
STAGE_COLUMNS: dict[str, pl.DataType] = {
    "status": pl.String(),
    "failure": pl.String(),
    "failure_stage": pl.String(),
    "failure_detail": pl.String(),
    "trajectory": pl.String(),
    "steps": pl.Int32(),
    "grounding": pl.String(),
    "used_rag": pl.Boolean(),
    "checks": pl.List(pl.String),
    "reflected": pl.Boolean(),
    "format": pl.String(),
    "turns": pl.List(TURN),
    "tool_calls": pl.List(TOOL_CALL),
    "quality": pl.Float64(),
    "quality_reasons": pl.String(),
    "provenance": pl.String(),
    "lineage": pl.String(),
}
SAMPLE_SCHEMA = pl.Schema({**FOUNDATION_COLUMNS, **STAGE_COLUMNS})

QUARANTINE_SCHEMA = pl.Schema(
    {
        "source": pl.String(),
        "source_row_id": pl.String(),
        "stage": pl.String(),
        "reason": pl.String(),
        "detail": pl.String(),
        "raw": pl.String(),
    }
)

ANSWER_TYPES = ("number", "option", "yes_no", "text", "free_form")


def sample_id(source: str, source_row_id: str, question: str) -> str:
    """Stable id of a sample: a content hash, never Python's per-process ``hash()``."""
    digest = hashlib.sha256(f"{source}\x1f{source_row_id}\x1f{question}".encode())
    return digest.hexdigest()[:24]


def empty_samples() -> pl.DataFrame:
    """A zero-row frame with the full sample schema."""
    return pl.DataFrame(schema=SAMPLE_SCHEMA)


def empty_quarantine() -> pl.DataFrame:
    """A zero-row frame with the quarantine schema."""
    return pl.DataFrame(schema=QUARANTINE_SCHEMA)


def conform(df: pl.DataFrame) -> pl.DataFrame:
    """Add missing stage columns as nulls and order columns as the schema declares."""
    missing = [pl.lit(None, dtype=t).alias(c) for c, t in SAMPLE_SCHEMA.items() if c not in df.columns]
    return df.with_columns(missing).select(list(SAMPLE_SCHEMA)).cast(SAMPLE_SCHEMA)
