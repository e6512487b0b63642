"""Built-in tools on real images: OCR on TabMWP tables, faces, open-vocabulary boxes, captions."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from mmat_assets.assets.tools import build_tool_assets, tool_report
from mmat_assets.config import ProjectConfig
from mmat_assets.contracts import (
    Teacher,
    TeacherError,
    TeacherReply,
    TeacherRequest,
    Tool,
    ToolResult,
)
from mmat_assets.engine.tools import available_tools, call_tool, tool_prompt
from mmat_plugins.tools_caption import CaptionTool, parse_caption, parse_scene_graph
from mmat_plugins.tools_face import FaceDetectionTool, face_text
from mmat_plugins.tools_label_bbox import LabelBboxTool
from mmat_plugins.tools_ocr import OcrTool, flatten
from tests.conftest_tools import (  # noqa: F401  (fixtures)
    astronaut_png,
    bad_images,
    numeric_cells,
    tabmwp_image,
    tabmwp_problems,
    text_tokens,
    tiny_owl_dir,
    tool_registry,
)

#: The first five problems of the dev1k file whose tables hold numeric cells.
N_TABLES = 5


class FakeTeacher(Teacher):
    """Answers the caption tool's two requests with canned replies and records them."""

    name = "fake_teacher"
    vision = True

    def __init__(self, graph_reply: str | None = None, vision: bool = True) -> None:
        super().__init__()
        self.vision = vision
        self.requests: list[TeacherRequest] = []
        self.graph_reply = graph_reply or (
            "```json\n{\"objects\": [{\"id\": \"o1\", \"name\": \"astronaut\", \"attributes\":"
            " [\"white suit\"]}, {\"id\": \"o2\", \"name\": \"flag\", \"attributes\":"
            " [\"american\"]}],"
            " \"relations\": [{\"subject\": \"o1\", \"predicate\": \"in front of\", \"object\": "
            "\"o2\"}, {\"subject\": \"o1\", \"predicate\": \"holds\", \"object\": \"o9\"}]}\n```")

    def complete(self, request: TeacherRequest) -> TeacherReply:
        self.requests.append(request)
        if self.graph_reply == "refuse":
            raise TeacherError("refusal", "the model declined")
        if request.context["step"] == "scene_graph":
            return TeacherReply(self.graph_reply, prompt_tokens=100, completion_tokens=40,
                                model="fake-vlm")
        return TeacherReply('Caption: "An astronaut in a white suit stands in front of an '
                            'American flag"\n', prompt_tokens=60, completion_tokens=15,
                            model="fake-vlm")


def project(tools: dict[str, Any]) -> ProjectConfig:
    return ProjectConfig.model_validate({"sources": {}, "tools": tools})


@pytest.fixture(scope="module")
def ocr() -> OcrTool:
    return OcrTool()


@pytest.fixture(scope="module")
def face() -> FaceDetectionTool:
    return FaceDetectionTool()


@pytest.fixture(scope="module")
def owl(tiny_owl_dir: Path) -> LabelBboxTool:
    return LabelBboxTool({"model": str(tiny_owl_dir), "threshold": 0.0})


# ------------------------------------------------------------------- registry


def test_registry_lists_four_tools_and_two_retrievers() -> None:
    reg = tool_registry()
    assert reg.errors == []
    assert sorted(reg.role("tool")) == ["face_detection", "image_caption", "label_bbox", "ocr"]
    assert sorted(reg.role("retriever")) == ["lancedb", "web_search"]


def test_offered_tools_are_exactly_the_available_ones(tiny_owl_dir: Path) -> None:
    reg = tool_registry()
    offline = available_tools(reg, ProjectConfig(sources={}))
    assert sorted(offline) == ["face_detection", "ocr"]
    cfg = project({
        "label_bbox": {"options": {"model": str(tiny_owl_dir)}},
        "image_caption": {"options": {"teacher": "vlm"}},
    })
    offered = available_tools(reg, cfg, teachers={"vlm": FakeTeacher()})
    assert sorted(offered) == ["face_detection", "image_caption", "label_bbox", "ocr"]
    prompt = tool_prompt(offered).splitlines()
    assert [line.split(":")[0] for line in prompt] == [f"- {n}" for n in sorted(offered)]
    disabled = project({"ocr": {"enabled": False}})
    assert "ocr" not in available_tools(reg, disabled)


# ------------------------------------------------------------------------ OCR


@pytest.mark.slow
def test_ocr_reads_numeric_cells_of_tabmwp_tables(ocr: OcrTool) -> None:
    problems = tabmwp_problems()
    picked = [pid for pid, p in problems.items() if numeric_cells(p["table"])][:N_TABLES]
    for pid in picked:
        result = ocr.run(tabmwp_image(pid), {})
        assert result.error is None, result.error
        cells = numeric_cells(problems[pid]["table"])
        found = text_tokens(result.text)
        hit = sum(c in found for c in cells)
        assert hit / len(cells) >= 0.9, (pid, cells, result.text)
        assert len(result.data["boxes"]) == len(result.data["scores"]) == len(result.data["texts"])


def test_ocr_keeps_table_rows_as_lines(ocr: OcrTool) -> None:
    pid = next(pid for pid, p in tabmwp_problems().items() if p["table"].startswith("x | y"))
    lines = ocr.run(tabmwp_image(pid), {}).text.lower().splitlines()
    gold = [" | ".join(c.strip() for c in row.split("|")).lower()
            for row in tabmwp_problems()[pid]["table"].splitlines()]
    assert lines == gold


def test_reading_order_groups_lines_then_columns() -> None:
    def item(text: str, x: float, y: float) -> dict[str, Any]:
        return {"text": text, "score": 1.0, "box": [x, y, x + 20, y + 10]}

    items = [item("b2", 200, 31), item("a1", 10, 1), item("b1", 10, 29), item("a2", 200, 0)]
    assert flatten(items) == "a1 | a2\nb1 | b2"


# ---------------------------------------------------------------------- faces


def test_face_detection_finds_the_astronaut(face: FaceDetectionTool, astronaut_png: Path) -> None:
    result = face.run(astronaut_png, {})
    assert result.error is None
    assert result.data["count"] == 1
    x1, y1, x2, y2 = result.data["boxes"][0]
    assert 0 <= x1 < x2 <= 512 and 0 <= y1 < y2 <= 512
    assert result.text.startswith("There is one face with a coordinate: [")


def test_face_detection_finds_no_face_in_a_table(face: FaceDetectionTool) -> None:
    pid = next(iter(tabmwp_problems()))
    result = face.run(tabmwp_image(pid), {})
    assert result.data["count"] == 0
    assert result.text == "There is no face in the image."


def test_face_text_phrasing() -> None:
    assert face_text([[454, 301, 883, 838]]) == (
        "There is one face with a coordinate: [454.0, 301.0, 883.0, 838.0]")
    assert face_text([[1, 2, 3, 4], [5, 6, 7, 8]]) == (
        "There are 2 faces with coordinates: [1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]")


# ----------------------------------------------------------------- label_bbox


def test_label_bbox_is_unavailable_offline_with_a_reason(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tool = LabelBboxTool({"cache_dir": str(tmp_path)})  # an empty HF cache
    avail = tool.availability()
    assert not avail.ok
    assert "google/owlv2-base-patch16-ensemble" in avail.reason
    assert "never downloaded" in avail.reason
    result = tool.run(tmp_path / "x.png", {"objects": ["cat"]})
    assert result.error  # reports, does not raise or download
    empty_dir = tmp_path / "no-weights"
    empty_dir.mkdir()
    assert not LabelBboxTool({"model": str(empty_dir)}).availability().ok


@pytest.mark.slow
def test_label_bbox_runs_end_to_end_with_a_tiny_detector(owl: LabelBboxTool,
                                                         astronaut_png: Path) -> None:
    assert owl.availability().ok
    result = owl.run(astronaut_png, {"objects": ["person", "flag", "person"]})
    assert result.error is None, result.error
    boxes = json.loads(result.text)
    assert list(boxes) == ["person", "flag"]
    assert any(boxes.values())  # threshold 0: random weights still give boxes
    for per_name in boxes.values():
        assert len(per_name) <= owl.options.max_boxes
        for box in per_name:
            assert len(box) == 4 and all(0.0 <= v <= 1.0 for v in box)
            assert box[0] <= box[2] and box[1] <= box[3]


def test_label_bbox_needs_object_names(owl: LabelBboxTool, astronaut_png: Path) -> None:
    result = owl.run(astronaut_png, {})
    assert result.error and "objects" in result.error


# -------------------------------------------------------------------- caption


def test_caption_is_unavailable_without_a_vision_teacher() -> None:
    tool = CaptionTool()
    assert tool.availability() == (False, "no vision-capable teacher configured")
    tool.attach_teachers({"text_only": FakeTeacher(vision=False)})
    assert tool.availability() == (False, "no vision-capable teacher configured")
    tool = CaptionTool({"teacher": "vlm"})
    tool.attach_teachers({})
    assert not tool.availability().ok and "'vlm'" in tool.availability().reason
    tool.attach_teachers({"vlm": FakeTeacher(vision=False)})
    assert "cannot see images" in tool.availability().reason


def test_caption_picks_the_first_teacher_that_sees() -> None:
    tool = CaptionTool()
    seeing = FakeTeacher()
    tool.attach_teachers({"a_text": FakeTeacher(vision=False), "b_vlm": seeing})
    assert tool.teacher is seeing and tool.availability().ok


def test_caption_two_steps_with_a_teacher(astronaut_png: Path) -> None:
    teacher = FakeTeacher()
    tool = CaptionTool({"teacher": "vlm"})
    tool.attach_teachers({"vlm": teacher})
    result = tool.run(astronaut_png, {"question": "What is behind the person?"})
    assert result.error is None, result.error
    assert result.text == "An astronaut in a white suit stands in front of an American flag."
    graph = result.data["scene_graph"]
    assert [o["name"] for o in graph["objects"]] == ["astronaut", "flag"]
    assert graph["relations"] == [{"subject": "o1", "predicate": "in front of", "object": "o2"}]
    first, second = teacher.requests
    assert first.kind == second.kind == "caption" and first.json_schema is not None
    parts = first.messages[0]["content"]
    assert parts[0]["type"] == "image" and parts[0]["path"] == str(astronaut_png)
    assert len(parts[0]["sha256"]) == 64
    assert "What is behind the person?" in parts[1]["text"]
    assert "astronaut" in second.messages[0]["content"]  # step 2 sees the graph
    assert result.data["prompt_tokens"] == 160


def test_caption_bad_teacher_reply_is_an_error_result(astronaut_png: Path) -> None:
    tool = CaptionTool({"teacher": "vlm"})
    tool.attach_teachers({"vlm": FakeTeacher(graph_reply="I cannot see the image.")})
    result = tool.run(astronaut_png, {})
    assert result.error and "no JSON object" in result.error
    tool.attach_teachers({"vlm": FakeTeacher(graph_reply="refuse")})
    assert tool.run(astronaut_png, {}).error == "teacher refusal: the model declined"


def test_scene_graph_and_caption_parsing() -> None:
    graph = parse_scene_graph('Sure! {"objects": ["dog", {"name": "ball", "attributes": "red"}]}')
    assert graph["objects"][1] == {"id": "o2", "name": "ball", "attributes": ["red"]}
    with pytest.raises(ValueError):
        parse_scene_graph('{"objects": []}')
    assert parse_caption("\n  A dog plays with a red ball\nmore") == "A dog plays with a red ball."


# ------------------------------------------------------------------ bad input


@pytest.mark.slow
def test_every_tool_survives_bad_images(ocr: OcrTool, face: FaceDetectionTool,
                                        owl: LabelBboxTool, bad_images: dict[str, Path]) -> None:
    caption = CaptionTool({"teacher": "vlm"})
    caption.attach_teachers({"vlm": FakeTeacher()})
    tools: list[tuple[Tool, dict[str, Any]]] = [
        (ocr, {}), (face, {}), (owl, {"objects": ["cat"]}), (caption, {})]
    texts: dict[tuple[str, str], str] = {}
    for tool, args in tools:
        for name, path in bad_images.items():
            result = tool.run(path, args)
            assert isinstance(result, ToolResult), (tool.name, name)
            if name in ("truncated", "missing"):
                assert result.error, (tool.name, name)
            else:
                assert result.error is None, (tool.name, name, result.error)
            texts[tool.name, name] = result.text
    # Decoded right, not merely survived: 16-bit grey rescaled, transparency on white.
    assert "4096" in texts["ocr", "grey16"]
    assert "1234" in texts["ocr", "rgba"]


def test_call_tool_turns_exceptions_into_error_results(tmp_path: Path) -> None:
    class Broken(Tool):
        name = "broken"

        def run(self, image: Path, args: Mapping[str, Any]) -> ToolResult:
            raise RuntimeError("boom")

    call = call_tool(Broken(), tmp_path / "none.png", None, {"a": 1}, cache=None)
    assert call.error == "RuntimeError: boom"
    assert call.tool == "broken" and call.args == '{"a":1}' and not call.cached


# --------------------------------------------------------------------- assets


@pytest.mark.slow
def test_tool_assets_record_availability_and_probes(tmp_path: Path) -> None:
    reg = tool_registry()
    cfg = project({"face_detection": {"options": {"confidence": 0.6}}})
    assets = build_tool_assets(cfg, reg)
    keys = {a.key.to_user_string() for a in assets}
    assert keys == {"tools/ocr", "tools/face_detection", "tools/label_bbox", "tools/image_caption"}
    face_asset = next(a for a in assets if a.key.path[-1] == "face_detection")
    assert face_asset.code_versions_by_key[face_asset.key] == FaceDetectionTool.version
    picked = [a for a in assets if a.key.path[-1] in ("face_detection", "label_bbox")]
    result = dg.materialize(picked)
    assert result.success
    meta: dict[str, Any] = {
        event.asset_key.path[-1]: event.step_materialization_data.materialization.metadata
        for event in result.get_asset_materialization_events() if event.asset_key}
    assert meta["face_detection"]["available"].value is True
    probes = {p["image"]: p for p in meta["face_detection"]["probes"].value}
    assert probes["astronaut"]["text"].startswith("There is one face")
    assert meta["face_detection"]["options"].value["confidence"] == 0.6
    assert meta["label_bbox"]["available"].value is False
    assert "never downloaded" in meta["label_bbox"]["reason"].value


@pytest.mark.slow
def test_ocr_probe_reads_the_rendered_text() -> None:
    report = tool_report(ProjectConfig(sources={}), tool_registry(), "ocr")
    text = next(p for p in report["probes"] if p["image"] == "text")["text"]
    assert "42" in text and "Apples" in text
