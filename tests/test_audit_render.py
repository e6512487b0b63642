"""Audit rendering: text, JSON and self-contained HTML; the SVG charts behind it."""

from __future__ import annotations

import base64
import json
import re
import xml.etree.ElementTree as ET
from typing import Any

import pytest
from rich.console import Console

from mmat_assets.engine.audit_render import FLAG, render_html, render_json, render_text
from mmat_assets.engine.charts import SVG_NS, bar_chart_svg, funnel_svg, markdown_chart

DATA_VERSION = "3f2a9c0d1e2b4a5c"


def example_audit(**changes: Any) -> dict[str, Any]:
    """An audit of a tuned model trained on one NC and one commercial-use source."""
    audit: dict[str, Any] = {
        "target": {"kind": "model", "name": "tuned_model", "path": "/abs/.mmat/models/tuned"},
        "export": {"name": "ms_swift", "asset": "exports/ms_swift",
                   "data_version": DATA_VERSION, "rows": {"rr": 190, "orr": 150},
                   "rejected": 2, "path": "/abs/.mmat/exports/ms_swift"},
        "model": {"checkpoint": "/abs/.mmat/models/tuned", "trainer": "hf_lora",
                  "student": "/abs/models/student-base", "steps": 30,
                  "training_config": {"lr": 0.0002, "lora_rank": 8},
                  "code_version": "0.1.0"},
        "shards": [
            {"shard": "0", "rows": 100, "data_versions": {
                "foundation_samples": "ab12cd34ef56ab78", "rationales": "0011223344556677",
                "reflections": "8899aabbccddeeff", "rr_samples": "1234567890abcdef"}},
            {"shard": "1", "rows": 90, "data_versions": {
                "foundation_samples": "ba21dc43fe65ba87", "rationales": "7766554433221100",
                "reflections": "ffeeddccbbaa9988", "rr_samples": "fedcba0987654321"}},
        ],
        "sources": [
            {"source": "tabmwp", "dataset": "tabmwp", "subsets": ["grade_1", "grade_2"],
             "license": "CC BY-NC-SA 4.0", "rows": 150, "non_commercial": True},
            {"source": "cauldron", "dataset": "HuggingFaceM4/the_cauldron",
             "subsets": ["chartqa"], "license": "Apache-2.0", "rows": 40,
             "non_commercial": False},
        ],
        "teachers": [{"teacher": "grounded", "model": "grounded-1",
                      "prompt_versions": ["rr-1"], "calls": 600, "cached_calls": 12,
                      "prompt_tokens": 120000, "completion_tokens": 34000,
                      "cost_usd": 1.25}],
        "tools": [{"tool": "ocr", "versions": ["1.0.0"], "calls": 190, "errors": 0},
                  {"tool": "face_detection", "versions": ["2.0"], "calls": 40, "errors": 4}],
        "totals": {"rows": 190, "prompt_tokens": 120000, "completion_tokens": 34000,
                   "tokens": 154000, "cost_usd": 1.25, "teacher_calls": 600,
                   "tool_calls": 230},
        "rates": {"reflection_rate": 0.03, "failure_rate": 0.016},
        "funnel": {"in": 200, "rationale": 193, "reflection": 190, "rr": 190},
        "failures": {"reflection:unsupported_claim": 3, "rationale:no_answer": 7},
        "steps_per_sample": {"2": 10, "3": 150, "10": 30},
        "tool_calls_per_tool": {"ocr": 190, "face_detection": 40},
    }
    audit.update(changes)
    return audit


def export_audit() -> dict[str, Any]:
    """An export audit: no model, commercial-use sources only, nothing counted yet."""
    audit = example_audit(model=None, failures={}, steps_per_sample={},
                          tool_calls_per_tool={}, tools=[], teachers=[])
    audit["target"] = {"kind": "export", "name": "ms_swift", "path": "/abs/exports"}
    audit["sources"] = [dict(audit["sources"][1])]
    return audit


def svg_root(svg: str) -> ET.Element:
    return ET.fromstring(svg)  # also proves the SVG is well-formed XML


def bars(svg: str) -> list[ET.Element]:
    return [r for r in svg_root(svg).iter(f"{{{SVG_NS}}}rect") if r.get("class") == "bar"]


def tips(svg: str) -> list[str]:
    """The tooltip of each bar: "label: value"."""
    return [b.findtext(f"{{{SVG_NS}}}title") or "" for b in bars(svg)]


def texts(svg: str) -> list[str]:
    return [t.text or "" for t in svg_root(svg).iter(f"{{{SVG_NS}}}text")]


def record_text(audit: dict[str, Any]) -> str:
    console = Console(record=True, width=200)
    render_text(audit, console)
    return console.export_text()


# --- charts ---------------------------------------------------------------------------


def test_horizontal_bars_are_proportional_and_in_insertion_order() -> None:
    counts = {"zeta": 10, "alpha": 40, "mid": 20, "none": 0}
    svg = bar_chart_svg(counts, "Calls")
    widths = [float(b.get("width")) for b in bars(svg)]
    assert len(widths) == 4
    assert widths[1] == max(widths) > 0
    for w, v in zip(widths, counts.values(), strict=True):
        assert w == pytest.approx(widths[1] * v / 40, abs=0.02)
    shown = texts(svg)
    assert shown[0] == "Calls"
    assert [s for s in shown if s in counts] == list(counts)  # labels keep the order


def test_vertical_bars_are_proportional_heights_on_one_baseline() -> None:
    svg = bar_chart_svg({"1": 5, "2": 20, "3": 10}, "Steps", horizontal=False)
    rects = bars(svg)
    heights = [float(r.get("height")) for r in rects]
    assert heights[0] * 4 == pytest.approx(heights[1], abs=0.02)
    assert heights[2] * 2 == pytest.approx(heights[1], abs=0.02)
    bottoms = {round(float(r.get("y")) + float(r.get("height")), 2) for r in rects}
    assert len(bottoms) == 1
    assert [float(r.get("width")) for r in rects] == [float(rects[0].get("width"))] * 3


def test_values_and_big_numbers_are_shown() -> None:
    svg = bar_chart_svg({"ocr": 12345, "caption": 0.5}, "Mixed")
    assert "12,345" in texts(svg) and "0.5" in texts(svg)


def test_empty_chart_says_no_data() -> None:
    for svg in (bar_chart_svg({}, "Nothing"), funnel_svg({})):
        assert "no data" in texts(svg)
        assert bars(svg) == []


def test_labels_are_escaped() -> None:
    svg = bar_chart_svg({"<script>alert(1)</script>": 3, 'a"&b': 1}, "<b>title</b>")
    assert "<script>" not in svg and "<b>" not in svg
    assert "&lt;script&gt;" in svg and "&amp;" in svg
    assert "<script>alert(1)</script>" in texts(svg)  # parsed back, it is the label
    assert "<b>title</b>" in texts(svg)


def test_long_labels_are_clipped_but_kept_in_the_tooltip() -> None:
    label = "x" * 200
    svg = bar_chart_svg({label: 1}, "Long", width=480)
    root = svg_root(svg)
    assert all(len(t) < 80 for t in texts(svg))
    assert float(root.get("width")) <= 480
    tip = bars(svg)[0].find(f"{{{SVG_NS}}}title")
    assert tip is not None and label in (tip.text or "")


def test_funnel_bars_shrink_and_show_share_of_first_stage() -> None:
    svg = funnel_svg({"in": 200, "rationale": 150, "rr": 50})
    widths = [float(b.get("width")) for b in bars(svg)]
    assert widths[0] > widths[1] > widths[2] > 0
    assert widths[2] * 4 == pytest.approx(widths[0], abs=0.02)
    # centred: every bar has the same middle
    mids = {round(float(b.get("x")) + float(b.get("width")) / 2, 2) for b in bars(svg)}
    assert len(mids) == 1
    shown = " ".join(texts(svg))
    assert "200 (100.0%)" in shown and "150 (75.0%)" in shown and "50 (25.0%)" in shown
    assert "Yield funnel" in shown


def test_markdown_chart_is_a_data_uri_image_of_the_svg() -> None:
    svg = bar_chart_svg({"a": 1}, "A")
    md = markdown_chart(svg, "tool [calls]\nper tool")
    match = re.fullmatch(r"!\[(.*)\]\(data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)\)", md)
    assert match is not None
    assert match.group(1) == "tool \\[calls\\] per tool"
    assert base64.b64decode(match.group(2)).decode() == svg


def test_markdown_chart_adds_the_namespace_an_image_needs() -> None:
    md = markdown_chart('<svg width="1" height="1"></svg>', "x")
    decoded = base64.b64decode(md.split("base64,")[1][:-1]).decode()
    assert decoded.startswith(f'<svg xmlns="{SVG_NS}"')


# --- JSON -----------------------------------------------------------------------------


def test_json_round_trips_and_is_stable() -> None:
    audit = example_audit()
    text = render_json(audit)
    assert json.loads(text) == audit
    shuffled = dict(reversed(list(audit.items())))
    assert render_json(shuffled) == text
    assert text.splitlines()[1].startswith('  "export"')  # sorted and indented


# --- text -----------------------------------------------------------------------------


def test_text_shows_header_licences_and_flags_only_nc_sources() -> None:
    out = record_text(example_audit())
    assert "tuned_model" in out and DATA_VERSION in out and "hf_lora" in out
    assert "CC BY-NC-SA 4.0" in out and "Apache-2.0" in out
    lines = out.splitlines()
    tabmwp = [ln for ln in lines if "grade_1" in ln]
    cauldron = [ln for ln in lines if "the_cauldron" in ln]
    assert len(tabmwp) == 1 and FLAG in tabmwp[0]
    assert len(cauldron) == 1 and FLAG not in cauldron[0]
    assert out.count(FLAG) == 1
    assert "non-commercial use only: tabmwp" in out


def test_text_flag_is_red() -> None:
    console = Console(record=True, width=200, force_terminal=True, color_system="standard")
    render_text(example_audit(), console)
    styled = console.export_text(styles=True)
    # the ANSI sequence right before the flag sets a red background (41)
    before = styled[: styled.index(FLAG)]
    assert re.search(r"\x1b\[[0-9;]*41[0-9;]*m$", before)


def test_text_shows_totals_rates_funnel_and_failures() -> None:
    out = record_text(example_audit())
    for shown in ("154,000", "$1.25", "3.0%", "1.6%", "reflection:unsupported_claim",
                  "rationale:no_answer", "96.5%", "grounded-1", "rr-1", "face_detection",
                  "10.0%", "ab12cd34ef56ab78"):
        assert shown in out, shown
    # failures sorted by count: the 7 before the 3
    assert out.index("rationale:no_answer") < out.index("reflection:unsupported_claim")
    # steps in numeric order: 2, 3, 10
    steps = [ln.split()[1] for ln in out.splitlines() if re.match(r"^\W*(2|3|10)\W+\d", ln)]
    assert steps[-3:] == ["2", "3", "10"]


def test_text_does_not_read_data_as_markup() -> None:
    audit = example_audit()
    audit["sources"][1]["source"] = "[bold]weird[/bold]"
    assert "[bold]weird[/bold]" in record_text(audit)


def test_text_of_an_export_audit_with_empty_sections() -> None:
    out = record_text(export_audit())
    assert "ms_swift" in out and "checkpoint" not in out
    assert FLAG not in out and "non-commercial" not in out
    assert "Teachers: none" in out and "Failures by reason: none" in out


# --- HTML -----------------------------------------------------------------------------


def test_html_is_self_contained() -> None:
    page = render_html(example_audit())
    lowered = page.lower()
    for banned in ("http://", "https://", "<script", "<link", "@import", "url(", "src=",
                   "href=", "<iframe", "<img"):
        assert banned not in lowered, banned
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page
    assert "<title>mmat audit: tuned_model</title>" in page


def test_html_has_one_svg_per_chart() -> None:
    page = render_html(example_audit())
    assert page.count("<svg") == 3
    for title in ("Tool calls per tool", "Samples by number of steps", "Yield funnel"):
        assert f"<title>{title}</title>" in page
    empty = render_html(export_audit())
    assert empty.count("<svg") == 3 and empty.count(">no data</text>") == 2


def test_html_charts_draw_the_audit_counts() -> None:
    page = render_html(example_audit())
    svgs = re.findall(r"<svg.*?</svg>", page, flags=re.DOTALL)
    tools, steps, funnel = (s.replace("<svg", f'<svg xmlns="{SVG_NS}"', 1) for s in svgs)
    assert [float(b.get("width")) for b in bars(tools)][1] == pytest.approx(
        float(bars(tools)[0].get("width")) * 40 / 190, abs=0.02)
    assert tips(steps) == ["2: 10", "3: 150", "10: 30"]  # numeric order, not "10" < "2"
    assert len(bars(funnel)) == 4


def test_html_shows_versions_licences_and_flags_only_nc_rows() -> None:
    page = render_html(example_audit())
    assert DATA_VERSION in page and "CC BY-NC-SA 4.0" in page and "Apache-2.0" in page
    assert "hf_lora" in page and "fedcba0987654321" in page
    assert page.count(FLAG) == 1
    rows = re.findall(r"<tr[^>]*>.*?</tr>", page, flags=re.DOTALL)
    nc_rows = [r for r in rows if FLAG in r]
    assert len(nc_rows) == 1 and "tabmwp" in nc_rows[0] and 'class="nc"' in nc_rows[0]
    cauldron = next(r for r in rows if "the_cauldron" in r)
    assert FLAG not in cauldron and 'class="nc"' not in cauldron
    assert 'class="banner"' in page
    for section in ("sources", "teachers", "tools", "funnel", "failures", "shards", "totals"):
        assert f'<section id="{section}">' in page


def test_html_without_nc_sources_has_no_flag_or_banner() -> None:
    page = render_html(export_audit())
    assert FLAG not in page and 'class="banner"' not in page and 'class="nc"' not in page
    assert "<title>mmat audit: ms_swift</title>" in page and "checkpoint" not in page


def test_html_escapes_every_value() -> None:
    audit = example_audit()
    audit["target"]["name"] = "<script>alert('name')</script>"
    audit["sources"][0]["subsets"] = ["<script>alert(1)</script>"]
    audit["tool_calls_per_tool"] = {"<script>x</script>": 3}
    page = render_html(audit)
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
