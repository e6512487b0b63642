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

The trainer also runs its students for the host (:mod:`mmat_plugins._hf_student` does the
work): it builds the offline student (:meth:`HFLoRATrainer.base_student`), encodes records
for the export's pre-flight exactly as training will (:meth:`~HFLoRATrainer.encoder`), and
answers evaluation prompts with the base or the tuned model (:meth:`~HFLoRATrainer.responder`).
"""

from __future__ import annotations

import json
import logging
import math
import random
import resource
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mmat_assets.contracts import Availability, Responder, Trainer
from mmat_assets.hookspecs import Register, hookimpl
from mmat_assets.toolkit.export import Record
from mmat_assets.toolkit.images import file_sha256

from . import _hf_student as st
from ._hf_student import IGNORE

log = logging.getLogger("mmat.train")

TRAIN_FILE = "train.jsonl"
ADAPTER_DIR = "adapter"
META_FILE = "training_meta.json"


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
                                    "(default torch's choice); on a shared CPU, 1 can be many times faster.")
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


class HFLoRATrainer(Trainer):
    """LoRA SFT of a student VLM (LLaVA family, SmolVLM/Idefics3, ...) with a plain torch loop."""

    name = "hf_lora"
    version = "0.1.0"
    description = "LoRA fine-tuning with transformers + peft; loss on assistant turns only."
    Options = HFLoRAOptions
    options: HFLoRAOptions

    def availability(self) -> Availability:
        import importlib.util

        missing = [m for m in ("torch", "transformers", "peft") if importlib.util.find_spec(m) is None]
        if missing:
            return Availability(False, f"missing packages: {', '.join(missing)} (pip install -r requirements/train.txt)")
        return Availability(True)

    # -------------------------------------------------------------------- students

    def base_student(self, student: str, out_dir: Path) -> Path | None:
        """Build the offline student (``student == "offline"``) into ``out_dir`` once; any
        other student is a model folder or hub id used as it is (None)."""
        if student != st.OFFLINE:
            return None
        return st.build_offline_student(out_dir, self.options.image_size, self.options.seed)

    def encoder(self, student: str, max_length: int) -> Callable[[Record], Mapping[str, Any]] | None:
        """Encode a record through ``student``'s chat template and processor (no weights
        loaded), with the diagnostics :func:`~mmat_plugins._hf_student.encode_record` gives."""
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(student, trust_remote_code=self.options.trust_remote_code)

        def encode(rec: Record) -> Mapping[str, Any]:
            return st.encode_record(processor, {"messages": rec.messages, "images": rec.images}, max_length)

        return encode

    def responder(self, student: str, checkpoint: Path | None, max_new_tokens: int) -> Responder:
        """Greedy replies of ``student``, or of it with the LoRA adapter at ``checkpoint``."""
        if checkpoint is not None:
            model, processor = st.load_tuned_student(checkpoint)
        else:
            model, processor = st.load_student(student)
        model.eval()
        return lambda messages, images: st.generate(model, processor, messages, images,
                                                    max_new_tokens=max_new_tokens)

    # ----------------------------------------------------------------------- train

    def train(self, export_dir: Path, out_dir: Path) -> dict[str, Any]:
        with torch_threads(self.options.cpu_threads):
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
        if self.options.student != st.OFFLINE:
            local = self.resolve_path(self.options.student)
            return str(local) if local.exists() else self.options.student  # else a hub id
        cache = self.resolve_path(self.options.cache_dir) if self.options.cache_dir else None
        folder = st.offline_student_dir(cache, self.options.image_size, self.options.seed)
        began = time.perf_counter()
        st.build_offline_student(folder, self.options.image_size, self.options.seed)
        log.info("offline student ready at %s in %.1fs", folder, time.perf_counter() - began)
        return str(folder)

    def _load(self, student: str, device: str) -> tuple[Any, Any]:
        import torch
        from peft import LoraConfig, get_peft_model

        # With bf16 the frozen base is held in bf16 (half the memory); peft keeps the LoRA
        # weights in float32, and autocast runs the matmuls in bf16.
        dtype = torch.bfloat16 if self._use_bf16(device) else None
        model, processor = st.load_student(student, trust_remote_code=self.options.trust_remote_code, dtype=dtype)
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
            enc = st.encode_record(processor, record, self.options.max_length, image_root=root)
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


class RecordError(ValueError):
    """A training record the trainer refuses, named by its line in ``train.jsonl``."""


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
    keys = {k for e in encoded for k, v in e.items() if isinstance(v, torch.Tensor)} - set(fill) - set(st.DIAGNOSTIC_KEYS)
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


@hookimpl
def register_trainers(register: Register) -> None:
    register(HFLoRATrainer)
