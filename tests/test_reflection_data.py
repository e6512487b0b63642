"""Reflection in the default data: the grounded teacher leaves out the derivation of the
result in a seeded share of numeric rows, the deterministic math-gap check repairs it with
the gold derivation, and thoughts quote only the table values they use.

The share test runs the demo's slice of real TabMWP problems (25 per grade) through the
real grounded teacher and reflection stage; the table's own text stands in for OCR so the
test needs no OCR model and stays fast (tests/test_stage_assets.py covers real OCR)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from mmat_assets import protocol, records
from mmat_assets.contracts import CLAIM_VERBS, TeacherRequest, Tool, ToolResult
from mmat_assets.engine import reflection as refl
from mmat_assets.engine import stages
from mmat_assets.engine.reflection import Declarations
from mmat_assets.engine.answers import contains_answer
from mmat_assets.engine.foundation import sample_quota
from mmat_plugins.sources_tabmwp import ANSWER_TYPES, TabMWPSource
from mmat_plugins.teachers_grounded import GroundedTeacher
from tests.conftest import TABMWP
from tests.stage_fakes import environment

PER_GRADE = 25  # the demo's quota


class TableText(Tool):
    """Stands in for OCR: returns the table text of the problem whose image it is given."""

    name = "ocr"
    version = "test"
    claim_patterns = (rf"\bOCR {CLAIM_VERBS}\b",)

    def __init__(self, tables: Mapping[str, str]) -> None:
        super().__init__()
        self.tables = tables

    def run(self, image: Path, args: Mapping[str, Any]) -> ToolResult:
        return ToolResult(self.tables[image.stem], {}, 0.0)


def _problems() -> dict[str, dict[str, Any]]:
    return json.loads((TABMWP / "problems.json").read_text())


def _demo_rows(per_grade: int = PER_GRADE) -> pl.DataFrame:
    """The demo's rows: every problem, then Foundation's seeded quota per grade."""
    out = []
    for pid, p in _problems().items():
        style = "Answer with the option's letter from the given choices directly." if p["choices"] \
            else "Answer the question using a single word or phrase."
        meta = {k: p.get(k) for k in ("table", "table_title", "unit", "ques_type", "ans_type", "grade")}
        out.append({c: None for c in records.FOUNDATION_COLUMNS} | dict(
            sample_id=records.sample_id("tabmwp", pid, p["question"]), source="tabmwp", dataset="tabmwp", subset=f"grade_{p['grade']}",
            source_row_id=pid, license="CC BY-NC-SA 4.0",
            images=[{"sha256": f"{int(pid):064x}", "uri": str(TABMWP / "tables" / f"{pid}.png"), "width": 1,
                     "height": 1}],
            image_key=f"{int(pid):064x}", question=p["question"], choices=[str(c) for c in p["choices"] or []],
            answer=str(p["answer"]), answer_type=ANSWER_TYPES[p["ans_type"]], rationale=p["solution"],
            style=style, meta=json.dumps(meta), shard=0))
    return sample_quota(pl.DataFrame(out, schema=records.FOUNDATION_COLUMNS), per_grade, seed=42)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("refl")
    tables = {pid: p["table"] for pid, p in _problems().items()}
    env = environment(GroundedTeacher(), {"ocr": TableText(tables)}, tmp, concurrency=64)
    env.declarations = Declarations.of({"ocr": TableText}, {"tabmwp": TabMWPSource})
    rows = _demo_rows()
    ref = stages.run_reflections(stages.run_rationales(rows, env), env)
    return {"rows": rows, "ref": ref, "rr": stages.rr_samples(ref), "tables": tables}


# ----------------------------------------------------------------------- the teacher


def _ctx(sample_id: str, **kw: Any) -> dict[str, Any]:
    base = {"sample_id": sample_id, "dataset": "tabmwp", "subset": "grade_3", "question": "What is the total?",
            "answer": "17", "answer_type": "number", "choices": [],
            "rationale": "Add the numbers.\n12 + 5 = 17\nThe total is 17.", "meta": {}, "tools": ["ocr"],
            "retrieval": False,
            "steps": [{"thought": "read", "operators": ["ocr"], "rag": None,
                       "results": [{"tool": "ocr", "text": "a | 12\nb | 5"}]}]}
    return base | kw


def _steps(teacher: GroundedTeacher, ctx: dict[str, Any]) -> list[dict[str, Any]]:
    """Every step the teacher writes after the tool step, up to its final one."""
    out = []
    while not out or out[-1]["next_action"] != "final_answer":
        out.append(json.loads(teacher.complete(TeacherRequest("step", [], "v", context=ctx)).content))
        ctx = ctx | {"steps": [*ctx["steps"], {"thought": out[-1]["thought"], "operators": [], "rag": None,
                                              "results": []}]}
    return out


def _final(teacher: GroundedTeacher, ctx: dict[str, Any]) -> dict[str, Any]:
    return _steps(teacher, ctx)[-1]


def test_the_gap_share_is_seeded_configurable_and_only_for_numeric_rows() -> None:
    ids = [f"{i:064x}" for i in range(600)]
    default = GroundedTeacher()
    assert default.options.gap_share == pytest.approx(0.25)
    gapped = [i for i in ids if _final(default, _ctx(i))["grounding"] == "gold:gap"]
    assert 0.20 <= len(gapped) / len(ids) <= 0.30
    again = [i for i in ids if _final(GroundedTeacher(), _ctx(i))["grounding"] == "gold:gap"]
    other = [i for i in ids if _final(GroundedTeacher({"seed": 7}), _ctx(i))["grounding"] == "gold:gap"]
    assert again == gapped and other != gapped
    assert not [i for i in ids[:100] if _final(GroundedTeacher({"gap_share": 0}), _ctx(i))["grounding"] != "gold"]
    text_rows = [_final(GroundedTeacher({"gap_share": 1}), _ctx(i, answer="yes", answer_type="text",
                                                               rationale="Compare.\n12 > 5, so yes."))
                 for i in ids[:50]]
    assert {s["grounding"] for s in text_rows} == {"gold"}


def test_a_gapped_row_states_the_result_without_the_computation() -> None:
    steps = _steps(GroundedTeacher({"gap_share": 1}), _ctx("0" * 64))
    thoughts = " ".join(s["thought"] for s in steps)
    assert steps[-1]["grounding"] == "gold:gap"
    assert "12 + 5" not in thoughts and "=" not in thoughts and "The total is 17." in thoughts
    assert steps[-1]["thought"].endswith("So the answer is 17.")
    honest = " ".join(s["thought"] for s in _steps(GroundedTeacher({"gap_share": 0}), _ctx("0" * 64)))
    assert "12 + 5 = 17" in honest


# ----------------------------------------------------------------- the reflection fix


def _gapped(thought: str) -> protocol.Trajectory:
    return protocol.Trajectory("What is a + b?", [
        protocol.Step("I read the table with OCR.", [protocol.OperatorCall("ocr")], None, "continue",
                      [protocol.Result("ocr", "a | 12\nb | 5")]),
        protocol.Step(thought, [], None, "end", [])], "17")


def test_the_math_gap_check_repairs_a_gap_with_the_gold_derivation() -> None:
    sample = {"sample_id": "ab" * 32, "question": "What is a + b?", "answer_type": "number", "choices": [],
              "rationale": "Add the numbers.\n12 + 5 = 17\nThe total is 17.", "grounding": "gold:gap",
              "source": "t"}
    findings, llm = refl.deterministic(_gapped("Add the numbers. The total is 17. So the answer is 17."), sample, 0)
    gap = [f for f in findings if f.check == "math_gap"]
    assert len(gap) == 1 and gap[0].fix == "12 + 5 = 17." and gap[0].planted
    assert "math_gap" not in llm  # the deterministic fix makes the judge unnecessary
    honest = refl.deterministic(_gapped("Add the numbers. 12 + 5 = 17. So the answer is 17."), sample, 0)[0]
    assert not [f for f in honest if f.check == "math_gap"]


def test_a_gap_whose_derivation_uses_an_unseen_number_stays_out(tmp_path: Path) -> None:
    from tests.stage_fakes import EchoTool, ScriptedTeacher, samples, step

    def script(ctx: dict) -> dict:
        if not ctx["steps"]:
            return step("The image is a table; I read it.", ["ocr"])
        return {**step("Add the numbers. So the answer is 56.", final=True), "grounding": "gold:gap"}

    env = environment(ScriptedTeacher(script), {"ocr": EchoTool()}, tmp_path)
    rows = samples(tmp_path, [{"question": "What is a + b?", "answer": "56",
                               "rationale": "Add the numbers.\n12 + 44 = 56"}])
    ref = stages.run_reflections(stages.run_rationales(rows, env), env)
    row = ref.row(0, named=True)
    assert (row["status"], row["failure"]) == ("failed", "unsupported_claim") and "44" in row["failure_detail"]


# -------------------------------------------------------------- the demo's RR data


def test_the_demo_rr_data_holds_five_to_fifteen_percent_reflections(demo: dict[str, Any]) -> None:
    rr, rows = demo["rr"], demo["rows"]
    assert rr.height >= 150, stages.failures(demo["ref"])
    reflected = rr.filter(pl.col("reflected"))
    share = reflected.height / rr.height
    assert 0.05 <= share <= 0.15, (reflected.height, rr.height)
    gold = {r["sample_id"]: r for r in rows.iter_rows(named=True)}
    for row in reflected.iter_rows(named=True):
        msgs = row["turns"]
        t = protocol.parse_rr(msgs)
        assert protocol.render_rr(t) == msgs
        assert msgs[-1]["content"] == gold[row["sample_id"]]["answer"] == t.answer
        signals = [s.signal for s in t.steps]
        assert signals[-2:] == ["reflection", "end"] and signals.count("reflection") == 1
        assert contains_answer(t.steps[-1].thought, t.answer, row["answer_type"], list(row["choices"]))
        prov = json.loads(row["provenance"])
        fired = [f for f in prov["findings"] if f["check"] == "math_gap"]
        assert row["checks"] == ["math_gap"] and fired and fired[0]["planted"] is True
        assert row["grounding"] == "gold:gap"


def test_planted_gaps_are_never_left_unrepaired(demo: dict[str, Any]) -> None:
    ref = demo["ref"]
    planted = ref.filter(pl.col("grounding") == "gold:gap")
    assert planted.height and planted.filter((pl.col("status") == "ok") & ~pl.col("reflected")).height == 0
    rows_in = demo["rows"].height
    assert ref.height == rows_in  # every row comes out: ok, or failed with its reason
    assert ref.filter(pl.col("status") == "failed")["failure"].null_count() == 0


# --------------------------------------------------------------------- short thoughts


def _quotes(thought: str) -> list[str]:
    import re

    return [q for m in re.finditer(r'The OCR reads: "(.*?)"\.', thought) for q in m[1].split(" … ")]


def test_thoughts_quote_only_table_values_the_reasoning_uses(demo: dict[str, Any]) -> None:
    lengths = sorted(len(m["content"]) for turns in demo["rr"]["turns"] for m in turns
                     if m["role"] == "assistant")
    p99 = lengths[int(0.99 * (len(lengths) - 1))]
    assert p99 <= 450, p99  # whole-table quotes put it near 600
    quoted = 0
    for row in demo["rr"].iter_rows(named=True):
        table = " ".join(demo["tables"][row["source_row_id"]].split())
        for m in row["turns"]:
            for q in _quotes(m["content"]) if m["role"] == "assistant" else []:
                quoted += 1
                assert q in table, (q, table)
                assert len(q) < len(table) or len(table) <= 200
    assert quoted >= 100
