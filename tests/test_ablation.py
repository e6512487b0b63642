"""The ablation matrix: held-out split, variants from one set of rationales, bootstrap
report; and a tiny matrix materialized end to end through the real assets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
import pytest

from mmat_assets import protocol
from mmat_assets.engine import ablation as ab
from mmat_assets.engine.reflection import insert_reflection

# ------------------------------------------------------------------------------ units
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", [REPO / "mmat.yaml", *sorted((REPO / "profiles").glob("*.yaml"))],
                         ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    from mmat_assets.config import load_config

    cfg = load_config(path)
    assert cfg.sources and cfg.base_dir == path.parent
    if cfg.ablation is not None:  # its benchmark is one the config evaluates
        assert cfg.ablation.benchmark in cfg.evaluation.benchmarks


def test_the_heldout_split_is_seeded_by_id_alone() -> None:
    ids = [str(i) for i in range(1000)]
    held = ab.heldout_split(ids, 200, 42)
    assert len(held) == 200 and held == ab.heldout_split(list(reversed(ids)), 200, 42)
    assert held != ab.heldout_split(ids, 200, 7) and set(held) <= set(ids)


def _trajectory() -> protocol.Trajectory:
    t = protocol.Trajectory("What is a + b?", [
        protocol.Step("I read the table.", [protocol.OperatorCall("ocr")], None, "continue",
                      [protocol.Result("ocr", "a | 12\nb | 5")]),
        protocol.Step("Add them. So the answer is 17.", [], None, "end", [])], "17", "SYSTEM")
    return insert_reflection(t, "Wait, let me redo the arithmetic to be sure.", "12 + 5 = 17. So the answer is 17.")


def test_variants_come_from_the_same_dialogue() -> None:
    rr = protocol.render_rr(_trajectory())
    plain = protocol.parse_rr(ab.variant_turns("rr_no_reflection", rr, None))
    assert [s.signal for s in plain.steps] == ["continue", "end"]
    assert plain.steps[-1].thought == "Add them. So the answer is 17. 12 + 5 = 17. So the answer is 17."
    no_tools = protocol.parse_rr(ab.variant_turns("rr_no_tools", rr, None))
    assert all(not s.operators and not s.results for s in no_tools.steps)
    assert [s.signal for s in no_tools.steps] == ["continue", "reflection", "end"] and no_tools.answer == "17"
    assert ab.variant_turns("rr", rr, None) is rr and ab.variant_turns("orr", rr, [{"x": 1}]) == [{"x": 1}]
    only_tools = protocol.render_rr(protocol.Trajectory("q", [protocol.Step("Read.", [protocol.OperatorCall("ocr")],
                                                                            None, "end", [])], "1"))
    assert ab.variant_turns("rr_no_tools", only_tools, None) is None  # nothing is left to learn from


def test_bootstrap_intervals_and_paired_gains() -> None:
    mean, lo, hi = ab.bootstrap([1.0] * 30 + [0.0] * 70, seed=1)
    assert mean == pytest.approx(0.3) and lo < 0.3 < hi and hi - lo < 0.25
    tuned = {str(i): float(i % 2) for i in range(200)}
    base = {str(i): 0.0 for i in range(200)}
    gain = ab.paired_gain(tuned, base)
    assert gain[0] == pytest.approx(0.5) and gain[1] > 0  # the interval excludes 0
    same = ab.paired_gain(base, base)
    assert same == (0.0, 0.0, 0.0)


def test_the_report_shows_every_variant_with_intervals() -> None:
    items = [str(i) for i in range(40)]
    choice = {i: int(i) % 4 == 0 for i in items}
    cells = [ab.Cell(v, 0 if v == "untuned" else 42, m, {i: float((int(i) + k) % 3 == 0) for i in items}, choice,
                     0.5 + k, 900.0 if v != "untuned" else None, 10 if v != "untuned" else None)
             for k, v in enumerate(ab.VARIANTS) for m in ab.modes_of(v, ab.VARIANTS)]
    md = ab.report_markdown(ab.report_rows(cells, 500))
    lines = md.splitlines()
    for v in ab.VARIANTS:
        row = next(ln for ln in lines if ln.startswith(f"| {v} |"))
        assert row.count("[") >= 3, row  # accuracy, gain (or –) and a question type carry intervals
    assert sum(ln.startswith("| untuned |") for ln in lines) == 2  # rr and orr baselines
    rr_row = next(ln for ln in lines if ln.startswith("| rr |"))
    assert "(n=10)" in rr_row and "(n=30)" in rr_row and "| 900 |" in rr_row


# ------------------------------------------------------------------- the tiny matrix

N_PROBLEMS, HELDOUT = 8, 2


def _tiny_project(tmp: Path, max_length: int = 1024, batch_size: int = 2) -> Path:
    from tests.conftest import TABMWP, write_project

    problems = dict(list(json.loads((TABMWP / "problems.json").read_text()).items())[:N_PROBLEMS])
    data = tmp / "tabmwp"
    (data / "tables").mkdir(parents=True)
    (data / "problems.json").write_text(json.dumps(problems))
    for pid in problems:
        shutil.copy(TABMWP / "tables" / f"{pid}.png", data / "tables")
    return write_project(
        tmp, {"tabmwp": {"plugin": "tabmwp", "options": {"path": "tabmwp"}}}, shards=1,
        tools={"label_bbox": {"enabled": False}},
        export={"exporters": ["ms_swift"], "formats": ["rr", "orr"], "max_length": max_length},
        training={"options": {"max_steps": 1, "cpu_threads": 1, "max_length": 1024}},
        evaluation={"benchmarks": {"heldout": {"plugin": "tabmwp_eval", "options": {"path": "tabmwp"}}},
                    "modes": ["rr"], "max_steps": 2, "batch_size": batch_size, "token_cap": 24},
        ablation={"benchmark": "heldout", "heldout": HELDOUT, "seeds": [3], "training": {"max_steps": 1}})


@pytest.mark.slow
def test_a_tiny_matrix_materializes_and_reports_every_variant(tmp_path: Path) -> None:
    from mmat_assets.assets import build_definitions
    from mmat_assets.config import load_config
    from tests.built_project import materialize

    cfg = load_config(_tiny_project(tmp_path))
    defs = build_definitions(cfg, "local")
    (tmp_path / "dagster_home").mkdir()
    instance = dg.DagsterInstance.local_temp(str(tmp_path / "dagster_home"))
    materialize(defs, instance, ["*ablation_report"])
    tables = Path(cfg.profile_root("local")) / "tables"
    report: dict[str, Any] = json.loads((tables / "ablation_report.json").read_text())
    md = Path(report["path"]).read_text()
    for v in ab.VARIANTS:
        assert f"| {v} |" in md, md
    assert md.count("[") >= 2 * len(ab.VARIANTS)
    split = json.loads((tables / "ablation" / "split.json").read_text())
    held = set(split["heldout"])
    assert len(held) == HELDOUT and split["of"] == N_PROBLEMS
    for v in ab.TRAINED:  # no held-out problem in any variant's training file
        data = json.loads((tables / "ablation" / "data" / f"{v}.json").read_text())
        lines = Path(data["files"][data["format"]]).read_text().splitlines()
        assert not held & {json.loads(ln).get("source_row_id") for ln in lines}
        assert data["heldout_excluded"] >= 1 or not lines
        model = json.loads((tables / "ablation" / "models" / v / "s3.json").read_text())
        assert model["steps"] == 1 and model["generation_limits"]["step_tokens"] >= 0
    evals = json.loads((tables / "ablation" / "evals" / "rr" / "s3" / "rr.json").read_text())
    assert {r["item_id"] for r in evals["results"]} == held


class _Stop(BaseException):
    """A stop nothing in the harness catches, as an interrupt is not."""


class _Watch:
    """The untuned student, watched: the questions it is asked; it stops when ``stop_at`` is
    first asked about."""

    def __init__(self, inner: Any, stop_at: str | None) -> None:
        self.inner, self.stop_at, self.asked = inner, stop_at, set()

    def _see(self, prompts: Any) -> None:
        asked = {msgs[1]["content"] for msgs, _ in prompts}
        if self.stop_at is not None and any(self.stop_at in q for q in asked):
            raise _Stop
        self.asked |= asked

    def __call__(self, msgs: Any, images: Any) -> str:
        self._see([(msgs, images)])
        return self.inner(msgs, images)

    def generate_batch(self, prompts: Any, max_new_tokens: int) -> Any:
        self._see(prompts)
        return self.inner.generate_batch(prompts, max_new_tokens)


@pytest.mark.slow
def test_a_stopped_evaluation_asset_resumes_at_its_first_unfinished_batch(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """An evaluation keeps each finished batch; stopped in its second batch, the rerun asks the
    student nothing about the first, and the finished asset leaves no partial file behind."""
    from mmat_assets.assets import ablation as assets
    from mmat_assets.assets import build_definitions
    from mmat_assets.config import load_config
    from mmat_assets.plugins import load_registry
    from tests.built_project import materialize

    cfg = load_config(_tiny_project(tmp_path, batch_size=1))
    defs = build_definitions(cfg, "local")
    (tmp_path / "dagster_home").mkdir()
    instance = dg.DagsterInstance.local_temp(str(tmp_path / "dagster_home"))
    cell = 'key:"ablation/evals/untuned/rr"'
    materialize(defs, instance, [f"+{cell} and not {cell}"])
    tables = Path(cfg.profile_root("local")) / "tables"
    split = json.loads((tables / "ablation" / "split.json").read_text())
    items = [i for i in assets._benchmark(cfg, load_registry(), cfg.ablation).items()
             if i.item_id in set(split["heldout"])]
    assert len(items) == 2 and items[0].question != items[1].question
    watched: list[_Watch] = []
    real = assets._responder

    def responder(stop_at: str | None) -> Any:
        def make(*args: Any) -> _Watch:
            watched.append(_Watch(real(*args), stop_at))
            return watched[-1]
        return make

    monkeypatch.setattr(assets, "_responder", responder(items[1].question))
    stopped = dg.materialize([*defs.assets, *defs.asset_checks], instance=instance, resources=defs.resources,
                             selection=[dg.AssetKey(["ablation", "evals", "untuned", "rr"])], raise_on_error=False)
    assert not stopped.success
    assert any("_Stop" in e.event_specific_data.error.to_string() for e in stopped.all_events if e.is_step_failure)
    partial = list((Path(cfg.profile_root("local")) / "eval" / "partial").glob("*.jsonl"))
    assert len(partial) == 1
    assert [json.loads(ln)["item_id"] for ln in partial[0].read_text().splitlines()] == [items[0].item_id]
    monkeypatch.setattr(assets, "_responder", responder(None))
    materialize(defs, instance, [cell])
    asked = watched[-1].asked
    assert any(items[1].question in q for q in asked) and not any(items[0].question in q for q in asked)
    out = json.loads((tables / "ablation" / "evals" / "untuned" / "rr.json").read_text())
    assert [r["item_id"] for r in out["results"]] == [i.item_id for i in items]
    assert not partial[0].exists()


@pytest.mark.slow
def test_a_variant_keeps_out_the_records_the_trainer_could_not_take_whole(tmp_path: Path) -> None:
    """A variant's training file is pre-flighted as an export is: a dialogue longer than the
    student's max length is rejected with its reason, not left to stop the training."""
    from mmat_assets.assets import build_definitions
    from mmat_assets.config import load_config
    from tests.built_project import materialize

    cfg = load_config(_tiny_project(tmp_path, max_length=400))
    defs = build_definitions(cfg, "local")
    (tmp_path / "dagster_home").mkdir()
    instance = dg.DagsterInstance.local_temp(str(tmp_path / "dagster_home"))
    materialize(defs, instance, ["+key:\"ablation/data/rr\""])
    tables = Path(cfg.profile_root("local")) / "tables"
    data = json.loads((tables / "ablation" / "data" / "rr.json").read_text())
    rr_rows = sum(pl.read_parquet(f).height for f in (tables / "rr_samples").glob("*.parquet"))
    assert data["rejected"] >= 1
    assert data["rows"] + data["rejected"] + data["heldout_excluded"] + data["no_dialogue"] == rr_rows
    out = Path(data["files"]["rr"]).parent
    rejected = [json.loads(ln) for ln in (out / "rejected.jsonl").read_text().splitlines()]
    assert len(rejected) == data["rejected"] and {r["reason"] for r in rejected} == {"truncated"}
