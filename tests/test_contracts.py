"""The contracts are the boundary: plugins written against only their base classes build,
the host calls nothing the contracts do not declare, and the test kit checks contracts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import tests.contract_plugins as plain
from mmat_assets import protocol
from mmat_assets.contracts import Judge, StepContext, TeacherRequest, Tool, ToolResult
from mmat_assets.engine.rationale import STEP_SCHEMA, step_context
from mmat_assets.plugins import load_registry
from mmat_assets.testing import KitBuild, build_with, check_plugin, plugin_of
from tests.stage_fakes import EchoTool, ScriptedTeacher, environment, samples

#: The fingerprint of one step request, computed before the context had a type: the
#: request cache (and every cache already on disk) is keyed by it.
STEP_FINGERPRINT = "9f243143a133e2ca2a01b29ea0a8141e8837f1fe70d09798268b7f3f5571fc07"


def test_a_typed_step_context_keeps_the_request_fingerprint(tmp_path: Path) -> None:
    env = environment(ScriptedTeacher(lambda c: {}), {"ocr": EchoTool()}, tmp_path)
    row = samples(tmp_path, [{"question": "What is a + b?", "answer": "17", "rationale": "12 + 5 = 17",
                              "meta": json.dumps({"table": "a | 12\nb | 5"})}]).to_dicts()[0]
    row["prompt"] = protocol.question_prompt(row["question"], row["choices"], row["style"])
    steps = [protocol.Step("I read the table.", [protocol.OperatorCall("ocr")], None, "continue",
                           [protocol.Result("ocr", "a | 12\nb | 5")])]
    ctx = step_context(row, env, steps)
    assert set(ctx) == set(StepContext.__annotations__)  # every key documented, none more
    request = TeacherRequest("step", [{"role": "user", "content": "x"}], protocol.PROMPT_VERSION, STEP_SCHEMA,
                             {"temperature": 0}, ctx)
    assert request.fingerprint("m") == STEP_FINGERPRINT
    # the step limit is for the teacher's planning, not part of what is asked: no re-send
    other_limit = TeacherRequest("step", request.messages, protocol.PROMPT_VERSION, STEP_SCHEMA,
                                 {"temperature": 0}, {**ctx, "max_steps": ctx["max_steps"] + 3})
    assert other_limit.fingerprint("m") == STEP_FINGERPRINT
    assert request.step_context()["steps"][0]["results"] == [{"tool": "ocr", "text": "a | 12\nb | 5"}]
    with pytest.raises(TypeError):
        TeacherRequest("judge", [], "v").step_context()


class PathTool(Tool):
    """Resolves a path in ``__init__``: the registry's base_dir must already be there."""

    name = "path_tool"
    description = "Knows where it lives."

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.home = self.resolve_path("data")

    def run(self, image: Path, args: Any) -> ToolResult:
        return ToolResult(str(self.home))


_PathPlugin = plugin_of(PathTool, name="_PathPlugin")


def test_the_registry_passes_base_dir_before_init_and_plain_construction_still_works(tmp_path: Path) -> None:
    reg = load_registry(builtins=(), entry_points=False, plugins=[_PathPlugin])
    assert reg.errors == [] and reg.get("tool", "path_tool").plugin == "_PathPlugin"
    tool = reg.create("tool", "path_tool", base_dir=tmp_path)
    assert tool.base_dir == tmp_path and tool.home == (tmp_path / "data").resolve()
    assert PathTool().base_dir == Path.cwd()  # built directly: the working directory, as before


def test_options_come_from_the_type_argument_unless_the_class_sets_them() -> None:
    from pydantic import BaseModel

    from mmat_assets.contracts import NoOptions

    class Opts(BaseModel):
        word: str = "hello"

    class Other(BaseModel):
        n: int = 1

    class Named(Tool[Opts]):
        name = "named"

        def run(self, image: Path, args: Any) -> ToolResult:
            return ToolResult(self.options.word)

    class Explicit(Tool[Opts]):
        name = "explicit"
        Options = Other  # type: ignore[assignment]

    class Child(Named):
        pass

    assert Named.Options is Opts and Named({"word": "hi"}).options.word == "hi"
    assert Explicit.Options is Other and Child.Options is Opts and Tool.Options is NoOptions
    with pytest.raises(ValueError, match="word"):
        Named({"word": 3})


def test_plugin_of_registers_each_class_under_its_role() -> None:
    plugin = plugin_of(plain.PlainTool, plain.PlainSource, plain.PlainTrainer, name="three")
    reg = load_registry(builtins=(), entry_points=False, plugins=[plugin])
    assert reg.errors == []
    assert {(i.role, i.name, i.plugin) for i in reg.all()} == {
        ("tool", "plain_tool", "three"), ("source", "plain_source", "three"), ("trainer", "plain_trainer", "three")}
    assert check_plugin(plugin) == []
    with pytest.raises(TypeError, match="role bases"):
        plugin_of(dict)  # type: ignore[arg-type]


def test_check_plugin_names_each_contract_problem() -> None:
    assert check_plugin(plain) == []

    class NoRun(Tool):
        name = "bad tool"
        version = ""

    class Loose(Judge):
        name = "loose"
        Options = dict  # type: ignore[assignment]

        def score(self, sample: Any) -> tuple[float, str]:
            return 1.0, ""

        def request(self, sample: Any) -> TeacherRequest | None:
            return TeacherRequest("score", [], "v")

    problems = check_plugin(NoRun)
    assert any("abstract methods not implemented: run" in p for p in problems), problems
    assert any("`version` must be a non-empty string" in p and "cache key" in p for p in problems)
    assert any("`description` is empty" in p for p in problems) and any("operator" in p for p in problems)
    problems = check_plugin(Loose)
    assert any("`Options` must be a pydantic BaseModel" in p for p in problems)
    assert any("overrides `request` but not `parse`" in p for p in problems)
    assert "registers nothing" in check_plugin(type("Empty", (), {}))[0]


def _plain_build(root: Path) -> KitBuild:
    select = " or ".join(f'9+key:"{k}"' for k in ("dialogue_files", "exports/plain_export",
                                                   "evaluations/base/pb/baseline"))
    return build_with(root, [plain], select=select, sources={"plain": {"plugin": "plain_source"}},
                      teachers={"plain": {"plugin": "plain_teacher"}},
                      stages={"retriever": "plain_search", "judge": "plain_judge"},
                      retrievers={"plain_search": {}},
                      export={"exporters": ["plain_export"], "student": "plain-student"},
                      training={"trainer": "kit_trainer", "exporter": "plain_export"},
                      evaluation={"benchmarks": {"pb": {"plugin": "plain_bench"}}, "modes": ["baseline"],
                                  "exclude_training_rows": False})


@pytest.fixture(scope="module")
def plain_build(tmp_path_factory: pytest.TempPathFactory) -> KitBuild:
    return _plain_build(tmp_path_factory.mktemp("plain"))


def test_contract_only_source_teacher_tool_retriever_and_judge_pass_a_build(plain_build: KitBuild) -> None:
    assert plain_build.ok, plain_build.causes
    ref = plain_build.table("reflections")
    assert ref["status"].to_list() == ["ok", "ok"], ref["failure_detail"].to_list()
    assert all(q is not None and 0.5 <= q <= 1 for q in ref["quality"]), ref["quality_reasons"].to_list()
    calls = plain_build.tool_calls()
    assert {c["tool"] for c in calls} == {"plain_tool", "rag"}
    assert all(c["error"] is None for c in calls)
    rr = plain_build.dialogues("rr")
    assert len(rr) == 2
    system = rr[0]["messages"][0]["content"]
    assert "- plain_tool: Says how wide the image is." in system
    text = json.dumps(rr)
    assert "The image is 24 pixels wide." in text and "A passage about sums." in text


def test_contract_only_exporter_and_benchmark_pass_a_build(plain_build: KitBuild) -> None:
    assert plain_build.ok, plain_build.causes
    exported = json.loads((plain_build.root / "store" / "exports" / "plain_export" / "rr.json").read_text())
    assert len(exported) == 2 and exported[0][0]["role"] == "system"
    report = json.loads((plain_build.root / "store" / "tables" / "evaluations" / "base" / "pb"
                         / "baseline.json").read_text())
    assert (report["items"], report["score"]) == (2, 50.0)  # the benchmark's own score: one of two right
    partial = plain_build.root / "store" / "eval" / "partial"  # batches kept while it ran, gone once finished
    assert partial.is_dir() and not list(partial.iterdir())


def test_a_contract_only_trainer_trains_out_of_process_registry(plain_build: KitBuild, tmp_path: Path) -> None:
    """The trainer's child process loads plugins by module name: a contract-only trainer
    found that way trains on the build's RR dialogues."""
    from mmat_assets.pipes.train import train

    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in plain_build.dialogues("rr")))
    out = train({"trainer": "plain_trainer", "export_dir": str(data), "out_dir": str(tmp_path / "out"),
                 "plugins": ["tests.contract_plugins"], "base_dir": str(tmp_path)})
    assert out["steps"] == 2 and Path(out["checkpoint"]).is_dir()


def test_a_contract_only_trainer_builds_the_tuned_model(tmp_path: Path) -> None:
    """``tuned_model`` trains out of process with a trainer that implements only ``train``
    (no ``student`` option, no loss reported)."""
    built = build_with(tmp_path, [plain], select="*tuned_model", sources={"plain": {"plugin": "plain_source"}},
                       teachers={"plain": {"plugin": "plain_teacher"}},
                       export={"exporters": ["kit_jsonl"], "student": "plain-student"},
                       training={"trainer": "plain_trainer", "exporter": "kit_jsonl"})
    assert built.ok, built.causes
    tuned = json.loads((tmp_path / "store" / "tables" / "tuned_model.json").read_text())
    assert (tuned["trainer"], tuned["steps"]) == ("plain_trainer", 2)  # one step a line: the two RR records
    assert Path(tuned["checkpoint"]).is_dir() and "student" not in tuned["training_config"]


class _ProbedTool(Tool):
    name = "probed"
    description = "Echoes its arguments."
    probe_args = {"objects": ["kite"]}
    claim_patterns = (r"\bthe echo says\b",)

    def run(self, image: Path, args: Any) -> ToolResult:
        return ToolResult(json.dumps(dict(args)))


def test_probes_pass_the_arguments_a_tool_declares(tmp_path: Path) -> None:
    from mmat_assets.assets.tools import probe_images, probe_tool

    rows = probe_tool(_ProbedTool(), probe_images(tmp_path))
    assert rows and all(json.loads(r["text"]) == {"objects": ["kite"]} for r in rows)


def test_reflection_reads_claims_and_ground_truth_from_what_plugins_declare() -> None:
    from mmat_assets.engine.reflection import Declarations, deterministic

    declared = Declarations.from_registry(load_registry(entry_points=False, plugins=[_ProbedPlugin]))
    assert declared.ground_truth["tabmwp"] == ("table",) and "probed" in declared.claims
    t = protocol.Trajectory("q", [protocol.Step("The echo says 7 kites. So the answer is 7.", [], None, "end")], "7")
    sample = {"question": "How many kites?", "choices": [], "answer_type": "number", "source": "tabmwp",
              "meta": json.dumps({"table": "kites | 7"})}
    details = [f.detail for f in deterministic(t, sample, 0, declared)[0]]
    assert "the thought cites probed output, but probed was never run" in details
    # 7 is in the table TabMWP declares as ground truth: it must have come back from a tool
    assert "the number 7 is in no tool result, question or computation" in details
    elsewhere = [f.detail for f in deterministic(t, {**sample, "source": "other"}, 0, declared)[0]]
    assert not any("the number 7" in d for d in elsewhere)  # no declaration: 7 is just the answer


_ProbedPlugin = plugin_of(_ProbedTool, name="_ProbedPlugin")


def test_adding_or_removing_a_tool_changes_the_code_versions_of_the_dialogues(tmp_path: Path) -> None:
    from mmat_assets.assets.stages import code_versions
    from mmat_assets.config import load_config
    from mmat_assets.testing import KitPlugin, kit_config

    cfg = load_config(kit_config(tmp_path))
    without = code_versions(cfg, load_registry(builtins=(), entry_points=False, plugins=[KitPlugin]))
    with_tool = code_versions(cfg, load_registry(builtins=(), entry_points=False, plugins=[KitPlugin, _ProbedPlugin]))
    for asset in ("rationales", "rr_samples", "orr_samples"):
        assert without[asset] != with_tool[asset], asset
    assert without["dialogue_files"] == with_tool["dialogue_files"]  # changes through the chain only
