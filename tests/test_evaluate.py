"""Benchmark readers on hand-made files in their public formats, and the harness modes."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest

from PIL import Image

from mmat_assets import protocol
from mmat_assets.contracts import Benchmark, BenchmarkItem, ImageInput
from mmat_assets.engine import evaluate as ev
from mmat_assets.plugins import load_registry
from tests.built_project import Built, built  # noqa: F401  (fixture)
from tests.conftest import TABMWP
from tests.stage_fakes import EchoTool

REG = load_registry(entry_points=False)


def _png_b64() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "blue").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_readers_scores_and_limits(tmp_path: Path, tabmwp_dir: Path) -> None:
    tab = REG.create("benchmark", "tabmwp_eval", {"path": str(tabmwp_dir), "limit": 3})
    items = list(tab.items())
    assert len(items) == 3 and tab.score(items[0].answers[0], items[0]) == 1.0
    assert Path(items[0].image.path).is_file()
    rows = "".join(f"{i}\tWhich?\tB\tred\tblue\t{_png_b64()}\n" for i in range(4))
    (tmp_path / "mmstar.tsv").write_text("index\tquestion\tanswer\tA\tB\timage\n" + rows)
    tsv = REG.create("benchmark", "vlmevalkit", {"path": str(tmp_path / "mmstar.tsv"), "limit": 2})
    vi = list(tsv.items())
    assert len(vi) == 2 and vi[0].choices == ["red", "blue"] and vi[0].image.data[:4] == b"\x89PNG"
    assert [tsv.score(p, vi[0]) for p in ("B", "(B) blue", "blue", "A")] == [1.0, 1.0, 1.0, 0.0]
    (tmp_path / "dyn.jsonl").write_text(json.dumps({"question": "Who painted it?", "answer": ["Georges Seurat", "Seurat"]}))
    dyn = REG.create("benchmark", "dynvqa", {"path": str(tmp_path / "dyn.jsonl")})
    (d,) = dyn.items()
    assert dyn.score("Seurat", d) == 1.0 and 0 < dyn.score("It was Georges Seurat", d) < 1 and dyn.score("Monet", d) == 0


def test_modes_run_tools_and_the_rr_loop(tmp_path: Path, tabmwp_dir: Path) -> None:
    item = next(iter(REG.create("benchmark", "tabmwp_eval", {"path": str(tabmwp_dir), "limit": 1}).items()))
    gold = item.answers[0]
    seen: list[list[dict[str, str]]] = []
    script = iter(["<THOUGHT>Read it.</THOUGHT><OPERATOR>ocr</OPERATOR><SIGNAL>continue</SIGNAL>",
                   "<THOUGHT>Done.</THOUGHT><SIGNAL>end</SIGNAL>", gold])

    def rr_model(msgs: list[dict[str, str]], images: list[str]) -> str:
        seen.append([dict(m) for m in msgs])
        return next(script)

    h = ev.Harness({"ocr": EchoTool("x | 1")}, max_steps=4)
    (res,) = ev.evaluate(rr_model, REG.create("benchmark", "tabmwp_eval", {"path": str(tabmwp_dir)}), [item], "rr", h,
                         tmp_path)
    assert res.score == 1.0 and res.steps == 2 and res.tool_calls == ["ocr"]
    assert seen[1][-1]["content"] == "Here are ocr results from the previous step: x | 1 Please continue your reasoning."
    assert seen[2][-1]["content"].startswith("Based on the above information")

    def orr_model(msgs: list[dict[str, str]], images: list[str]) -> str:
        assert "<|begin_result_of_api|>x | 1<|end_result_of_api|>" in msgs[-1]["content"] and len(images) == 1
        return f"<THOUGHT>ok</THOUGHT><ANSWER>The answer is: {gold}</ANSWER>"

    (o,) = ev.evaluate(orr_model, REG.create("benchmark", "tabmwp_eval", {"path": str(tabmwp_dir)}), [item], "orr", h,
                       tmp_path)
    assert o.prediction == gold and o.score == 1.0
    (b,) = ev.evaluate(lambda m, i: "wrong", REG.create("benchmark", "tabmwp_eval", {"path": str(tabmwp_dir)}),
                       [item], "baseline", h, tmp_path)
    assert b.score == 0.0
    table = ev.report_markdown([{"model": "base", "mode": "rr", "benchmark": "t", **ev.summary([res])}])
    assert "| base | rr | 100.0 | 100.0 |" in table
    assert protocol.START in seen[0][-1]["content"]


# ------------------------------------------------------------------ the RR loop (SPEC §3)


class Scripted:
    """A batching model: each item's dialogue answers from its own script, keyed by the
    question; records every batch call and its token limit."""

    def __init__(self, scripts: dict[str, list[ev.Reply | str]]) -> None:
        self.scripts = {q: list(s) for q, s in scripts.items()}
        self.calls: list[tuple[int, int]] = []  # (prompts in the call, max_new_tokens)
        self.seen: dict[str, list[list[dict[str, str]]]] = {}

    def __call__(self, msgs: list[dict[str, str]], images: list[str]) -> str:
        return self.generate_batch([(msgs, images)], 0)[0].text

    def generate_batch(self, prompts, max_new_tokens: int) -> list[ev.Reply]:
        self.calls.append((len(prompts), max_new_tokens))
        out = []
        for msgs, _ in prompts:
            q = next(q for q in self.scripts if q in msgs[1 if msgs[0]["role"] == "system" else 0]["content"])
            self.seen.setdefault(q, []).append([dict(m) for m in msgs])
            r = self.scripts[q].pop(0)
            out.append(r if isinstance(r, ev.Reply) else ev.Reply(r))
        return out


class Exact(Benchmark):
    name = "exact"

    def items(self):
        return iter(())

    def score(self, prediction: str, item: BenchmarkItem) -> float:
        return float(prediction == item.answers[0])


def _items(*questions: str, answer: str = "17") -> list[BenchmarkItem]:
    image = ImageInput(path=str(TABMWP / "tables" / "33.png"))
    return [BenchmarkItem(str(i), q, [answer], image) for i, q in enumerate(questions)]


def _run(model, items, mode="rr", **harness):
    h = ev.Harness({"ocr": EchoTool("a | 12\nb | 5")}, **harness)
    return ev.evaluate(model, Exact(), items, mode, h, Path("."))


STEP_OCR = "<THOUGHT>Read it.</THOUGHT><OPERATOR>ocr</OPERATOR><SIGNAL>continue</SIGNAL>"
STEP_DOUBT = "<THOUGHT>Let me check the sum.</THOUGHT><SIGNAL>reflection</SIGNAL>"
STEP_END = "<THOUGHT>12 + 5 = 17.</THOUGHT><SIGNAL>end</SIGNAL>"


def test_a_reflection_is_answered_with_the_reflection_request_and_the_loop_goes_on() -> None:
    model = Scripted({"q1": [STEP_OCR, STEP_DOUBT, STEP_END, "17"]})
    (r,) = _run(model, _items("q1"))
    turns = model.seen["q1"]
    assert turns[2][-1] == {"role": "user", "content": f"{protocol.NOTHING} {protocol.REFLECT}"}
    assert turns[3][-1]["content"].startswith("Based on the above information")
    assert (r.score, r.steps, r.reflections, r.ended, r.bad_steps, r.cut_steps) == (1.0, 3, 1, "end", 0, 0)


def test_only_the_reply_to_the_summary_is_scored() -> None:
    # the gold answer in a step's text is not an answer; a wrong summary reply scores 0
    model = Scripted({"q1": ["<THOUGHT>17</THOUGHT><SIGNAL>end</SIGNAL>", "12"],
                      "q2": [STEP_END, "17"]})
    r1, r2 = _run(model, _items("q1", "q2"))
    assert (r1.prediction, r1.score, r2.prediction, r2.score) == ("12", 0.0, "17", 1.0)
    assert all(t[-1]["content"].startswith("Based on the above information") for t in
               (model.seen["q1"][-1], model.seen["q2"][-1]))


def test_bad_and_cut_steps_are_counted_and_the_loop_goes_to_the_summary() -> None:
    model = Scripted({"bad": ["<SIGNAL>continue</SIGNAL>", "17"],
                      "cut": [ev.Reply("<THOUGHT>The OCR reads: a | 12 b", truncated=True), "17"],
                      "cap": [STEP_OCR, STEP_OCR, "17"]})
    bad, cut, cap = _run(model, _items("bad", "cut", "cap"), max_steps=2)
    assert (bad.bad_steps, bad.cut_steps, bad.ended, bad.score) == (1, 0, "bad_step", 1.0)
    assert (cut.bad_steps, cut.cut_steps, cut.ended, cut.score) == (0, 1, "cut_step", 1.0)
    assert (cap.steps, cap.ended, cap.tool_calls) == (2, "step_cap", ["ocr", "ocr"])
    for q in ("bad", "cut", "cap"):
        assert model.seen[q][-1][-1]["content"].startswith("Based on the above information")
    totals = ev.summary([bad, cut, cap])
    assert (totals["bad_steps"], totals["cut_steps"]) == (1, 1)


def test_generations_are_batched_across_problems_with_the_limit_of_each_turn() -> None:
    model = Scripted({f"q{i}": [STEP_OCR, STEP_END, "17"] for i in range(5)})
    results = _run(model, _items(*[f"q{i}" for i in range(5)]), limits=ev.Limits(40, 9, 100), batch_size=4)
    assert [r.score for r in results] == [1.0] * 5
    # two batches (4 + 1): two steps and the summary each
    assert model.calls == [(4, 40), (4, 40), (4, 9), (1, 40), (1, 40), (1, 9)]


class _Stop(BaseException):
    """A stop the harness does not catch, as an interrupt is not."""


class _StopsAt(Scripted):
    """A scripted model that stops when it is first asked about ``question``."""

    def __init__(self, scripts: dict[str, list[ev.Reply | str]], question: str) -> None:
        super().__init__(scripts)
        self.question = question

    def generate_batch(self, prompts, max_new_tokens: int) -> list[ev.Reply]:
        if any(self.question in msgs[1]["content"] for msgs, _ in prompts):
            raise _Stop
        return super().generate_batch(prompts, max_new_tokens)


def test_a_stopped_evaluation_resumes_at_its_first_unfinished_batch(tmp_path: Path) -> None:
    qs = [f"q{i}" for i in range(5)]
    scripts: dict[str, list[ev.Reply | str]] = {q: [STEP_OCR, STEP_END, "17" if i % 2 else "12"]
                                                for i, q in enumerate(qs)}
    whole = _run(Scripted(scripts), _items(*qs), batch_size=2)
    resume = tmp_path / "partial" / ev.resume_name({"items": qs})
    h = ev.Harness({"ocr": EchoTool("a | 12\nb | 5")}, batch_size=2)
    with pytest.raises(_Stop):  # stops in the second batch (q2, q3)
        ev.evaluate(_StopsAt(scripts, "q3"), Exact(), _items(*qs), "rr", h, tmp_path, resume=resume)
    assert [json.loads(ln)["item_id"] for ln in resume.read_text().splitlines()] == ["0", "1"]
    with resume.open("a") as f:
        f.write('{"item_id": "2", "predic')  # a torn append: its batch runs again
    again = Scripted(scripts)
    resumed = ev.evaluate(again, Exact(), _items(*qs), "rr", h, tmp_path, resume=resume)
    assert set(again.seen) == {"q2", "q3", "q4"}  # nothing asked again about the finished batch
    assert again.calls == [(2, 64), (2, 64), (2, 64), (1, 64), (1, 64), (1, 64)]  # the same batches
    fields = [(r.item_id, r.prediction, r.score, r.steps, r.ended, r.tool_calls) for r in resumed]
    assert fields == [(r.item_id, r.prediction, r.score, r.steps, r.ended, r.tool_calls) for r in whole]
    assert ev.resume_name({"items": qs}) != ev.resume_name({"items": qs[::-1]})
    assert set(ev._finished(resume)) == {"0", "1", "2", "3", "4"}  # the torn line did not swallow the next


def test_step_limits_come_from_the_training_steps_p99() -> None:
    rr = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "x" * n},
           {"role": "user", "content": "s"}, {"role": "assistant", "content": "17"}] for n in range(1, 201)]
    orr = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "y" * 50}]]
    limits = ev.generation_limits(rr, orr, len)
    assert (limits["step_tokens"], limits["answer_tokens"], limits["orr_tokens"]) == (199, 3, 51)
    assert ev.Limits.of(limits, 64) == ev.Limits(199, 3, 51) and ev.Limits.of(None, 64) == ev.Limits(64, 64, 256)
    assert ev.Limits.of(limits, 64, cap=50) == ev.Limits(50, 3, 50)  # a bounded run


class _Watched(list):
    """An answer list that says whether anything but the scorer read it."""

    scoring = False
    leaked = 0

    def __getitem__(self, i):
        if not _Watched.scoring:
            _Watched.leaked += 1
        return super().__getitem__(i)

    def __iter__(self):
        if not _Watched.scoring:
            _Watched.leaked += 1
        return super().__iter__()


class _Guarded(Exact):
    def score(self, prediction: str, item: BenchmarkItem) -> float:
        _Watched.scoring = True
        try:
            return super().score(prediction, item)
        finally:
            _Watched.scoring = False


def test_nothing_but_the_scorer_reads_the_answers() -> None:
    items = [BenchmarkItem("0", "q0", _Watched(["A"]), choices=["red", "blue"], meta={"answer_style": "letter"}),
             BenchmarkItem("1", "q1", _Watched(["17"]))]
    h = ev.Harness({"ocr": EchoTool("a | 12")})
    for mode in ev.MODES:
        model = Scripted({"q0": [STEP_END, "A"] if mode == "rr" else ["A"],
                          "q1": [STEP_END, "17"] if mode == "rr" else ["17"]})
        results = ev.evaluate(model, _Guarded(), items, mode, h, Path("."))
        assert all(r.score == 1.0 for r in results), (mode, results)
    assert _Watched.leaked == 0


def test_the_student_generates_a_batch_as_it_generates_one_and_marks_cut_replies(
        request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> None:
    pytest.importorskip("torch")
    from mmat_plugins import trainers_hf_lora as hf
    from tests.test_student import build_test_student, student_cache, write_png

    folder = build_test_student(student_cache(request, tmp_path_factory))
    model, processor = hf.load_student(str(folder))
    red = write_png(tmp_path_factory.mktemp("img") / "red.png", (220, 20, 20))
    prompts = [([{"role": "user", "content": "<image>What colour is it?"}], [str(red)]),
               ([{"role": "user", "content": "<image>Count the rows of the table, please, then say the total."}],
                [str(red)])]
    responder = hf.StudentResponder(model.eval(), processor, 12, threads=1)
    assert isinstance(responder, ev.BatchResponder)
    batch = responder.generate_batch(prompts, 12)
    one = [responder.generate_batch([p], 12)[0] for p in prompts]
    assert [r.text for r in batch] == [r.text for r in one]
    cut = responder.generate_batch(prompts, 2)
    assert all(r.truncated for r in cut) and all(len(processor.tokenizer(r.text)["input_ids"]) <= 2 for r in cut)


@pytest.mark.slow
def test_the_tuned_model_records_its_step_limit_from_the_training_steps(built: Built) -> None:
    from mmat_plugins.trainers_hf_lora import HFLoRATrainer

    tables = Path(built.cfg.profile_root("local")) / "tables"
    tuned = json.loads((tables / "tuned_model.json").read_text())
    manifest = json.loads((tables / "exports" / "ms_swift.json").read_text())
    count = HFLoRATrainer().token_counter(tuned["student"])
    steps = [count(m["content"]) for d in ev.export_dialogues(manifest["files"]["rr"])
             for m in [t for t in d if t["role"] == "assistant"][:-1]]
    limits = tuned["generation_limits"]
    assert limits["step_tokens"] == int(ev.percentile(steps, 0.99)) + 1 and limits["rr_turns"] == len(steps)
    assert limits["orr_tokens"] > limits["answer_tokens"] > 0
