"""The framework templates the exports ship render a dialogue as the offline student does.

The student speaks ChatML; ms-swift's ``llava1_5_hf`` and LLaMA-Factory's ``llava`` are
Vicuna-style, so the ms_swift and sharegpt exports carry a template of their own. Neither
framework is installed here: the LLaMA-Factory registration is run against recorders of
its formatter slots and rendered the way its templates join slots (system, then each user
and assistant turn); the ms-swift plugin is run against recorders of its imports, for the
one thing it changes from ChatML (``<image>`` kept as it is).
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from mmat_assets.toolkit.export import Record
from mmat_plugins.exporters_sharegpt import LLAMAFACTORY_TEMPLATE, ShareGPTExporter
from mmat_plugins.exporters_swift import SWIFT_TEMPLATE, TEMPLATE_NAME, SwiftExporter
from mmat_plugins.trainers_hf_lora import CHAT_TEMPLATE

DIALOGUE = [
    {"role": "system", "content": "Use the tools. Answer with the number."},
    {"role": "user", "content": "<image>How many more apples than pears?"},
    {"role": "assistant", "content": "<ocr>Read the table.</ocr>"},
    {"role": "user", "content": "OCR: apples 7, pears 3\nContinue."},
    {"role": "assistant", "content": "7 - 3 = 4. The answer is 4."},
]


def student(messages: list[dict[str, Any]]) -> str:
    return render_jinja_template([messages], chat_template=CHAT_TEMPLATE)[0][0]


def llamafactory_registration() -> dict[str, Any]:
    """The keyword arguments of the snippet's ``register_template`` call."""
    seen: dict[str, Any] = {}

    class StringFormatter:
        def __init__(self, slots: list[str]) -> None:
            self.slots = slots

    scope = {"register_template": lambda **kw: seen.update(kw), "StringFormatter": StringFormatter,
             "get_mm_plugin": lambda name, image_token: {"name": name, "image_token": image_token}}
    exec(compile(LLAMAFACTORY_TEMPLATE, "llamafactory_template.py", "exec"), scope)
    return seen


def llamafactory_render(reg: dict[str, Any], messages: list[dict[str, Any]]) -> str:
    def fill(key: str, content: str) -> str:
        return "".join(reg[key].slots).replace("{{content}}", content)

    system = [m["content"] for m in messages if m["role"] == "system"]
    text = fill("format_system", system[0]) if system else ""
    for m in messages:
        if m["role"] != "system":
            text += fill("format_user" if m["role"] == "user" else "format_assistant", m["content"])
    return text


@pytest.mark.parametrize("messages", [DIALOGUE, DIALOGUE[1:]], ids=["with system", "without system"])
def test_the_llamafactory_template_writes_what_the_student_reads(messages: list[dict[str, Any]]) -> None:
    reg = llamafactory_registration()
    assert reg["name"] == TEMPLATE_NAME and reg["stop_words"] == ["<|im_end|>"]
    assert reg["mm_plugin"] == {"name": "llava", "image_token": "<image>"}
    assert llamafactory_render(reg, messages) == student(messages)


def test_the_swift_plugin_registers_chatml_with_the_image_tag_kept() -> None:
    registered: list[Any] = []

    class LlavaHfTemplate:
        def replace_tag(self, media_type: str, index: int, inputs: Any) -> list[str]:
            return ["<image>\n"]

    class ChatmlTemplateMeta:
        def __init__(self, name: str, template_cls: type) -> None:
            self.name, self.template_cls = name, template_cls

    modules = {"swift": types.ModuleType("swift"), "swift.template": types.ModuleType("swift.template"),
               "swift.template.templates": types.ModuleType("swift.template.templates"),
               "swift.template.templates.llava": types.ModuleType("swift.template.templates.llava"),
               "swift.template.templates.utils": types.ModuleType("swift.template.templates.utils")}
    modules["swift.template"].register_template = registered.append  # type: ignore[attr-defined]
    modules["swift.template.templates.llava"].LlavaHfTemplate = LlavaHfTemplate  # type: ignore[attr-defined]
    modules["swift.template.templates.utils"].ChatmlTemplateMeta = ChatmlTemplateMeta  # type: ignore[attr-defined]
    with pytest.MonkeyPatch.context() as mp:
        for name, module in modules.items():
            mp.setitem(sys.modules, name, module)
        exec(compile(SWIFT_TEMPLATE, "swift_template.py", "exec"), {})
    (meta,) = registered
    assert meta.name == TEMPLATE_NAME and issubclass(meta.template_cls, LlavaHfTemplate)
    # the student's prompt has "<image>" straight before the question, no newline
    assert meta.template_cls().replace_tag("image", 0, None) == ["<image>"]
    assert "<image>How many" in student(DIALOGUE)


@pytest.mark.parametrize("exporter, name", [(SwiftExporter, "swift_template.py"),
                                            (ShareGPTExporter, "llamafactory_template.py")])
def test_exports_ship_their_template(exporter: type, name: str, tmp_path: Path) -> None:
    image = tmp_path / "table.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(image)
    rec = Record(id="r1", format="rr", messages=DIALOGUE, images=[str(image)], meta={"source": "t"})
    written = exporter({}).export({"rr": [rec]}, tmp_path / "out", {})
    shipped = Path(next(v for k, v in written.items() if v.endswith(name)))
    assert shipped.parent == tmp_path / "out" and TEMPLATE_NAME in shipped.read_text(encoding="utf-8")
    compile(shipped.read_text(encoding="utf-8"), name, "exec")
