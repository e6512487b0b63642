"""Behaviour of every plugin role: small ABCs, one abstract method each where possible.

Plugins subclass these and hand the *class* to the ``register`` callback of their hook
(:mod:`mmat_assets.hookspecs`). The host instantiates a class with the options the user
configured for it (validated by the class's ``Options`` pydantic model), so one class can
back several configured instances (two TabMWP splits, say).

Every method the host calls is declared here: abstract where a plugin must implement it,
with a documented do-nothing default where it is optional. A plugin that implements only
its base class's abstract methods works in a build. Class attributes (``probe_args``,
``claim_patterns``, ``ground_truth_meta``, ``request_kinds``...) are how a plugin tells the
host what it needs to know about it: the host never names a plugin.

Options: the role bases are generic in their options model. ``class MyTool(Tool[MyOptions])``
is all a plugin writes: ``Options`` is taken from the type argument (see
:meth:`Component.__init_subclass__`), and ``self.options.x`` type-checks. A bare ``Tool``
takes no options; an explicit ``Options = ...`` in the class body still wins.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, NamedTuple, TypedDict, TypeVar, cast

from pydantic import BaseModel, ConfigDict


class NoOptions(BaseModel):
    """Options of a component that takes none."""

    model_config = ConfigDict(extra="forbid")


class Availability(NamedTuple):
    """Whether a component can run on this machine, and if not, why."""

    ok: bool
    reason: str = ""


OptionsT = TypeVar("OptionsT", bound=BaseModel)


class Component(ABC, Generic[OptionsT]):
    """What every plugin implementation has: a name, a version, options, availability.

    ``version`` is part of the cache key of everything the component produces (tool
    results, teacher answers) and of the code version of the assets that use it: bump it
    whenever the component's results change, and only then. ``prompt_version``, where a
    component writes prompts, is part of the code versions the same way.
    """

    name: ClassVar[str]
    version: ClassVar[str] = "0.1.0"
    description: ClassVar[str] = ""
    prompt_version: ClassVar[str] = ""
    #: The options model, validated from the component's ``options`` in ``mmat.yaml``: the
    #: class's type argument (``Tool[MyOptions]``) unless the class body sets it.
    Options: type[OptionsT] = NoOptions  # type: ignore[assignment]  # the default takes no options
    options: OptionsT
    #: Directory that relative paths in the options resolve against (the config file's).
    #: The registry sets it before ``__init__`` runs (:meth:`Registry.create
    #: <mmat_assets.plugins.Registry.create>`), so an ``__init__`` may already resolve paths;
    #: a component built directly gets the working directory.
    base_dir: Path

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Take ``Options`` from the options type the class names in its bases, so that the
        type is written once (``class MyTool(Tool[MyOptions])``)."""
        super().__init_subclass__(**kwargs)
        if "Options" in vars(cls):
            return
        for base in vars(cls).get("__orig_bases__", ()):
            args = [a for a in getattr(base, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
            if args:
                cls.Options = args[0]  # type: ignore[assignment]  # the argument is this class's OptionsT
                return

    def __init__(self, options: BaseModel | Mapping[str, Any] | None = None) -> None:
        if isinstance(options, BaseModel):
            options = options.model_dump()
        self.options = self.Options.model_validate(dict(options or {}))
        if "base_dir" not in vars(self):  # not built by the registry
            self.base_dir = Path.cwd()

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


class Source(Component[OptionsT]):
    """Reads one dataset family's public on-disk format."""

    #: Licence carried by rows that do not name their own.
    license: ClassVar[str] = "unknown"
    #: Family name recorded on every row (``the_cauldron``...); empty: the source's ``name``.
    dataset: ClassVar[str] = ""
    #: ``meta`` fields whose text is what the image shows (TabMWP's ``table``). Reflection
    #: reads them as ground truth: a number found there that a thought uses must have come
    #: back from a tool, or been computed, however small it is. Empty: nothing is read.
    ground_truth_meta: ClassVar[tuple[str, ...]] = ()

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


#: The verbs with which a thought claims a tool's output ("OCR reads", "the detector
#: found"), for tools' :attr:`Tool.claim_patterns`; not ones that merely plan a call.
CLAIM_VERBS = (r"(?:reads|read|shows|showed|gives|gave|returned|returns|found|finds|says|said|"
               r"reports|reported|results?)")


class Tool(Component[OptionsT]):
    """A vision operator the teacher can call by ``name``.

    The ``description`` is what teachers and the RR/ORR system prompts say the tool does,
    so write it for a model: what it returns, and when to use it. It is part of the prompts,
    and with them of the cache keys and code versions.
    """

    #: Arguments passed when the ``tools/<name>`` asset probes the tool on small sample
    #: images (a text image, a photo), for tools that need some (object names to find).
    probe_args: ClassVar[Mapping[str, Any]] = {}
    #: Regular expressions, matched case-insensitively, that spot a thought claiming this
    #: tool's output, e.g. ``rf"\bOCR {CLAIM_VERBS}\b"``. Reflection flags such a claim as
    #: unsupported when the tool was not run before it. Empty: claims are not checked.
    claim_patterns: ClassVar[tuple[str, ...]] = ()

    def attach_teachers(self, teachers: Mapping[str, Teacher[Any]]) -> None:
        """Receive the configured teachers by name, before :meth:`availability` is asked;
        for tools that ask a teacher (captions). The default ignores them."""

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


class Retriever(Component[OptionsT]):
    """Text search for the RAG side of a rationale."""

    def build(self, workdir: Path) -> dict[str, Any]:
        """Build the search index under ``workdir`` (the ``retrievers/<name>`` asset calls it;
        an unchanged corpus may reuse what is there) and return facts about it for the
        asset's metadata and data version (``rows``, ``build_s``, ``fingerprint``,
        ``reused``...). The default builds nothing and returns ``{}``: a remote search."""
        return {}

    def attach_index(self, workdir: Path) -> None:
        """Point the retriever at the index :meth:`build` wrote under ``workdir``, before a
        stage searches. The default does nothing."""

    @abstractmethod
    def search(self, query: str, k: int = 3) -> list[Passage]:
        """Return at most ``k`` passages, best first."""


# -------------------------------------------------------------------------- teachers


class ResultContext(TypedDict):
    """What one tool run or search of an earlier step returned."""

    tool: str  #: the operator name, or ``"rag"`` for a search
    text: str  #: the result text the dialogue shows


class StepSoFar(TypedDict):
    """One step the teacher already took, with what came back."""

    thought: str
    operators: list[str]  #: as written: ``ocr``, ``label_bbox[cat|dog]``
    rag: str | None  #: the search query, None when it searched nothing
    results: list[ResultContext]


class StepContext(TypedDict):
    """The structured facts behind a ``step`` request, for teachers that work from facts
    rather than from the prompt (a teacher with no model). The messages say the same."""

    sample_id: str
    dataset: str  #: the source's family (``tabmwp``...)
    subset: str | None  #: the source's subset (``grade_3``, a Cauldron config...)
    question: str  #: the question alone
    prompt: str  #: question, options and the answer-style line, as the student sees it
    choices: list[str]  #: multiple-choice options, empty for open questions
    answer: str  #: the gold answer the rationale must reach
    answer_type: str | None  #: ``number``, ``text``, ``choice`` or unknown
    rationale: str | None  #: the source's gold rationale, where it has one
    meta: dict[str, Any]  #: the source row's ``meta`` (TabMWP's table text, regions...)
    tools: list[str]  #: names of the tools the teacher may call, sorted
    retrieval: bool  #: whether a search (``rag``) is available
    steps: list[StepSoFar]  #: the steps taken so far, oldest first
    max_steps: int  #: the most steps the row may take, tool steps included (``stages.max_steps``)


class JudgeContext(TypedDict):
    """The context of a reflection ``judge`` request."""

    check: str  #: which check asks: ``math_gap`` or ``cheating``


#: What ``TeacherRequest.context`` holds: a step's facts, a judge's check, or (for requests
#: a plugin builds, captions and scores) whatever that plugin documents; often nothing.
RequestContext = StepContext | JudgeContext | dict[str, Any]


def _asked(context: Any) -> Any:
    """The context as far as it shapes what a request asks: the row's step limit does not (the
    messages never mention it), so changing ``stages.max_steps`` re-sends no answered step."""
    if isinstance(context, dict) and "max_steps" in context:
        return {k: v for k, v in context.items() if k != "max_steps"}
    return context


def _by_content(part: Any) -> Any:
    if isinstance(part, dict) and part.get("type") == "image" and part.get("sha256"):
        return {k: v for k, v in part.items() if k != "path"}
    return part


@dataclass
class TeacherRequest:
    """One request to a teacher.

    ``kind`` is ``step`` (the next rationale step), ``judge`` (a reflection check),
    ``caption`` or ``score`` (requests built by tool and judge plugins). ``messages`` are
    OpenAI-style chat messages whose ``content`` is a string or a list of parts
    (``{"type": "text", "text": ...}`` / ``{"type": "image", "path": ..., "sha256": ...}``).
    ``json_schema`` asks for structured output where the back-end supports it. ``context``
    carries the structured facts (:class:`StepContext` for steps, :class:`JudgeContext` for
    judges) for teachers that work from them rather than from the prompt. The request's
    hash (see :meth:`fingerprint`) keys the response cache, so every field that changes the
    answer belongs in it.
    """

    kind: str  # "step" | "judge" | "caption" | "score"
    messages: list[dict[str, Any]]
    prompt_version: str
    json_schema: dict[str, Any] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    context: RequestContext = field(default_factory=dict)

    def step_context(self) -> StepContext:
        """The context of a ``step`` request; a TypeError for any other kind."""
        if self.kind != "step":
            raise TypeError(f"a {self.kind!r} request carries no step context")
        return cast(StepContext, self.context)

    def fingerprint(self, model: str) -> str:
        """sha256 of the whole request as sent to ``model``. An image part that carries its
        ``sha256`` counts by it, not by the local file it is read from: another machine reads
        the same image from another path and must find (and claim) the same request."""
        messages = [{**m, "content": [_by_content(p) for p in m["content"]]} if isinstance(m.get("content"), list)
                    else m for m in self.messages]
        body = {"model": model, "kind": self.kind, "messages": messages,
                "prompt_version": self.prompt_version, "json_schema": self.json_schema,
                "params": self.params, "context": _asked(self.context)}
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
    ``unsupported``, ``batch_expired`` / ``batch_failed`` (a Batch API item that still expired
    or failed after its resubmissions), ``auth`` (the server rejected the credentials: HTTP
    401/403). Teachers raise this (never a transport exception) once their retries are spent,
    so the engine can quarantine the row and carry on; ``auth`` instead stops the stage, since
    every other row would fail the same way.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


#: Every request kind the host and the built-in plugins send.
REQUEST_KINDS = frozenset({"step", "judge", "caption", "score"})


class Teacher(Component[OptionsT]):
    """Writes rationale steps and answers judge prompts (SPEC §2.2, §2.4).

    ``model`` names what answers (it is part of every request's cache key);
    ``vision`` says whether it can look at images (captioning needs it);
    ``request_kinds`` which kinds of :class:`TeacherRequest` it answers: a teacher that
    works only from the step context (no model) answers ``{"step"}``, and plugins that need
    a judge or a caption pass it over. Asked anything else, a teacher raises
    ``TeacherError("unsupported", ...)``.
    """

    model: str = ""
    vision: bool = False
    request_kinds: ClassVar[frozenset[str]] = REQUEST_KINDS
    #: True for a teacher that answers a shard's requests in turn-synchronous batches (a
    #: Batch API): the engine then lets every row of a shard in at once, since a row limit
    #: would cut each turn into several batches, and reports live rows to :meth:`rows_live`.
    batched: bool = False

    def rows_live(self, count: int, store: Any = None) -> None:
        """Called by the engine from inside a shard's event loop: ``count`` rows of the shard
        may still send a request (the shard's size first, then fewer as rows finish), and
        ``store`` is the shard's request cache (``get``/``put_many`` of JSON objects), where
        the teacher may keep what a rerun needs to resume (batch ids). A batching teacher
        sends a turn once every live row waits on it. The default ignores it."""

    def shard_metadata(self, store: Any = None) -> dict[str, Any]:
        """What this teacher did for the shard whose request cache is ``store``, for the
        stage asset's metadata (a batching teacher: its batches and their statuses). The
        default has nothing to say."""
        return {}

    @abstractmethod
    def complete(self, request: TeacherRequest) -> TeacherReply:
        """Answer one request or raise :class:`TeacherError`."""

    async def acomplete(self, request: TeacherRequest) -> TeacherReply:
        """Async form; the default runs :meth:`complete` in a worker thread."""
        import asyncio

        return await asyncio.to_thread(self.complete, request)


class Judge(Component[OptionsT]):
    """Scores a finished sample 0–1 with reasons (SPEC §2.6).

    A judge that asks a teacher returns the request from :meth:`request` and reads the
    reply in :meth:`parse`: the host sends it through the request cache, so a rerun asks
    nothing twice. Any other judge implements only :meth:`score`.
    """

    def attach_teachers(self, teachers: Mapping[str, Teacher[Any]]) -> None:
        """Receive the stage's teacher(s) by name, before :meth:`availability` is asked.
        The default ignores them."""

    def request(self, sample: Mapping[str, Any]) -> TeacherRequest | None:
        """The teacher request that scores ``sample`` (its ``turns`` are the RR dialogue),
        or None (the default) to be scored by :meth:`score` instead."""
        return None

    def parse(self, reply: TeacherReply) -> tuple[float, str]:
        """``(score, reasons)`` from the teacher's reply to :meth:`request`; a judge whose
        ``request`` returns a request must implement it (raise ValueError for a bad reply)."""
        raise NotImplementedError(f"judge {self.name!r} sends requests but does not parse the replies")

    @abstractmethod
    def score(self, sample: Mapping[str, Any]) -> tuple[float, str]:
        """Return ``(score, reasons)`` for one sample record."""


# ----------------------------------------------------------- exporters and training


class Exporter(Component[OptionsT]):
    """Writes pre-flighted records in one fine-tuning framework's format."""

    @abstractmethod
    def export(self, records: Mapping[str, list[Any]], out_dir: Path, context: Mapping[str, Any]) -> dict[str, Any]:
        """Write ``records`` (``mmat_assets.engine.export.Record`` lists by format, ``rr`` and
        ``orr``) under ``out_dir``; ``context`` has what a dataset card needs (licences,
        teachers, tool versions, stage counts, system prompts). Return the paths written."""


if TYPE_CHECKING:  # for types only: the toolkit itself imports this module
    from mmat_assets.toolkit.export import Record

#: A model under evaluation: ``(chat messages with <image> tags, image paths) -> reply text``.
Responder = Callable[[list[dict[str, str]], list[str]], str]


class Trainer(Component[OptionsT]):
    """Fine-tunes a student model on an export, and runs the students it trains.

    Only :meth:`train` is required. The host also asks the trainer for the base student
    (:meth:`base_student`), for the record encoder the export's pre-flight checks every
    record with (:meth:`encoder`), and for a model that answers evaluation prompts
    (:meth:`responder`); each has a default that works without a model.

    The trainer runs in its own process, which imports the class by its module and name:
    define it at the top level of a module. When its ``Options`` has a ``student`` field,
    the host sets it to the base student (what :meth:`base_student` built, or
    ``export.student`` as configured).
    """

    @abstractmethod
    def train(self, export_dir: Path, out_dir: Path) -> dict[str, Any]:
        """Train on ``export_dir/train.jsonl``; write the checkpoint under ``out_dir``; return
        metrics and paths. ``checkpoint`` (default ``out_dir``), ``final_loss``, ``steps``,
        ``seconds``, ``train_tokens``, ``tokens_per_s``, ``peak_memory_mb`` and
        ``loss_curve`` (``[[step, loss], ...]``) are shown as the asset's metadata when
        present; none is required."""

    def base_student(self, student: str, out_dir: Path) -> Path | None:
        """Build the configured ``student`` (``export.student``) into ``out_dir`` when this
        trainer builds it itself, and return that folder. Default: None, meaning ``student``
        names a model to use as it is (a local folder or a hub id)."""
        return None

    def encoder(self, student: str, max_length: int) -> Callable[[Record], Mapping[str, Any]] | None:
        """How this trainer encodes one export record for ``student`` (a folder or hub id)
        at ``max_length`` tokens, for the export's pre-flight.

        The callable raises on a record the trainer could not encode, and otherwise returns
        what it would do silently: ``truncated``, ``truncated_through_image`` (bool),
        ``assistant_tokens`` (tokens under the loss), ``n_image_placeholders`` and
        ``n_images``; missing keys count as fine. Default: None, and pre-flight checks the
        records' structure only.
        """
        return None

    def responder(self, student: str, checkpoint: Path | None, max_new_tokens: int) -> Responder:
        """A :data:`Responder` answering with ``student``, or, given ``checkpoint`` (the
        ``checkpoint`` :meth:`train` returned), with the tuned model; evaluation scores its
        replies. Default: raises NotImplementedError (this trainer's models cannot be evaluated)."""
        raise NotImplementedError(f"trainer {self.name!r} cannot run a model for evaluation")

    def token_counter(self, student: str) -> Callable[[str], int] | None:
        """How many tokens ``student`` spends on a text (its tokenizer): the evaluation sizes
        its per-turn generation limits from the training data with it. Default: None (the
        host then counts about four characters a token)."""
        return None


@dataclass
class BenchmarkItem:
    """One evaluation question."""

    item_id: str
    question: str
    answers: list[str]
    image: ImageInput | None = None
    choices: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


class Benchmark(Component[OptionsT]):
    """An evaluation set read from local files a user downloaded."""

    @abstractmethod
    def items(self) -> Iterator[BenchmarkItem]:
        """Yield every item of the benchmark."""

    def score(self, prediction: str, item: BenchmarkItem) -> float:
        """Score one prediction in [0, 1]; exact match unless overridden."""
        return float(prediction.strip().lower() in {a.strip().lower() for a in item.answers})
