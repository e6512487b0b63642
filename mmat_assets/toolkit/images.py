"""Opening and hashing images: what a tool or a teacher does with the file it is handed."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import IO, Any

#: Image modes that hold more than 8 bits per pixel (rescaled, not clipped, to 8 bits).
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I", "F")


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (images run large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def open_rgb(path: str | Path | IO[bytes], max_side: int | None = None) -> Any:
    """Decode any image a tool may meet into 8-bit RGB (a PIL image).

    16-bit and float greyscale are rescaled (a plain convert would clip them to white),
    transparency is flattened onto white (text drawn on a transparent background stays
    readable), and ``max_side`` bounds the size a detector sees. A truncated or undecodable
    file raises here, so the caller can report it as that image's error.
    """
    from PIL import Image

    with Image.open(path) as img:
        img.load()  # raises here, inside the tool, on truncated files
        img = _to_rgb(img)
    if max_side and max(img.size) > max_side:
        img.thumbnail((max_side, max_side))
    return img


def _to_rgb(img: Any) -> Any:
    import numpy as np
    from PIL import Image

    if img.mode in _WIDE_MODES:
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


__all__ = ["file_sha256", "open_rgb"]
