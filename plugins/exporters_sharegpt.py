"""LLaVA / ShareGPT ``conversations`` JSON, with LLaMA-Factory's ``dataset_info.json``.

Tag-style assistant turns are ``gpt``; user turns that carry tool results are
``observation`` (LLaMA-Factory's role for environment feedback); other user turns are
``human``. Image paths are relative to the export folder: pass it as ``media_dir``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmat_assets import protocol
from mmat_assets.contracts import Exporter
from mmat_assets.engine.export import Record, copy_images
from mmat_assets.hookspecs import Register, hookimpl


def _role(message: Mapping[str, str]) -> str:
    if message["role"] == "assistant":
        return "gpt"
    feedback = message["content"].endswith((protocol.CONTINUE, protocol.REFLECT))
    return "observation" if feedback else "human"


def conversation(rec: Record, images: Mapping[str, str]) -> dict[str, Any]:
    system = next((m["content"] for m in rec.messages if m["role"] == "system"), "")
    turns = [{"from": _role(m), "value": m["content"]} for m in rec.messages if m["role"] != "system"]
    return {"id": rec.id, "conversations": turns, "system": system, "images": [images[p] for p in rec.images]}


class ShareGPTExporter(Exporter):
    name = "sharegpt"
    version = "1.0.0"
    description = "ShareGPT/LLaVA conversations JSON plus LLaMA-Factory dataset_info.json."

    def export(self, records: Mapping[str, list[Record]], out_dir: Path, context: Mapping[str, Any]) -> dict[str, Any]:
        out_dir.mkdir(parents=True, exist_ok=True)
        info, written = {}, {}
        for fmt, recs in records.items():
            images = copy_images(recs, out_dir)
            path = out_dir / f"{fmt}.json"
            path.write_text(json.dumps([conversation(r, images) for r in recs], ensure_ascii=False, indent=1),
                            encoding="utf-8")
            written[fmt] = str(path)
            info[f"mmat_{fmt}"] = {
                "file_name": path.name, "formatting": "sharegpt",
                "columns": {"messages": "conversations", "system": "system", "images": "images"},
                "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human",
                         "assistant_tag": "gpt", "observation_tag": "observation"},
            }
        (out_dir / "dataset_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
        written["dataset_info"] = str(out_dir / "dataset_info.json")
        return written


@hookimpl
def register_exporters(register: Register) -> None:
    register(ShareGPTExporter)
