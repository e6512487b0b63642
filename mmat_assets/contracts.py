"""Behaviour of every plugin role: small ABCs, one abstract method each where possible.

Plugins subclass these and hand the *class* to the ``register`` callback of their hook
(:mod:`mmat_assets.hookspecs`). The host instantiates a class with the options the user
configured for it (validated by the class's ``Options`` pydantic model), so one class can
back several configured instances (two TabMWP splits, say).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

from pydantic import BaseModel, ConfigDict


class NoOptions(BaseModel):
    """Options of a component that takes none."""

    model_config = ConfigDict(extra="forbid")


class Availability(NamedTuple):
    """Whether a component can run on this machine, and if not, why."""

    ok: bool
    reason: str = ""


class Component(ABC):
    """What every plugin implementation has: a name, a version, options, availability."""

    name: ClassVar[str]
    version: ClassVar[str] = "0.1.0"
    description: ClassVar[str] = ""
    Options: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, options: BaseModel | Mapping[str, Any] | None = None) -> None:
        if isinstance(options, BaseModel):
            options = options.model_dump()
        self.options = self.Options.model_validate(dict(options or {}))
        #: Directory that relative paths in the options resolve against (the config's).
        self.base_dir: Path = Path.cwd()

    def resolve_path(self, path: str | Path) -> Path:
        """Resolve a path from the options against :attr:`base_dir`."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.base_dir / p).resolve()

    def availability(self) -> Availability:
        """Say whether this component can run here; override to probe dependencies."""
        return Availability(True)


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class ImageInput:
    """An image as a source names it: a path (relative to the source's image root) or bytes."""

    path: str | None = None
    data: bytes | None = None


@dataclass
class SourceRow:
    """One QA pair as read from a dataset, before the host normalises it."""

    row_id: str
    question: str
    answer: str
    images: list[ImageInput] = field(default_factory=list)
    subset: str = ""
    choices: list[str] = field(default_factory=list)
    rationale: str | None = None
    answer_type: str | None = None
    license: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BadRow:
    """A row the source could not parse; the host quarantines it with ``reason``."""

    row_id: str
    reason: str
    raw: str = ""


class Source(Component):
    """Reads one dataset family's public on-disk format."""

    #: Licence carried by rows that do not name their own.
    license: ClassVar[str] = "unknown"
    #: Family name recorded on every row (``tabmwp``, ``llava_cot``, ...).
    dataset: ClassVar[str] = ""

    def image_root(self) -> Path | None:
        """Directory that relative image paths resolve against; paths may not leave it."""
        return None

    def row_license(self) -> str:
        """Default licence of this configured source (options may override the class's)."""
        return str(getattr(self.options, "license", None) or self.license)

    @abstractmethod
    def read(self) -> Iterator[SourceRow | BadRow]:
        """Yield every row of the dataset, in a stable order."""


# ----------------------------------------------------------------------------- tools


@dataclass
class ToolResult:
    """What one tool call produced.

    ``text`` is what the dialogue shows (the paper's phrasing); ``data`` the structured
    result (boxes, scores, ...); ``error`` is set instead of raising when the call failed.
    """

    text: str
    data: dict[str, Any] = field(default_factory=dict)
    latency_s: float = 0.0
    error: str | None = None


class Tool(Component):
    """A vision operator the teacher can call by ``name``."""

    @abstractmethod
    def run(self, image: Path, args: Mapping[str, Any]) -> ToolResult:
        """Run on one local image file; return an error result rather than raise."""


# ------------------------------------------------------------------------ retrievers


@dataclass(frozen=True)
class Passage:
    """One retrieved text snippet."""

    text: str
    title: str = ""
    source: str = ""
    score: float = 0.0


class Retriever(Component):
    """Text search for the RAG side of a rationale."""

    @abstractmethod
    def search(self, query: str, k: int = 3) -> list[Passage]:
        """Return at most ``k`` passages, best first."""


# -------------------------------------------------------------------------- teachers


@dataclass
class TeacherRequest:
    """One request to a teacher.

    ``messages`` are OpenAI-style chat messages whose ``content`` is a string or a list of
    parts (``{"type": "text", "text": ...}`` / ``{"type": "image", "path": ..., "sha256": ...}``).
    ``json_schema`` asks for structured output where the back-end supports it. ``context``
    carries the structured facts (question, gold answer, gold rationale, tool results so
    far) for teachers that work from them rather than from the prompt. The request's hash
    (see :meth:`fingerprint`) keys the response cache, so every field that changes the
    answer belongs in it.
    """

    kind: str  # "step" | "judge" | "caption" | "score"
    messages: list[dict[str, Any]]
    prompt_version: str
    json_schema: dict[str, Any] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self, model: str) -> str:
        """sha256 of the whole request as sent to ``model``."""
        import hashlib
        import json

        body = {"model": model, "kind": self.kind, "messages": self.messages,
                "prompt_version": self.prompt_version, "json_schema": self.json_schema,
                "params": self.params, "context": self.context}
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class TeacherReply:
    """A teacher's answer to one request, with its cost."""

    content: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    model: str = ""
    attempts: int = 1
    latency_s: float = 0.0


class TeacherError(RuntimeError):
    """A request that failed for good; ``reason`` is a short category recorded on the row.

    Reasons: ``refusal``, ``unparseable``, ``rate_limited``, ``timeout``, ``http_error``,
    ``unsupported``. Teachers raise this (never a transport exception) once their retries
    are spent, so the engine can quarantine the row and carry on.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class Teacher(Component):
    """Writes rationale steps and answers judge prompts (SPEC §2.2, §2.4).

    ``model`` names what answers (it is part of every request's cache key);
    ``vision`` says whether it can look at images (captioning needs it).
    """

    model: str = ""
    vision: bool = False

    @abstractmethod
    def complete(self, request: TeacherRequest) -> TeacherReply:
        """Answer one request or raise :class:`TeacherError`."""

    async def acomplete(self, request: TeacherRequest) -> TeacherReply:
        """Async form; the default runs :meth:`complete` in a worker thread."""
        import asyncio

        return await asyncio.to_thread(self.complete, request)


class Judge(Component):
    """Scores a finished sample 0–1 with reasons (SPEC §2.6)."""

    @abstractmethod
    def score(self, sample: Mapping[str, Any]) -> tuple[float, str]:
        """Return ``(score, reasons)`` for one sample record."""


# ----------------------------------------------------------- exporters and training


class Exporter(Component):
    """Writes pre-flighted records in one fine-tuning framework's format."""

    @abstractmethod
    def export(self, records: Mapping[str, list[Any]], out_dir: Path, context: Mapping[str, Any]) -> dict[str, Any]:
        """Write ``records`` (``mmat_assets.engine.export.Record`` lists by format, ``rr`` and
        ``orr``) under ``out_dir``; ``context`` has what a dataset card needs (licences,
        teachers, tool versions, stage counts, system prompts). Return the paths written."""


class Trainer(Component):
    """Fine-tunes a student model on an export."""

    @abstractmethod
    def train(self, export_dir: Path, out_dir: Path) -> dict[str, Any]:
        """Train; write the checkpoint under ``out_dir``; return metrics and paths."""


@dataclass
class BenchmarkItem:
    """One evaluation question."""

    item_id: str
    question: str
    answers: list[str]
    image: ImageInput | None = None
    choices: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


class Benchmark(Component):
    """An evaluation set read from local files a user downloaded."""

    @abstractmethod
    def items(self) -> Iterator[BenchmarkItem]:
        """Yield every item of the benchmark."""

    def score(self, prediction: str, item: BenchmarkItem) -> float:
        """Score one prediction in [0, 1]; exact match unless overridden."""
        return float(prediction.strip().lower() in {a.strip().lower() for a in item.answers})
