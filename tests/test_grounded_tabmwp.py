"""The grounded teacher with real OCR on real TabMWP problems (the embedded default path).

CI runs a seeded slice; ``MMAT_TABMWP_N=1000`` runs all of dev1k (about 1 s of OCR per table).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import polars as pl
import pytest

from mmat_assets import protocol
from mmat_assets.engine import stages
from mmat_assets.engine.answers import numbers_in, same_answer
from mmat_assets.engine.cache import ResultCache
from mmat_assets.engine.foundation import ingest, prepare_source
from mmat_assets.engine.images import ImageLimits
from mmat_assets.engine.rationale import Environment, StageSettings
from mmat_assets.engine.reflection import Declarations
from mmat_assets.media import MediaStore
from mmat_assets.plugins import load_registry

N = int(os.environ.get("MMAT_TABMWP_N", "24"))


@pytest.fixture(scope="module")
def tabmwp_run(tabmwp_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("grounded")
    reg = load_registry(entry_points=False)
    src = reg.create("source", "tabmwp", {"path": str(tabmwp_dir)})
    media = MediaStore(tmp / "store")
    ing = ingest(src, "tabmwp", media, ImageLimits())
    df = prepare_source(ing.samples, None, 42, 1)
    df = df.with_columns(_k=pl.col("sample_id")).sort("_k").drop("_k").head(N)  # a seeded, stable slice
    cache = lambda ns: ResultCache(None, ns, 0, work_dir=tmp / "cache")  # noqa: E731
    tools = {"ocr": reg.create("tool", "ocr")}
    env = Environment(reg.create("teacher", "grounded"), "grounded", tools, None, cache("tools"),
                      cache("retrieval"), cache("teacher"), media.local_path, StageSettings(),
                      declarations=Declarations.from_registry(reg))
    ref = stages.run_reflections(stages.run_rationales(df, env), env)
    return df, ref


@pytest.mark.slow
def test_yield_and_every_rr_sample_parses_to_the_gold_answer(tabmwp_run) -> None:
    df, ref = tabmwp_run
    rr, orr = stages.rr_samples(ref), stages.orr_samples(ref)
    assert rr.height == orr.height >= 0.95 * df.height, stages.failures(ref)
    for msgs, gold in zip(rr["turns"], rr["answer"], strict=True):
        t = protocol.parse_rr(msgs)
        assert t.answer == gold and t.steps[-1].signal == "end"
        assert protocol.render_rr(t) == list(msgs)  # rendering the parse gives the same text
    for msgs, gold in zip(orr["turns"], orr["answer"], strict=True):
        answer = protocol.parse_orr_answer(msgs[-1]["content"])
        assert answer is not None and same_answer(answer, gold)


@pytest.mark.slow
def test_table_numbers_in_rationales_come_from_a_real_ocr_call(tabmwp_run) -> None:
    _, ref = tabmwp_run
    checked = 0
    for row in stages.rr_samples(ref).iter_rows(named=True):
        table = {round(abs(n), 4) for n in numbers_in(json.loads(row["meta"])["table"])}
        used = {round(abs(n), 4) for n in numbers_in(row["rationale"])} & table
        if not used:
            continue
        ocr = [c for c in row["tool_calls"] if c["tool"] == "ocr" and c["error"] is None]
        assert ocr, row["sample_id"]
        seen = {round(abs(n), 4) for c in ocr for n in numbers_in(c["text"])}
        assert used <= seen, (row["sample_id"], used - seen)
        checked += 1
    assert checked >= 0.5 * ref.height
