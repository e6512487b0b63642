"""LLaVA / ShareGPT ``conversations`` JSON, with LLaMA-Factory's ``dataset_info.json``.

Tag-style assistant turns are ``gpt``; user turns that carry tool results are
``observation`` (LLaMA-Factory's role for environment feedback); other user turns are
``human``. Every path is relative to the export folder, so it can be copied anywhere: pass
the folder as LLaMA-Factory's ``dataset_dir`` (its ``media_dir`` defaults to it; set
``media_dir`` to the folder when ``dataset_dir`` points elsewhere).

LLaMA-Factory's ``llava`` template is Vicuna-style (``USER: ... ASSISTANT:``), right for
llava-hf 1.5 models; no template it ships pairs ChatML with the llava image plugin, and it
takes new templates only in its source. The folder holds ``llamafactory_template.py``, the
``register_template`` call for ``mmat_chatml_llava`` (ChatML turns, stop at ``<|im_end|>``,
the llava plugin) to add to ``src/llamafactory/data/template.py``, for a ChatML
LLaVA-architecture student such as the offline one (``template: mmat_chatml_llava``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmat_assets.contracts import Exporter
from mmat_assets.hookspecs import Register, hookimpl
from mmat_assets.protocol import CONTINUE, REFLECT
from mmat_assets.toolkit.export import Record, write_indexed_formats

#: The LLaMA-Factory template that renders a conversation as the offline student's ChatML does.
TEMPLATE_NAME = "mmat_chatml_llava"
#: Its registration, for ``src/llamafactory/data/template.py`` (where the names it uses are
#: already imported).
LLAMAFACTORY_TEMPLATE = f'''# LLaMA-Factory template {TEMPLATE_NAME!r}: ChatML turns with the llava image plugin, for
# LLaVA-architecture students whose language model speaks ChatML (mmat's offline student).
# Add it to src/llamafactory/data/template.py, then train with `template: {TEMPLATE_NAME}`.
register_template(
    name={TEMPLATE_NAME!r},
    format_user=StringFormatter(slots=["<|im_start|>user\\n{{{{content}}}}<|im_end|>\\n<|im_start|>assistant\\n"]),
    format_assistant=StringFormatter(slots=["{{{{content}}}}<|im_end|>\\n"]),
    format_system=StringFormatter(slots=["<|im_start|>system\\n{{{{content}}}}<|im_end|>\\n"]),
    stop_words=["<|im_end|>"],
    mm_plugin=get_mm_plugin(name="llava", image_token="<image>"),
)
'''

#: How LLaMA-Factory reads the conversations (its ``dataset_info.json`` entry, less the file).
DATASET_INFO = {
    "columns": {"messages": "conversations", "system": "system", "images": "images"},
    "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human",
             "assistant_tag": "gpt", "observation_tag": "observation"},
}


def _role(message: Mapping[str, str]) -> str:
    if message["role"] == "assistant":
        return "gpt"
    feedback = message["content"].endswith((CONTINUE, REFLECT))
    return "observation" if feedback else "human"


def conversation(rec: Record, images: Mapping[str, str]) -> dict[str, Any]:
    system = next((m["content"] for m in rec.messages if m["role"] == "system"), "")
    turns = [{"from": _role(m), "value": m["content"]} for m in rec.messages if m["role"] != "system"]
    return {"id": rec.id, "conversations": turns, "system": system, "images": [images[p] for p in rec.images]}


class ShareGPTExporter(Exporter):
    name = "sharegpt"
    version = "1.1.0"  # 1.1: ships llamafactory_template.py
    description = "ShareGPT/LLaVA conversations JSON plus LLaMA-Factory dataset_info.json."

    def export(self, records: Mapping[str, list[Record]], out_dir: Path, context: Mapping[str, Any]) -> dict[str, Any]:
        out_dir.mkdir(parents=True, exist_ok=True)

        def write(fmt: str, recs: list[Record], images: Mapping[str, str]) -> tuple[Path, dict[str, Any]]:
            path = out_dir / f"{fmt}.json"
            path.write_text(json.dumps([conversation(r, images) for r in recs], ensure_ascii=False, indent=1),
                            encoding="utf-8")
            return path, {"file_name": path.name, "formatting": "sharegpt", **DATASET_INFO}

        written = write_indexed_formats(records, out_dir, write, out_dir / "dataset_info.json")
        template = out_dir / "llamafactory_template.py"
        template.write_text(LLAMAFACTORY_TEMPLATE, encoding="utf-8")
        return {**written, "llamafactory_template": str(template)}


@hookimpl
def register_exporters(register: Register) -> None:
    register(ShareGPTExporter)
