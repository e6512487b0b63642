"""Shared helpers for the tool, cache and retriever tests (imported explicitly)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from mmat_assets.plugins import DEFAULT_PLUGINS, Registry, load_registry
from tests.conftest import TABMWP

# the built-in tool and retriever plugins, as the host lists them
TOOL_PLUGINS = tuple(m for m in DEFAULT_PLUGINS if m.split(".")[-1].startswith(("tools_", "retrievers_")))


def tool_registry() -> Registry:
    return load_registry(builtins=TOOL_PLUGINS, entry_points=False)


def tabmwp_problems() -> dict[str, dict]:
    return json.loads((TABMWP / "problems.json").read_text(encoding="utf-8"))


def tabmwp_image(pid: str) -> Path:
    return TABMWP / "tables" / f"{pid}.png"


def numeric_cells(table: str) -> list[str]:
    """Cells of a TabMWP ``table`` text that are one number ('15', '$3.50', '1,200')."""
    cells = [c.strip() for row in table.splitlines() for c in row.split("|")]
    return [norm_number(c) for c in cells if re.fullmatch(r"[$]?-?[\d,]*\.?\d+", c)]


def norm_number(token: str) -> str:
    return token.strip().lstrip("$").replace(",", "")


def text_tokens(text: str) -> set[str]:
    return {norm_number(t).rstrip(".") for t in re.split(r"[\s|]+", text) if t}


def render_text(text: str, size: tuple[int, int] = (480, 140)) -> Image.Image:
    """Black text on white, large enough for OCR."""
    img = Image.new("L", size, 255)
    ImageDraw.Draw(img).text((20, 30), text, fill=0, font=ImageFont.load_default(size=48))
    return img


def write_bad_images(out: Path) -> dict[str, Path]:
    """Inputs a tool must survive: truncated, 1x1, 16-bit grey with text, RGBA with text."""
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    render_text("42").convert("RGB").save(buf, "PNG")
    paths = {name: out / f"{name}.png" for name in ("truncated", "tiny", "grey16", "rgba")}
    paths["truncated"].write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    Image.new("RGB", (1, 1), (200, 10, 10)).save(paths["tiny"])
    grey = (np.asarray(render_text("4096"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(grey).save(paths["grey16"])  # mode I;16: a plain convert clips it white
    alpha = 255 - np.asarray(render_text("1234"), dtype=np.uint8)  # text opaque, rest clear
    rgba = np.zeros(alpha.shape + (4,), dtype=np.uint8)
    rgba[..., 3] = alpha
    Image.fromarray(rgba, "RGBA").save(paths["rgba"])
    paths["missing"] = out / "does-not-exist.png"
    return paths


@pytest.fixture(scope="session")
def bad_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_bad_images(tmp_path_factory.mktemp("bad_images"))


@pytest.fixture(scope="session")
def astronaut_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = pytest.importorskip("skimage.data")
    path = tmp_path_factory.mktemp("photos") / "astronaut.png"
    Image.fromarray(data.astronaut()).save(path)
    return path


def make_tiny_owl(out: Path) -> Path:
    """A tiny random-weight OWLv2 detector with a processor, built offline.

    The tokenizer is a CLIP byte-level BPE over the 256 byte symbols (no merges), so no
    vocabulary has to be downloaded; the model is the real OWLv2 architecture, tiny.
    """
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer, Owlv2Config, Owlv2ForObjectDetection, Owlv2Processor
    from transformers.models.owlv2 import Owlv2ImageProcessorPil

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=16,
                bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=64, patch_size=16)
    model = Owlv2ForObjectDetection(Owlv2Config(text_config=text, vision_config=vision,
                                                projection_dim=32)).eval()
    image_processor = Owlv2ImageProcessorPil(size={"height": 64, "width": 64})
    processor = Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_owl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    return make_tiny_owl(tmp_path_factory.mktemp("tiny_owl"))
