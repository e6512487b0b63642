"""Evaluation sets read from files a user downloaded: TabMWP, VLMEvalKit TSV, Dyn-VQA JSONL.

- ``tabmwp_eval``: ``problems.json`` + ``tables/``; accuracy with numeric/choice normalisation.
- ``vlmevalkit``: a VLMEvalKit TSV (MMStar, AI2D, HallusionBench, OCRBench, RealWorldQA,
  MathVista-style): ``index, question, answer, image`` (base64) and option columns ``A``..;
  multiple-choice items are scored by option letter, open ones by normalised match.
- ``dynvqa``: Dyn-VQA JSONL (``image_url``, ``question``, ``answer`` list, ``golden_query``);
  F1-Recall of the prediction against the answer list.
"""

from __future__ import annotations

import base64
import csv
import itertools
import json
import re
import sys
from abc import abstractmethod
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from mmat_assets.contracts import Benchmark, BenchmarkItem, ImageInput
from mmat_assets.hookspecs import Register, hookimpl
from mmat_assets.toolkit.answers import letter_of, normalise_text, same_answer


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="File (or TabMWP directory) the user downloaded.")
    limit: int | None = Field(default=None, description="Score only the first N items.")


class _FileBenchmark(Benchmark[_Options]):
    """Reads items from a file; ``limit`` keeps the first N, whatever the format."""

    @property
    def file(self) -> Path:
        """The configured ``path``, resolved against the config's folder."""
        return self.resolve_path(self.options.path)

    def items(self) -> Iterator[BenchmarkItem]:
        return itertools.islice(self.read(), self.options.limit)

    @abstractmethod
    def read(self) -> Iterator[BenchmarkItem]:
        """Every item of the file, in order."""


class TabMWPEval(_FileBenchmark):
    """TabMWP problems as an evaluation set (accuracy)."""

    name = "tabmwp_eval"
    version = "1.0.0"
    description = "TabMWP accuracy with numeric and choice normalisation."

    def read(self) -> Iterator[BenchmarkItem]:
        root = self.file
        problems = json.loads((root / "problems.json").read_text(encoding="utf-8"))
        for pid, p in problems.items():
            yield BenchmarkItem(str(pid), str(p["question"]), [str(p["answer"])],
                                ImageInput(path=str(root / "tables" / f"{pid}.png")),
                                [str(c) for c in p.get("choices") or []],
                                {"answer_type": "number" if "number" in str(p.get("ans_type")) else "text"})

    def score(self, prediction: str, item: BenchmarkItem) -> float:
        return float(same_answer(prediction, item.answers[0], item.meta.get("answer_type"), item.choices))


class VLMEvalKitTSV(_FileBenchmark):
    """A VLMEvalKit-format TSV with base64 images."""

    name = "vlmevalkit"
    version = "1.0.0"
    description = "VLMEvalKit TSV benchmarks (MMStar, AI2D, HallusionBench, OCRBench, RealWorldQA, ...)."

    def read(self) -> Iterator[BenchmarkItem]:
        csv.field_size_limit(sys.maxsize)  # base64 images are long cells
        with self.file.open(encoding="utf-8", newline="") as f:
            for n, row in enumerate(csv.DictReader(f, delimiter="\t")):
                choices = [row[c] for c in "ABCDEFGH" if row.get(c) not in (None, "", "nan")]
                image = ImageInput(data=base64.b64decode(row["image"])) if row.get("image") else None
                # its options are answered by letter: the prompt asks for one without reading the answer
                yield BenchmarkItem(str(row.get("index", n)), row["question"], [row["answer"]], image, choices,
                                    {"category": row.get("category", ""),
                                     **({"answer_style": "letter"} if choices else {})})

    def score(self, prediction: str, item: BenchmarkItem) -> float:
        if item.choices:
            gold = letter_of(item.answers[0], item.choices)
            return float(gold is not None and _predicted_letter(prediction, item.choices) == gold)
        return float(same_answer(prediction, item.answers[0]))


def _predicted_letter(prediction: str, choices: list[str]) -> str | None:
    direct = letter_of(prediction, choices)
    if direct:
        return direct
    m = re.search(r"\b([A-H])\b", prediction)
    return m[1] if m and ord(m[1]) - 65 < len(choices) else None


class DynVQA(_FileBenchmark):
    """Dyn-VQA JSONL, scored by F1-Recall against the answer list."""

    name = "dynvqa"
    version = "1.0.0"
    description = "Dyn-VQA (RAG benchmark) with F1-Recall scoring."

    def read(self) -> Iterator[BenchmarkItem]:
        path = self.file
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            d = json.loads(line)
            answers = d["answer"] if isinstance(d["answer"], list) else [d["answer"]]
            image = str((path.parent / d["image_url"]).resolve()) if d.get("image_url") else None
            yield BenchmarkItem(str(d.get("id", n)), d["question"], [str(a) for a in answers],
                                ImageInput(path=image) if image else None, [], {"golden_query": d.get("golden_query")})

    def score(self, prediction: str, item: BenchmarkItem) -> float:
        return max((f1_recall(prediction, a) for a in item.answers), default=0.0)


def f1_recall(prediction: str, answer: str) -> float:
    """Token F1 of an answer's tokens against the prediction (recall-weighted as Dyn-VQA)."""
    pred, gold = normalise_text(prediction).split(), normalise_text(answer).split()
    if not pred or not gold:
        return 0.0
    common = sum(min(pred.count(t), gold.count(t)) for t in set(gold))
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


@hookimpl
def register_benchmarks(register: Register) -> None:
    register(TabMWPEval)
    register(VLMEvalKitTSV)
    register(DynVQA)
