"""Benchmark readers on hand-made files in their public formats, and the harness modes."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

from PIL import Image

from mmat_assets import protocol
from mmat_assets.engine import evaluate as ev
from mmat_assets.plugins import load_registry
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
