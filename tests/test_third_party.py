"""A third-party tool, installed by entry point, is a first-class tool: listed by ``mmat
plugins``, offered in the RR/ORR system prompts with its own description, called by a real
teacher (the openai one, against a fake server) and recorded in the RR and ORR dialogues.
The prompts list only the tools a build can run."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from mmat_assets.cli import app
from mmat_assets.testing import build_with
from tests.conftest import REPO, tabmwp_subset
from tests.openai_fake import FakeOpenAI
from tests.stage_fakes import EchoTool, ScriptedTeacher, environment, samples, step

DESCRIPTION = "- mean_colour: Returns the mean RGB colour of the image."


def test_mmat_plugins_lists_the_installed_tool(example_plugin: Path) -> None:
    res = CliRunner().invoke(app, ["plugins", "--json", "--config", str(REPO / "mmat.yaml")])
    assert res.exit_code == 0, res.output
    rows = {(r["role"], r["name"]): r for r in json.loads(res.output)["implementations"]}
    assert rows[("tool", "mean_colour")]["plugin"] == "example"
    assert rows[("tool", "mean_colour")]["available"] is True


def colour_reply(body: dict[str, Any]) -> str:
    """Step 1 asks for the third-party tool; step 2 answers with the gold colour."""
    text = next(p["text"] for p in body["messages"][1]["content"] if p.get("type") == "text")
    answer = re.search(r"Correct answer \(do not quote it\): (\w+)", text)[1]  # type: ignore[index]
    if not any(m["role"] == "assistant" for m in body["messages"]):
        return json.dumps(step("I measure the colour of the square first.", ["mean_colour"]))
    return json.dumps(step(f"The tool measured the square's colour. So the answer is {answer}.", final=True))


def test_a_third_party_tool_is_offered_called_and_recorded(example_plugin: Path, tmp_path: Path) -> None:
    with FakeOpenAI(reply=colour_reply) as fake:
        built = build_with(tmp_path, builtins=["mmat_plugins.teachers_openai"], entry_points=True,
                           sources={"swatches": {"plugin": "colour_swatches"}},
                           teachers={"gpt": {"plugin": "openai", "options": {
                               "base_url": fake.base_url, "model": "fake-teacher", "max_retries": 0}}})
    assert built.ok, built.causes
    assert built.registry.get("tool", "mean_colour").plugin == "example"  # found by entry point
    offered = [b for b in fake.bodies if DESCRIPTION in b["messages"][0]["content"]]
    assert len(offered) == len(fake.bodies) == 6  # the teacher was offered it in every request
    calls = [c for c in built.tool_calls() if c["tool"] == "mean_colour"]
    assert sorted(c["text"] for c in calls) == ["The mean colour is (220, 30, 30).",
                                                "The mean colour is (30, 180, 60).",
                                                "The mean colour is (40, 60, 220)."]
    rr, orr = built.dialogues("rr"), built.dialogues("orr")
    assert len(rr) == len(orr) == 3
    for dialogue in rr + orr:
        system, body = dialogue["messages"][0]["content"], json.dumps(dialogue["messages"][1:])
        assert DESCRIPTION in system and "mean_colour" in body and "The mean colour is (" in body
    assert "<|begin_api_invoke|>mean_colour<|end_api_invoke|>" in orr[0]["messages"][1]["content"]


@pytest.mark.slow
def test_the_prompts_of_a_grounded_build_list_only_the_tools_that_run_here(tmp_path: Path) -> None:
    """As in the demo: no detector weights and no model-backed teacher here, so neither
    label_bbox nor image_caption is offered; ocr and face detection are."""
    data = tmp_path / "tabmwp"
    tabmwp_subset(data, 2)
    from mmat_assets.plugins import DEFAULT_PLUGINS

    built = build_with(tmp_path, builtins=DEFAULT_PLUGINS, sources={"tabmwp": {"plugin": "tabmwp",
                                                                              "options": {"path": str(data)}}},
                       teachers={"grounded": {"plugin": "grounded"}})
    assert built.ok, built.causes
    rr, orr = built.dialogues("rr"), built.dialogues("orr")
    assert len(rr) == len(orr) == 2
    for dialogue in rr + orr:
        system = dialogue["messages"][0]["content"]
        assert "- ocr: Reads the text in the image" in system and "- face_detection: Detects human faces" in system
        assert "label_bbox" not in system and "image_caption" not in system
    assert {c["tool"] for c in built.tool_calls()} <= {"ocr", "face_detection"}


def test_the_teacher_prompt_names_only_the_tools_of_the_build(tmp_path: Path) -> None:
    from mmat_assets.engine.rationale import first_messages

    class Finder(EchoTool):
        name = "label_bbox"
        description = "Finds the named objects."

    sample = {**samples(tmp_path, [{"question": "What is a + b?", "answer": "17"}]).row(0, named=True),
              "prompt": "What is a + b?"}
    teacher = ScriptedTeacher(lambda context: {})
    without = first_messages(sample, environment(teacher, {"ocr": EchoTool()}, tmp_path))[0]["content"]
    assert "- ocr" in without and "label_bbox" not in without
    with_it = first_messages(sample, environment(teacher, {"label_bbox": Finder()}, tmp_path))[0]["content"]
    assert "- label_bbox: Finds the named objects." in with_it and "- ocr" not in with_it
