"""Markdown previews of samples for asset metadata (small thumbnails inline)."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable

import polars as pl
from PIL import Image


def thumbnail_data_uri(data: bytes, side: int = 240) -> str:
    """A small PNG of an image as a data URI, so the preview shows it without a file server."""
    img = Image.open(io.BytesIO(data))
    img.thumbnail((side, side))
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _cell(text: object, limit: int = 160) -> str:
    s = " ".join(str(text if text is not None else "").split())
    s = s if len(s) <= limit else s[: limit - 1] + "…"
    return s.replace("|", "\\|")


def samples_markdown(df: pl.DataFrame, read_image: Callable[[str], bytes] | None, n: int = 5) -> str:
    """A markdown table of the first ``n`` samples: id, question, answer, style, image."""
    lines = ["| sample | question | answer | style | image |", "|---|---|---|---|---|"]
    for row in df.head(n).iter_rows(named=True):
        image = ""
        if row["images"] and read_image is not None:
            try:
                image = f"![image]({thumbnail_data_uri(read_image(row['images'][0]['uri']))})"
            except Exception as exc:  # a preview never fails the asset
                image = f"(preview failed: {type(exc).__name__})"
        lines.append(
            f"| `{row['sample_id']}` {row['source']}/{row['subset']} | {_cell(row['question'])} "
            f"| {_cell(row['answer'], 60)} | {_cell(row['style'], 60)} | {image} |"
        )
    return "\n".join(lines)


def counts_markdown(df: pl.DataFrame, by: list[str], title: str) -> str:
    """A markdown table of row counts grouped by ``by``."""
    if df.is_empty():
        return f"**{title}**: none"
    counts = df.group_by(by).len().sort(by)
    head = "| " + " | ".join(by) + " | rows |"
    lines = [f"**{title}**", "", head, "|" + "---|" * (len(by) + 1)]
    for row in counts.iter_rows():
        lines.append("| " + " | ".join(_cell(v, 200) for v in row) + " |")
    return "\n".join(lines)
