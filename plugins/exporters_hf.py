"""A Hugging Face ``datasets`` Parquet folder with a dataset card.

Written through ``datasets`` so the ``Image`` feature survives (plain pyarrow Parquet loses
it and images come back as dicts). The card's YAML header names the ``rr`` and ``orr``
configurations, ``rr`` the default (``datasets.load_dataset(folder)`` needs no config name),
and what the Hub shows: licence ids, pretty name, task categories, tags and size. The body
gives the data version, the sources with licences and row counts (non-commercial rows
flagged) and their citations, the funnel, teachers, tool versions and both system prompts.
Image bytes sit inside the Parquet and no file names a local path: the folder can be copied
or uploaded as it is.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from mmat_assets.contracts import Availability, Exporter
from mmat_assets.hookspecs import Register, hookimpl
from mmat_assets.toolkit.export import Record, licence_counts

PRETTY_NAME = "MMAT-style agent-tuning data"

#: Licence ids the Hub recognises (its licence list, the common part); others are ``other``.
HUB_LICENSES = frozenset({
    "apache-2.0", "mit", "openrail", "afl-3.0", "artistic-2.0", "bsl-1.0", "bsd", "bsd-2-clause",
    "bsd-3-clause", "bsd-3-clause-clear", "c-uda", "cc", "cc0-1.0", "cc-by-2.0", "cc-by-2.5", "cc-by-3.0",
    "cc-by-4.0", "cc-by-sa-3.0", "cc-by-sa-4.0", "cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0",
    "cc-by-nd-4.0", "cc-by-nc-nd-3.0", "cc-by-nc-nd-4.0", "cc-by-nc-sa-2.0", "cc-by-nc-sa-3.0",
    "cc-by-nc-sa-4.0", "cdla-sharing-1.0", "cdla-permissive-1.0", "cdla-permissive-2.0", "wtfpl",
    "ecl-2.0", "epl-1.0", "epl-2.0", "eupl-1.1", "eupl-1.2", "agpl-3.0", "gfdl", "gpl", "gpl-2.0",
    "gpl-3.0", "lgpl", "lgpl-2.1", "lgpl-3.0", "isc", "mpl-2.0", "odc-by", "odbl", "openrail++",
    "osl-3.0", "postgresql", "ofl-1.1", "ncsa", "unlicense", "zlib", "pddl", "unknown",
})

#: Continuation lines of a long BibTeX field line up under the field's value.
_BIB_WRAP = "\n" + " " * 15


def _arxiv(kind: str, key: str, title: tuple[str, ...], author: tuple[str, ...], booktitle: str | None,
           year: int, eprint: str) -> str:
    """A BibTeX entry of a paper on arXiv; ``title`` and ``author`` are their lines as printed."""
    fields = [("title", _BIB_WRAP.join(title)), ("author", _BIB_WRAP.join(author))]
    fields += [("booktitle", booktitle)] if booktitle else []
    fields += [("year", str(year)), ("eprint", eprint), ("archivePrefix", "arXiv")]
    body = ",\n".join(f"  {name:<9} = {{{value}}}" for name, value in fields)
    return f"\n@{kind}{{{key},\n{body}\n}}"


#: Citations of the dataset families the rows come from, by the rows' ``dataset``.
CITATIONS: dict[str, tuple[str, str]] = {
    "tabmwp": ("TabMWP", _arxiv(
        "inproceedings", "lu2023dynamic",
        ("Dynamic Prompt Learning via Policy Gradient for Semi-structured Mathematical Reasoning",),
        ("Lu, Pan and Qiu, Liang and Chang, Kai-Wei and Wu, Ying Nian and Zhu, Song-Chun and",
         "Rajpurohit, Tanmay and Clark, Peter and Kalyan, Ashwin"),
        "International Conference on Learning Representations (ICLR)", 2023, "2209.14610")),
    "llava_cot": ("LLaVA-CoT", _arxiv(
        "inproceedings", "xu2025llavacot",
        ("LLaVA-CoT: Let Vision Language Models Reason Step-by-Step",),
        ("Xu, Guowei and Jin, Peng and Wu, Ziang and Li, Hao and Song, Yibing and Sun, Lichao and Yuan, Li",),
        "International Conference on Computer Vision (ICCV)", 2025, "2411.10440")),
    "visual_cot": ("Visual CoT", _arxiv(
        "inproceedings", "shao2024visualcot",
        ("Visual CoT: Advancing Multi-Modal Language Models with a Comprehensive Dataset and",
         "Benchmark for Chain-of-Thought Reasoning"),
        ("Shao, Hao and Qian, Shengju and Xiao, Han and Song, Guanglu and Zong, Zhuofan and",
         "Wang, Letian and Liu, Yu and Li, Hongsheng"),
        "Advances in Neural Information Processing Systems (NeurIPS), Datasets and Benchmarks Track",
        2024, "2403.16999")),
    "infoseek": ("InfoSeek", _arxiv(
        "inproceedings", "chen2023infoseek",
        ("Can Pre-trained Vision and Language Models Answer Visual Information-Seeking Questions?",),
        ("Chen, Yang and Hu, Hexiang and Luan, Yi and Sun, Haitian and Changpinyo, Soravit and",
         "Ritter, Alan and Chang, Ming-Wei"),
        "Conference on Empirical Methods in Natural Language Processing (EMNLP)", 2023, "2302.11713")),
    "the_cauldron": ("The Cauldron (each subset also cites its original dataset)", _arxiv(
        "misc", "laurencon2024matters",
        ("What matters when building vision-language models?",),
        (r"Lauren{\c{c}}on, Hugo and Tronchon, L{\'e}o and Cord, Matthieu and Sanh, Victor",),
        None, 2024, "2405.02246")),
}


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


def hub_licence(licence: str) -> str | None:
    """The Hub's id for a licence name (``CC BY-NC-SA 4.0`` -> ``cc-by-nc-sa-4.0``), or None."""
    slug = _slug(licence)
    return slug if slug in HUB_LICENSES else None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.+]+", "-", str(text).lower()).strip("-") or "unknown"


def licence_fields(rows: list[Record]) -> dict[str, Any]:
    """``license`` (one id, or a list when rows differ) plus ``license_name`` for ``other``."""
    names = sorted({str(r.meta.get("license") or "unknown") for r in rows}) or ["unknown"]
    ids = sorted({hub_licence(n) or "other" for n in names})
    out: dict[str, Any] = {"license": ids[0] if len(ids) == 1 else ids}
    others = [_slug(n) for n in names if hub_licence(n) is None]
    if others:  # the Hub asks a name for "other"; the licence table below gives the full text
        out["license_name"] = "-and-".join(others)
    return out


def _size_category(n: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                         (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):
        if n < limit:
            return label
    return "10M<n<100M"


def card_header(records: Mapping[str, list[Record]], context: Mapping[str, Any]) -> dict[str, Any]:
    """The card's YAML: what the Hub and ``datasets`` read (the first format is the default)."""
    rows = [r for recs in records.values() for r in recs]
    configs = [{"config_name": fmt, **({"default": True} if i == 0 else {}),
                "data_files": [{"split": "train", "path": f"data/{fmt}-*.parquet"}]}
               for i, fmt in enumerate(records)]
    return {"pretty_name": context.get("pretty_name") or PRETTY_NAME, **licence_fields(rows),
            "task_categories": ["visual-question-answering", "image-text-to-text"],
            "tags": ["multimodal", "agent-tuning", "tool-use", "reasoning", "mmat"],
            "size_categories": [_size_category(max((len(v) for v in records.values()), default=0))],
            "configs": configs}


def _citations(rows: list[Record]) -> str:
    counts = Counter(str(r.meta.get("dataset") or r.meta.get("source")) for r in rows)
    parts = []
    for family, n in sorted(counts.items()):
        if family in CITATIONS:
            title, bibtex = CITATIONS[family]
            parts.append(f"**{title}** (`{family}`, {n} rows):\n\n```bibtex\n{bibtex.strip()}\n```")
        else:
            parts.append(f"**`{family}`** ({n} rows): no citation on record; cite the dataset's own publication.")
    return "\n\n".join(parts) or "No rows."


def card(records: Mapping[str, list[Record]], context: Mapping[str, Any]) -> str:
    """The dataset card: README.md with the YAML header, then data version, funnel, sources."""
    header = yaml.safe_dump(card_header(records, context), sort_keys=False, allow_unicode=True)
    rows = [r for recs in records.values() for r in recs]
    licences = "\n".join(f"| {c['source']} | {c['license']} | {c['rows']} | {'yes' if c['non_commercial'] else 'no'} |"
                         for c in licence_counts(rows))
    stages = "\n".join(f"| {k} | {v} |" for k, v in (context.get("stage_counts") or {}).items())
    tools = ", ".join(f"{k} {v}" for k, v in sorted((context.get("tool_versions") or {}).items())) or "none"
    teachers = ", ".join(context.get("teachers") or []) or "none recorded"
    nc = any(c["non_commercial"] for c in licence_counts(rows))
    first = next(iter(records), "rr")
    others = "".join(f'\n{fmt} = load_dataset("PATH_OR_REPO_ID", "{fmt}", split="train")' for fmt in list(records)[1:])
    return f"""---
{header}---
# {context.get("pretty_name") or PRETTY_NAME}

Dialogues in which a model reasons step by step, calls vision tools and retrieval, reflects
and answers: `rr` is the multi-turn Rationale-and-Reflection form, `orr` the one-turn form.
{"**Contains non-commercial rows**: see the licence table; filter on `license` before any commercial use." if nc else ""}

```python
from datasets import load_dataset

{first} = load_dataset("PATH_OR_REPO_ID", split="train")  # the default configuration{others}
```

Images are stored inside the Parquet files (`images` column, `Image` feature).

- data version: `{context.get("data_version") or "not recorded"}` (content hash of the exported records)
- rows: {", ".join(f"{k} {len(v)}" for k, v in records.items())}

## Sources and licences

| source | licence | rows | non-commercial |
|---|---|---|---|
{licences}

## Citations

The rows are derived from these datasets; cite them when you use this data.

{_citations(rows)}

## Funnel

| stage | rows |
|---|---|
{stages}

## How it was made

- teachers: {teachers}
- tools: {tools}

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
    version = "1.1.0"
    description = "Hugging Face datasets Parquet folder (Image feature kept) with a dataset card for the Hub."

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
