"""ms-swift ``messages`` + ``images`` JSONL (what the MMAT paper trained with).

Image paths are relative to the export folder (``images/<sha256>.png``), so the folder can
be copied anywhere. ms-swift opens an image path that exists from its working directory
and otherwise joins it to ``ROOT_IMAGE_DIR``: set ``ROOT_IMAGE_DIR`` to the export folder
(or train from inside it). Pass the JSONL by path (``--dataset /copy/rr.jsonl``): a name
that is not an existing file is taken for a hub dataset.

The folder also holds ``swift_template.py``, an ms-swift external plugin that registers the
template ``mmat_chatml_llava``: ChatML turns (as SmolLM2 and the offline student write them,
stopping at ``<|im_end|>``) with llava-hf's image handling. ms-swift's own ``llava1_5_hf``
template is Vicuna-style (``USER: ... ASSISTANT:`` ending in ``</s>``), right for llava-hf
1.5 models and wrong for a ChatML student. Train a ChatML LLaVA-architecture student with
``--model_type llava1_5_hf --template mmat_chatml_llava --external_plugins <folder>/swift_template.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmat_assets.contracts import Exporter
from mmat_assets.hookspecs import Register, hookimpl
from mmat_assets.toolkit.export import Record, write_formats, write_jsonl

#: Meta fields each line keeps, so a trained-on row can be traced to its source.
PROVENANCE = ("source", "source_row_id", "license")
#: The ms-swift template that renders a conversation as the offline student's ChatML does.
TEMPLATE_NAME = "mmat_chatml_llava"
#: An ms-swift external plugin (``--external_plugins``) registering :data:`TEMPLATE_NAME`:
#: ChatML turns, llava-hf's image expansion, and ``<image>`` kept as it is (llava-hf's
#: template adds a newline after it, which the student's ChatML does not have).
SWIFT_TEMPLATE = f'''"""ms-swift template {TEMPLATE_NAME!r}: ChatML turns with llava-hf image handling.

    swift sft --model_type llava1_5_hf --template {TEMPLATE_NAME} --external_plugins swift_template.py ...

Written by mmat's ms_swift exporter, for LLaVA-architecture students whose language model
speaks ChatML (the offline student: SmolLM2 with ``<image>`` placeholders).
"""
from swift.template import register_template
from swift.template.templates.llava import LlavaHfTemplate
from swift.template.templates.utils import ChatmlTemplateMeta


class ChatmlLlavaTemplate(LlavaHfTemplate):
    def replace_tag(self, media_type, index, inputs):
        assert media_type == "image", media_type
        return ["<image>"]


register_template(ChatmlTemplateMeta({TEMPLATE_NAME!r}, template_cls=ChatmlLlavaTemplate))
'''


class SwiftExporter(Exporter):
    name = "ms_swift"
    version = "2.1.0"  # 2.1: ships swift_template.py
    description = "ms-swift JSONL: {messages, images} per line, images relative to the folder (ROOT_IMAGE_DIR)."

    def export(self, records: Mapping[str, list[Record]], out_dir: Path, context: Mapping[str, Any]) -> dict[str, Any]:
        def write(fmt: str, recs: list[Record], images: Mapping[str, str]) -> Path:
            path = out_dir / f"{fmt}.jsonl"
            write_jsonl(path, (swift_row(r, images) for r in recs))
            return path

        written = write_formats(records, out_dir, write)
        template = out_dir / "swift_template.py"
        template.write_text(SWIFT_TEMPLATE, encoding="utf-8")
        return {**written, "swift_template": str(template)}


def swift_row(rec: Record, images: Mapping[str, str]) -> dict[str, Any]:
    """One ms-swift line: messages, images relative to the folder, and the row's provenance."""
    return {"messages": rec.messages, "images": [images[p] for p in rec.images], "id": rec.id,
            **{k: v for k, v in rec.meta.items() if k in PROVENANCE}}


@hookimpl
def register_exporters(register: Register) -> None:
    register(SwiftExporter)
