"""InternVL fine-tuning JSONL plus its meta JSON (``root`` + ``annotation`` per dataset).

The system prompt is left out: InternVL's template brings its own, and its trainer adds a
literal ``<image>`` to a leading system turn. The ``<image>`` tag sits on its own line
before the first question, as InternVL's data expects.

The meta JSON is relocatable: ``root`` is ``.`` and ``annotation`` a file name, both
relative to the meta file's own folder. InternVL opens both from its working directory, so
train from inside the export folder, or set ``root`` and ``annotation`` to where the folder
was copied.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmat_assets.contracts import Exporter
from mmat_assets.hookspecs import Register, hookimpl
from mmat_assets.toolkit.export import IMAGE_TAG, Record, write_indexed_formats, write_jsonl


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
    version = "2.0.0"
    description = "InternVL JSONL (image + conversations) with a meta JSON naming root and annotation (relative)."

    def export(self, records: Mapping[str, list[Record]], out_dir: Path, context: Mapping[str, Any]) -> dict[str, Any]:
        def write(fmt: str, recs: list[Record], images: Mapping[str, str]) -> tuple[Path, dict[str, Any]]:
            path = out_dir / f"{fmt}.jsonl"
            n = write_jsonl(path, (internvl_row(i, r, images) for i, r in enumerate(recs)))
            return path, {"root": ".", "annotation": path.name, "data_augment": False, "repeat_time": 1, "length": n}

        return write_indexed_formats(records, out_dir, write, out_dir / "meta.json")


@hookimpl
def register_exporters(register: Register) -> None:
    register(InternVLExporter)
