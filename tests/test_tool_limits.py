"""Tool calls are bounded: a hanging tool times out, a huge result is cut and marked, a
malformed result is an error for that call only; a rationale stage carries on through all
three, and a process left with a stuck tool thread still exits."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from mmat_assets import protocol
from mmat_assets.config import ProjectConfig
from mmat_assets.contracts import Tool, ToolResult
from mmat_assets.engine import stages
from mmat_assets.engine.cache import ResultCache
from mmat_assets.engine.tools import MAX_STUCK_CALLS, ToolLimits, call_tool, configured_tools, limits_of
from mmat_assets.plugins import Implementation, Registry
from tests.conftest import REPO
from tests.stage_fakes import EchoTool, ScriptedTeacher, environment, samples, step

HUGE = 5_000_000
CAP = ToolLimits().max_result_chars


class HangingTool(Tool):
    """Blocks until released (a tool stuck on a network call or a deadlock)."""

    name = "hang"

    def __init__(self, release: threading.Event) -> None:
        super().__init__()
        self.release, self.started = release, 0

    def run(self, image: Path, args: Mapping[str, Any]) -> ToolResult:
        self.started += 1
        self.release.wait(60)
        return ToolResult("late answer")


class HugeTool(Tool):
    name = "huge"

    def run(self, image: Path, args: Mapping[str, Any]) -> ToolResult:
        return ToolResult("x" * HUGE, {"boxes": [[1, 2, 3, 4]] * 10_000})


class MalformedTool(Tool):
    """Returns one of the shapes a buggy plugin returns, chosen by ``kind``."""

    name = "malformed"

    def __init__(self, kind: str = "int_text") -> None:
        super().__init__()
        self.kind = kind

    def run(self, image: Path, args: Mapping[str, Any]) -> Any:
        return {"int_text": ToolResult(12345),  # type: ignore[arg-type]
                "list_data": ToolResult("ok", [1, 2]),  # type: ignore[arg-type]
                "int_error": ToolResult("", error=7),  # type: ignore[arg-type]
                "mixed_keys": ToolResult("ok", {1: "a", "b": 2}),
                "plain_str": "just text",
                "none": None}[self.kind]


@pytest.fixture
def release() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()  # frees every worker this test left behind


def _limited(tool: Tool, **limits: Any) -> Tool:
    tool.call_limits = ToolLimits(**limits)  # what configured_tools does from the config
    return tool


def test_defaults_are_120_s_and_16k_characters() -> None:
    assert ToolLimits() == ToolLimits(120.0, 16_384)
    assert limits_of(EchoTool()) == ToolLimits()


def test_a_hanging_call_times_out_as_an_error_and_is_not_cached(tmp_path: Path, release: threading.Event) -> None:
    tool = _limited(HangingTool(release), timeout_s=0.3)
    cache = ResultCache(None, "tools", 0, work_dir=tmp_path)
    started = time.monotonic()
    call = call_tool(tool, tmp_path / "img.png", "ab" * 32, {}, cache)
    assert time.monotonic() - started < 5
    assert call.error == "timed out after 0.3 s" and call.text == "" and not call.cached
    assert cache.get(call.cache_key) is None  # a retry must be able to succeed
    release.set()
    again = call_tool(tool, tmp_path / "img.png", "ab" * 32, {}, cache)
    assert again.error is None and again.text == "late answer"
    assert again.cache_key == call.cache_key  # the timeout does not change results: not in the key


def test_stuck_calls_stop_piling_up_threads(tmp_path: Path, release: threading.Event) -> None:
    tool = _limited(HangingTool(release), timeout_s=0.05)
    calls = [call_tool(tool, tmp_path / "img.png", "ab" * 32, {}, None) for _ in range(MAX_STUCK_CALLS + 2)]
    assert [c.error for c in calls[:MAX_STUCK_CALLS]] == ["timed out after 0.05 s"] * MAX_STUCK_CALLS
    assert all(c.error and c.error.startswith("not run: 4 earlier calls") for c in calls[MAX_STUCK_CALLS:])
    assert tool.started == MAX_STUCK_CALLS  # no thread started for the refused calls
    release.set()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the workers finish and hand their slots back
        call = call_tool(tool, tmp_path / "img.png", "ab" * 32, {}, None)
        if call.error is None:
            break
        time.sleep(0.05)
    assert call.error is None and call.text == "late answer"


def test_a_stuck_tool_thread_does_not_hold_the_process_at_exit(tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import threading
        from pathlib import Path
        from mmat_assets.contracts import Tool, ToolResult
        from mmat_assets.engine.tools import ToolLimits, call_tool

        class Forever(Tool):
            name = "forever"
            def run(self, image, args):
                threading.Event().wait()  # never returns
                return ToolResult("")

        call = call_tool(Forever(), Path("none.png"), "ab", {}, None, ToolLimits(timeout_s=0.2))
        print(call.error)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "timed out after 0.2 s"


def test_a_huge_result_is_cut_marked_and_cached_cut(tmp_path: Path) -> None:
    cache = ResultCache(None, "tools", 0, work_dir=tmp_path)
    call = call_tool(HugeTool(), tmp_path / "img.png", "ab" * 32, {}, cache)
    assert call.error is None and call.truncated_chars == HUGE - CAP
    assert call.text == "x" * CAP + f"… [truncated {HUGE - CAP:,} characters]"
    assert call.data == {"truncated_chars": len(json.dumps({"boxes": [[1, 2, 3, 4]] * 10_000},
                                                           separators=(",", ":")))}
    stored = cache.get(call.cache_key)
    assert stored is not None and len(json.dumps(stored)) < 2 * CAP  # the cache holds the cut result
    hit = call_tool(HugeTool(), tmp_path / "img.png", "ab" * 32, {}, cache)
    assert hit.cached and (hit.text, hit.truncated_chars, hit.data) == (call.text, call.truncated_chars, call.data)
    # the cap changes what a call returns, so another cap is another cache entry
    wider = call_tool(_limited(HugeTool(), max_result_chars=CAP * 2), tmp_path / "img.png", "ab" * 32, {}, cache)
    assert wider.cache_key != call.cache_key and not wider.cached
    assert wider.text.startswith("x" * CAP * 2 + "…") and wider.truncated_chars == HUGE - 2 * CAP


def test_results_at_the_cap_are_kept_whole(tmp_path: Path) -> None:
    call = call_tool(_limited(EchoTool("y" * 10), max_result_chars=10), tmp_path / "i.png", "ab", {}, None)
    assert (call.text, call.truncated_chars, call.data) == ("y" * 10, 0, {"n": 1})


@pytest.mark.parametrize(("kind", "error"), [
    ("int_text", "TypeError: tool returned text of type int, not str"),
    ("list_data", "TypeError: tool returned data of type list, not dict"),
    ("int_error", "TypeError: tool returned an error of type int, not str"),
    ("mixed_keys", "TypeError: '<' not supported between instances of 'str' and 'int'"),
    ("plain_str", "TypeError: tool returned str, not ToolResult"),
    ("none", "TypeError: tool returned NoneType, not ToolResult"),
])
def test_a_malformed_result_is_an_error_for_that_call(tmp_path: Path, kind: str, error: str) -> None:
    cache = ResultCache(None, "tools", 0, work_dir=tmp_path)
    call = call_tool(MalformedTool(kind), tmp_path / "img.png", "ab" * 32, {}, cache)
    assert (call.error, call.text, call.data) == (error, "", {})
    assert cache.get(call.cache_key) is None


def test_limits_come_from_the_tool_config() -> None:
    cfg = ProjectConfig.model_validate({"sources": {}, "tools": {
        "ocr": {"plugin": "echo", "timeout_s": 5, "max_result_chars": 100}, "plain": {"plugin": "echo"}}})
    reg = Registry({"tool": {"echo": Implementation("tool", "echo", HugeTool, "tests", "0")}})
    tools = configured_tools(reg, cfg)
    assert limits_of(tools["ocr"][0]) == ToolLimits(5.0, 100)  # type: ignore[arg-type]
    assert limits_of(tools["plain"][0]) == ToolLimits()  # type: ignore[arg-type]
    for bad in ({"timeout_s": 0}, {"timeout_s": -1}, {"max_result_chars": 0}):
        with pytest.raises(ValidationError):
            ProjectConfig.model_validate({"sources": {}, "tools": {"ocr": bad}})


def test_the_stage_carries_on_through_hanging_huge_and_malformed_tools(
        tmp_path: Path, release: threading.Event) -> None:
    # rows "bad*" call every tool; rows "big*" only the huge one and a good one
    def script(ctx: dict[str, Any]) -> dict[str, Any]:
        if not ctx["steps"]:
            ops = ["hang", "huge", "malformed", "ocr"] if ctx["question"].startswith("bad") else ["huge", "ocr"]
            return step("I read the table with the tools.", ops)
        return step("a is 12 and b is 5, so the answer is 17.", final=True)

    teacher = ScriptedTeacher(script)
    tools: dict[str, Tool] = {"hang": _limited(HangingTool(release), timeout_s=0.2), "huge": HugeTool(),
                              "malformed": MalformedTool(), "ocr": EchoTool()}
    env = environment(teacher, tools, tmp_path, concurrency=4, max_steps=3)
    questions = ["bad0", "bad1", "bad2", "big0", "big1"]
    df = samples(tmp_path, [{"question": q, "answer": "17"} for q in questions])
    started = time.monotonic()
    out = stages.run_rationales(df, env)
    assert time.monotonic() - started < 30
    assert out["status"].to_list() == ["ok"] * 5, out["failure_detail"].to_list()  # every loop finished
    errors = {(c["tool"], c["error"]) for row in out["tool_calls"] for c in row if c["error"]}
    assert errors == {("hang", "timed out after 0.2 s"),
                      ("malformed", "TypeError: tool returned text of type int, not str")}
    # what the teacher was shown next: the marked text and the failures, never the 5 MB
    for request in (r for r in teacher.calls if r.context["steps"]):
        shown = json.dumps(request.messages, ensure_ascii=False)
        assert f"… [truncated {HUGE - CAP:,} characters]" in shown and len(shown) < 4 * CAP
        if request.context["question"].startswith("bad"):
            assert "The hang tool failed on this image." in shown
            assert "The malformed tool failed on this image." in shown
    reflected = stages.run_reflections(out, env)
    # a dialogue built on a failed call is not training data: failed with its reason
    by_q = {r["question"]: r for r in reflected.to_dicts()}
    for q in questions[:3]:
        assert (by_q[q]["status"], by_q[q]["failure"]) == ("failed", "tool_error")
        assert by_q[q]["failure_detail"] == "2 tool call(s) failed"
    rr = stages.rr_samples(reflected)
    assert sorted(rr["question"]) == ["big0", "big1"]
    for turns in rr["turns"]:
        assert sum(len(t["content"]) for t in turns) < 4 * CAP  # not 5 MB per row
        results = {r.tool: r.text for r in protocol.parse_rr(turns).steps[0].results}
        assert results["huge"] == "x" * CAP + f"… [truncated {HUGE - CAP:,} characters]"
        assert results["ocr"] == "a | 12\nb | 5"
