"""A Hugging Face ``datasets`` Parquet folder with a dataset card.

Written through ``datasets`` so the ``Image`` feature survives (plain pyarrow Parquet loses
it and images come back as dicts); ``datasets.load_dataset(folder)`` loads the ``rr`` and
``orr`` configurations. The card names sources and licences with row counts (non-commercial
rows flagged), teachers, tool versions, counts per stage and both system prompts.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmat_assets.contracts import Availability, Exporter
from mmat_assets.engine.export import Record, licence_counts
from mmat_assets.hookspecs import Register, hookimpl


def _features() -> Any:
    from datasets import Features, Image, List, Value

    return Features({
        "id": Value("string"),
        "messages": List({"role": Value("string"), "content": Value("string")}),
        "images": List(Image()),
        "source": Value("string"), "subset": Value("string"), "source_row_id": Value("string"),
        "license": Value("string"), "used_rag": Value("bool"), "reflected": Value("bool"),
        "checks": List(Value("string")), "quality": Value("float64"),
    })


def _columns(recs: list[Record]) -> dict[str, list[Any]]:
    cols: dict[str, list[Any]] = {k: [] for k in ("id", "messages", "images", "source", "subset", "source_row_id",
                                                  "license", "used_rag", "reflected", "checks", "quality")}
    for r in recs:
        cols["id"].append(r.id)
        cols["messages"].append(r.messages)
        # bytes inside the Parquet: the folder is self-contained wherever it is copied
        cols["images"].append([{"bytes": Path(p).read_bytes(), "path": Path(p).name} for p in r.images])
        for k in ("source", "subset", "source_row_id", "license"):
            cols[k].append(None if r.meta.get(k) is None else str(r.meta[k]))
        cols["used_rag"].append(bool(r.meta.get("used_rag")))
        cols["reflected"].append(bool(r.meta.get("reflected")))
        cols["checks"].append(list(r.meta.get("checks") or []))
        cols["quality"].append(r.meta.get("quality"))
    return cols


def card(records: Mapping[str, list[Record]], context: Mapping[str, Any]) -> str:
    """The dataset card (README.md with a YAML header naming the configurations)."""
    configs = "\n".join(f"- config_name: {fmt}\n  data_files:\n  - split: train\n    path: data/{fmt}-*.parquet"
                        for fmt in records)
    rows = [r for recs in records.values() for r in recs]
    licences = "\n".join(f"| {c['source']} | {c['license']} | {c['rows']} | {'yes' if c['non_commercial'] else 'no'} |"
                         for c in licence_counts(rows))
    stages = "\n".join(f"| {k} | {v} |" for k, v in (context.get("stage_counts") or {}).items())
    tools = ", ".join(f"{k} {v}" for k, v in sorted((context.get("tool_versions") or {}).items())) or "none"
    teachers = ", ".join(context.get("teachers") or []) or "unknown"
    nc = any(c["non_commercial"] for c in licence_counts(rows))
    return f"""---
configs:
{configs}
tags:
- multimodal
- agent-tuning
- mmat
---
# MMAT-style agent-tuning data

Dialogues in which a model reasons step by step, calls vision tools and retrieval, reflects
and answers: `rr` is the multi-turn Rationale-and-Reflection form, `orr` the one-turn form.
{"**Contains non-commercial rows**: see the licence table; filter on `license` before any commercial use." if nc else ""}

## Sources and licences

| source | licence | rows | non-commercial |
|---|---|---|---|
{licences}

## How it was made

- teachers: {teachers}
- tools: {tools}
- export data version: {context.get("data_version", "unknown")}

| stage | rows |
|---|---|
{stages}

## System prompts

RR:

```
{context.get("rr_system", "")}
```

ORR:

```
{context.get("orr_system", "")}
```
"""


class HFDatasetExporter(Exporter):
    name = "hf_datasets"
    version = "1.0.0"
    description = "Hugging Face datasets Parquet folder (Image feature kept) with a dataset card."

    def availability(self) -> Availability:
        try:
            import datasets  # noqa: F401
        except ImportError:
            return Availability(False, "the `datasets` package is not installed")
        return Availability(True)

    def export(self, records: Mapping[str, list[Record]], out_dir: Path, context: Mapping[str, Any]) -> dict[str, Any]:
        from datasets import Dataset

        written = {}
        (out_dir / "data").mkdir(parents=True, exist_ok=True)
        for fmt, recs in records.items():
            ds = Dataset.from_dict(_columns(recs), features=_features())
            path = out_dir / "data" / f"{fmt}-00000-of-00001.parquet"
            ds.to_parquet(str(path))
            written[fmt] = str(path)
        (out_dir / "README.md").write_text(card(records, context), encoding="utf-8")
        written["card"] = str(out_dir / "README.md")
        return written


@hookimpl
def register_exporters(register: Register) -> None:
    register(HFDatasetExporter)
