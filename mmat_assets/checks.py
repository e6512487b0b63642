"""Data contracts: pure validators returning counts, wrapped by thin asset checks.

ERROR severity for format violations (schema, duplicate ids, dangling image references,
missing licences, rows read but not accounted for); the validators themselves know nothing
of Dagster.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from mmat_assets import records


@dataclass
class Outcome:
    """A validator's verdict with the numbers behind it."""

    passed: bool
    metadata: dict[str, Any] = field(default_factory=dict)


def schema_matches(df: pl.DataFrame, schema: pl.Schema = records.SAMPLE_SCHEMA) -> Outcome:
    """Every declared column present with its declared type, and nothing else."""
    missing = [c for c in schema if c not in df.schema]
    wrong = [f"{c}: {df.schema[c]} != {t}" for c, t in schema.items() if c in df.schema and df.schema[c] != t]
    extra = [c for c in df.columns if c not in schema]
    return Outcome(not (missing or wrong or extra),
                   {"missing": missing, "wrong_type": wrong, "extra": extra, "rows": df.height})


def unique_ids(df: pl.DataFrame, column: str = "sample_id") -> Outcome:
    dup = df.height - df[column].n_unique() if df.height else 0
    return Outcome(dup == 0, {"rows": df.height, "duplicate_ids": dup})


def licence_present(df: pl.DataFrame) -> Outcome:
    lic = pl.col("license").fill_null("").str.strip_chars()
    bad = df.filter((lic == "") | (lic.str.to_lowercase() == "unknown")).height
    return Outcome(bad == 0, {"rows": df.height, "rows_without_licence": bad})


def images_resolve(df: pl.DataFrame, exists: Callable[[str], bool]) -> Outcome:
    """Every image reference points at an object that exists in the media store."""
    uris = df.select(pl.col("images").explode().struct.field("uri")).drop_nulls().unique()
    dangling = [u for u in uris.to_series().to_list() if not exists(u)]
    return Outcome(not dangling, {"images": uris.height, "dangling": len(dangling),
                                  "examples": dangling[:5]})


#: The terms that must add up to the rows a source's reader yielded.
ACCOUNTED_TERMS = ("rows_kept", "rows_quarantined", "rows_dropped_duplicate", "rows_dropped_by_quota")


def rows_accounted_for(counts: dict[str, int]) -> Outcome:
    """rows_read = rows_kept + rows_quarantined + rows_dropped_duplicate + rows_dropped_by_quota."""
    accounted = sum(counts[t] for t in ACCOUNTED_TERMS)
    return Outcome(counts["rows_read"] == accounted,
                   {**counts, "rows_unaccounted": counts["rows_read"] - accounted})
