"""Image validation: decodable, within size limits, no decompression bombs, no path escape."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

FORMAT_EXT = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp",
              "TIFF": ".tif"}


class ImageError(ValueError):
    """An image that cannot be used; ``reason`` is a short category, str() the detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int = 50_000_000
    max_side: int = 16_384
    min_side: int = 1


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    format: str

    @property
    def ext(self) -> str:
        return FORMAT_EXT.get(self.format, "")


def resolve_image_path(root: Path | None, name: str) -> Path:
    """Resolve ``name`` under ``root``; refuse paths that leave it (``../``, absolute, links)."""
    if root is None:
        raise ImageError("bad_image_path", f"image path {name!r} given but the source has no image root")
    root = root.resolve()
    candidate = (root / name).resolve()
    if not candidate.is_relative_to(root):
        raise ImageError("image_path_escape", f"image path {name!r} escapes the dataset root {root}")
    if not candidate.is_file():
        raise ImageError("missing_image", f"image file not found: {candidate}")
    return candidate


def inspect_image(data: bytes, limits: ImageLimits) -> ImageInfo:
    """Check that ``data`` is a whole, decodable image within ``limits``.

    Size is read from the header first, so a huge image is refused before it is decoded.
    """
    if not data:
        raise ImageError("corrupt_image", "image file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("image_too_large", f"decompression bomb refused: {exc}") from None
    except Exception as exc:
        raise ImageError("corrupt_image", f"not a decodable image: {type(exc).__name__}: {exc}") from None
    _check_size(width, height, limits)
    try:
        img.load()  # full decode: catches truncated and corrupt pixel data
    except Exception as exc:
        raise ImageError("corrupt_image", f"image data is corrupt or truncated: {exc}") from None
    return ImageInfo(width, height, img.format or "")


def _check_size(width: int, height: int, limits: ImageLimits) -> None:
    if width * height > limits.max_pixels or max(width, height) > limits.max_side:
        raise ImageError(
            "image_too_large",
            f"image is {width}x{height} ({width * height / 1e6:.1f} Mpx); limits are "
            f"{limits.max_pixels / 1e6:.1f} Mpx and {limits.max_side} px a side "
            "(possible decompression bomb)",
        )
    if min(width, height) < limits.min_side:
        raise ImageError("image_too_small", f"image is {width}x{height}; minimum side is {limits.min_side} px")
