"""InternVL fine-tuning JSONL plus its meta JSON (``root`` + ``annotation`` per dataset).

The system prompt is left out: InternVL's template brings its own, and its trainer adds a
literal ``<image>`` to a leading system turn. The ``<image>`` tag sits on its own line
before the first question, as InternVL's data expects.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmat_assets.contracts import Exporter
from mmat_assets.engine.export import IMAGE_TAG, Record, copy_images, write_jsonl
from mmat_assets.hookspecs import Register, hookimpl


def internvl_row(n: int, rec: Record, images: Mapping[str, str]) -> dict[str, Any]:
    turns = []
    for m in rec.messages:
        if m["role"] == "system":
            continue
        value = m["content"]
        if IMAGE_TAG in value:
            value = IMAGE_TAG * value.count(IMAGE_TAG) + "\n" + value.replace(IMAGE_TAG, "")
        turns.append({"from": "gpt" if m["role"] == "assistant" else "human", "value": value})
    paths = [images[p] for p in rec.images]
    row: dict[str, Any] = {"id": n, "sample_id": rec.id, "conversations": turns}
    if paths:
        row["image"] = paths[0] if len(paths) == 1 else paths
    return row


class InternVLExporter(Exporter):
    name = "internvl"
    version = "1.0.0"
    description = "InternVL JSONL (image + conversations) with a meta JSON naming root and annotation."

    def export(self, records: Mapping[str, list[Record]], out_dir: Path, context: Mapping[str, Any]) -> dict[str, Any]:
        meta, written = {}, {}
        for fmt, recs in records.items():
            images = copy_images(recs, out_dir)
            path = out_dir / f"{fmt}.jsonl"
            n = write_jsonl(path, (internvl_row(i, r, images) for i, r in enumerate(recs)))
            meta[f"mmat_{fmt}"] = {"root": str(out_dir.resolve()), "annotation": str(path.resolve()),
                                   "data_augment": False, "repeat_time": 1, "length": n}
            written[fmt] = str(path)
        (out_dir / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        written["meta"] = str(out_dir / "meta.json")
        return written


@hookimpl
def register_exporters(register: Register) -> None:
    register(InternVLExporter)
