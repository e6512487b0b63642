"""ms-swift ``messages`` + ``images`` JSONL (what the MMAT paper trained with).

Image paths are absolute: ms-swift resolves a relative path against its working directory
and takes a missing one for a hub dataset name (and hangs trying to fetch it).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmat_assets.contracts import Exporter
from mmat_assets.engine.export import Record, copy_images, write_jsonl
from mmat_assets.hookspecs import Register, hookimpl


class SwiftExporter(Exporter):
    name = "ms_swift"
    version = "1.0.0"
    description = "ms-swift JSONL: {messages, images} per line, images by absolute path."

    def export(self, records: Mapping[str, list[Record]], out_dir: Path, context: Mapping[str, Any]) -> dict[str, Any]:
        written = {}
        for fmt, recs in records.items():
            images = copy_images(recs, out_dir)
            rows = ({"messages": r.messages, "images": [str((out_dir / images[p]).resolve()) for p in r.images],
                     "id": r.id, **{k: v for k, v in r.meta.items() if k in ("source", "source_row_id", "license")}}
                    for r in recs)
            path = out_dir / f"{fmt}.jsonl"
            write_jsonl(path, rows)
            written[fmt] = str(path)
        return written


@hookimpl
def register_exporters(register: Register) -> None:
    register(SwiftExporter)
