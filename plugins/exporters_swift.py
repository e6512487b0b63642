"""ms-swift ``messages`` + ``images`` JSONL (what the MMAT paper trained with).

Image paths are relative to the export folder (``images/<sha256>.png``), so the folder can
be copied anywhere. ms-swift opens an image path that exists from its working directory
and otherwise joins it to ``ROOT_IMAGE_DIR``: set ``ROOT_IMAGE_DIR`` to the export folder
(or train from inside it). Pass the JSONL by path (``--dataset /copy/rr.jsonl``): a name
that is not an existing file is taken for a hub dataset.
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


class SwiftExporter(Exporter):
    name = "ms_swift"
    version = "2.0.0"
    description = "ms-swift JSONL: {messages, images} per line, images relative to the folder (ROOT_IMAGE_DIR)."

    def export(self, records: Mapping[str, list[Record]], out_dir: Path, context: Mapping[str, Any]) -> dict[str, Any]:
        def write(fmt: str, recs: list[Record], images: Mapping[str, str]) -> Path:
            path = out_dir / f"{fmt}.jsonl"
            write_jsonl(path, (swift_row(r, images) for r in recs))
            return path

        return write_formats(records, out_dir, write)


def swift_row(rec: Record, images: Mapping[str, str]) -> dict[str, Any]:
    """One ms-swift line: messages, images relative to the folder, and the row's provenance."""
    return {"messages": rec.messages, "images": [images[p] for p in rec.images], "id": rec.id,
            **{k: v for k, v in rec.meta.items() if k in PROVENANCE}}


@hookimpl
def register_exporters(register: Register) -> None:
    register(SwiftExporter)
