"""An example third-party plugin: a source of generated colour-swatch questions and a tool."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import BaseModel, Field

from mmat_assets.contracts import ImageInput, Source, SourceRow, Tool, ToolResult
from mmat_assets.hookspecs import hookimpl

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220)}


class SwatchOptions(BaseModel):
    repeat: int = Field(default=1, description="How many questions per colour.")


class SwatchSource(Source[SwatchOptions]):
    """One question per colour swatch image: 'What colour is this square?'."""

    name = "colour_swatches"
    dataset = "swatches"
    version = "0.3.1"
    license = "CC0-1.0"
    description = "Generated colour swatches."

    def read(self) -> Iterator[SourceRow]:
        for colour, rgb in COLOURS.items():
            buf = io.BytesIO()
            Image.new("RGB", (32, 32), rgb).save(buf, format="PNG")
            for k in range(self.options.repeat):
                yield SourceRow(row_id=f"{colour}-{k}", question=f"What colour is this square? ({k})",
                                answer=colour, images=[ImageInput(data=buf.getvalue())], subset="swatch")


class MeanColourTool(Tool):
    """Reports the mean colour of the image."""

    name = "mean_colour"
    version = "0.3.1"  # part of the cache key: bump it when the results change
    description = "Returns the mean RGB colour of the image."
    #: how a thought claims this tool's output; reflection checks the tool ran before it
    claim_patterns = (r"\bthe mean colou?r is\b",)

    def run(self, image: Path, args: Mapping[str, Any]) -> ToolResult:
        start = time.perf_counter()
        img = Image.open(image).convert("RGB").resize((1, 1))
        rgb = img.getpixel((0, 0))
        return ToolResult(f"The mean colour is {rgb}.", {"rgb": list(rgb)}, time.perf_counter() - start)


@hookimpl
def register_sources(register: Any) -> None:
    register(SwatchSource)


@hookimpl
def register_tools(register: Any) -> None:
    register(MeanColourTool)
