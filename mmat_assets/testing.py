"""A kit for testing a plugin: check its contract, and run a small real build with it.

Use it from a plugin's own tests; no entry point or installed package is needed::

    # conftest.py
    pytest_plugins = ["mmat_assets.testing"]      # provides the ``mmat_build`` fixture

    # test_my_plugin.py
    import my_pkg
    from mmat_assets.testing import check_plugin

    def test_contract() -> None:
        assert check_plugin(my_pkg) == []          # every class the plugin registers

    def test_build(mmat_build) -> None:
        built = mmat_build(plugins=[my_pkg])
        assert built.ok, built.causes
        assert any(c["tool"] == "my_tool" for c in built.tool_calls())

``mmat_build`` (or :func:`build_with` outside pytest) materializes the real assets through
Dagster, from the source to the RR/ORR dialogue files, with the given plugin objects
registered beside this kit's own small source (``kit_rows``: rendered ``12 | 5`` tables,
"What is 12 + 5?"), deterministic teacher (``kit_teacher``: it runs every tool offered,
then answers from the question), exporter (``kit_jsonl``) and trainer (``kit_trainer``). Pass ``sources``, ``teachers`` or ``config`` to build with
your own instead, and ``builtins=DEFAULT_PLUGINS`` to load the built-in plugins too.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, Field

from mmat_assets import contracts
from mmat_assets.hookspecs import Register, hookimpl

#: Names the operator syntax can carry (``name`` or ``name[arg|arg]``).
TOOL_NAME = re.compile(r"[\w.-]+")


# -------------------------------------------------------------------- check_plugin


def check_plugin(obj: object) -> list[str]:
    """Readable problems with a plugin's contract; empty when there are none.

    ``obj`` is an implementation class (or an instance of one), or a plugin object (a
    module or class with ``@hookimpl`` functions): then every class it registers is
    checked, and so is what loading it reported.
    """
    if isinstance(obj, type) and issubclass(obj, contracts.Component):
        return check_class(obj)
    if isinstance(obj, contracts.Component):
        return check_class(type(obj))
    from mmat_assets.plugins import load_registry

    registry = load_registry(builtins=(), entry_points=False, environ={}, plugins=[obj])
    impls = list(registry.all())
    problems = list(registry.errors)
    if not impls and not problems:
        problems.append(f"{obj!r} registers nothing: no @hookimpl register_* function found")
    return problems + [p for impl in impls for p in check_class(impl.cls)]


def assert_plugin(obj: object) -> None:
    """Raise AssertionError listing every problem :func:`check_plugin` finds."""
    problems = check_plugin(obj)
    if problems:
        raise AssertionError("plugin contract problems:\n- " + "\n- ".join(problems))


def _role_of(cls: type) -> str | None:
    from mmat_assets.plugins import ROLE_BASES

    roles = [role for role, base in ROLE_BASES.items() if issubclass(cls, base)]
    return roles[0] if len(roles) == 1 else None


def check_class(cls: type[contracts.Component[Any]]) -> list[str]:
    """Problems of one implementation class (see :func:`check_plugin`)."""
    label = f"{cls.__module__}.{cls.__qualname__}"
    role = _role_of(cls)
    if role is None:
        return [f"{label} must subclass exactly one role base (Source, Tool, Retriever, Teacher, Judge, "
                "Exporter, Trainer, Benchmark)"]
    problems = _common_problems(cls, role)
    problems += ROLE_CHECKS.get(role, lambda c: [])(cls)
    if not problems:
        problems += _instance_problems(cls)
    return [f"{role} {label}: {p}" for p in problems]


def _common_problems(cls: type[contracts.Component[Any]], role: str) -> list[str]:
    problems = []
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        problems.append("`name` must be a non-empty string (what mmat.yaml's `plugin:` names)")
    version = getattr(cls, "version", None)
    if not isinstance(version, str) or not version:
        problems.append("`version` must be a non-empty string; it is part of the cache key, so bump it "
                        "when results change")
    if not (isinstance(cls.Options, type) and issubclass(cls.Options, BaseModel)):
        problems.append("`Options` must be a pydantic BaseModel subclass")
    if not isinstance(cls.prompt_version, str):
        problems.append("`prompt_version` must be a string")
    missing = sorted(getattr(cls, "__abstractmethods__", ()))
    if missing:
        problems.append(f"abstract methods not implemented: {', '.join(missing)}")
    return problems


def _tool_problems(cls: type[Any]) -> list[str]:
    problems = []
    if isinstance(cls.name, str) and not TOOL_NAME.fullmatch(cls.name):
        problems.append(f"`name` {cls.name!r} cannot be written as an operator (letters, digits, _ . - only)")
    if not str(cls.description or "").strip():
        problems.append("`description` is empty: teachers and the RR/ORR system prompts would offer the "
                        "tool by name alone")
    if not isinstance(cls.probe_args, Mapping):
        problems.append("`probe_args` must be a mapping of arguments")
    for pattern in cls.claim_patterns if isinstance(cls.claim_patterns, tuple) else ["<not a tuple>"]:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as exc:
            problems.append(f"`claim_patterns` entry {pattern!r} is not a regular expression: {exc}")
    return problems


def _source_problems(cls: type[Any]) -> list[str]:
    problems = []
    fields = cls.ground_truth_meta
    if not (isinstance(fields, tuple) and all(isinstance(f, str) for f in fields)):
        problems.append("`ground_truth_meta` must be a tuple of meta field names")
    if cls.license == contracts.Source.license and "license" not in cls.Options.model_fields:
        problems.append("`license` is not set: rows without their own licence fail the foundation's "
                        "licence check")
    return problems


def _teacher_problems(cls: type[Any]) -> list[str]:
    kinds = cls.request_kinds
    if not (isinstance(kinds, frozenset | set) and kinds and all(isinstance(k, str) for k in kinds)):
        return ["`request_kinds` must be a non-empty set of request kinds (step, judge, caption, score)"]
    return []


def _judge_problems(cls: type[Any]) -> list[str]:
    if cls.request is not contracts.Judge.request and cls.parse is contracts.Judge.parse:
        return ["overrides `request` but not `parse`: the host could not read the teacher's reply"]
    return []


ROLE_CHECKS: dict[str, Callable[[type[Any]], list[str]]] = {
    "tool": _tool_problems, "source": _source_problems, "teacher": _teacher_problems, "judge": _judge_problems,
}


def _instance_problems(cls: type[contracts.Component[Any]]) -> list[str]:
    """Build the class as the registry does when its options need no values, and ask its
    availability (a plugin whose options are required is checked as a class only)."""
    try:
        cls.Options.model_validate({})
    except Exception:
        return []
    try:
        obj = cls.__new__(cls)
        obj.base_dir = Path.cwd()
        cls.__init__(obj, None)
        avail = obj.availability()
    except Exception as exc:
        return [f"building it with default options or asking its availability raised {type(exc).__name__}: {exc}"]
    if not isinstance(avail, contracts.Availability):
        return [f"availability() returned {type(avail).__name__}, not Availability"]
    return []


# ------------------------------------------------------------------ the kit's plugins


class KitRowsOptions(BaseModel):
    rows: int = Field(default=3, ge=1, description="How many questions to yield.")


class KitRows(contracts.Source[KitRowsOptions]):
    """Questions about a rendered two-row table: "What is 12 + 5?" and the like."""

    name = "kit_rows"
    dataset = "kit"
    version = "1.0.0"
    license = "CC0-1.0"
    description = "Small rendered tables with addition questions (the test kit's source)."

    def read(self) -> Iterator[contracts.SourceRow]:
        for i in range(self.options.rows):
            a, b = 12 + i, 5
            yield contracts.SourceRow(
                row_id=f"kit-{i}", question=f"What is {a} + {b}?", answer=str(a + b),
                images=[contracts.ImageInput(data=_table_png(f"a | {a}\nb | {b}"))], subset="kit",
                rationale=f"{a} + {b} = {a + b}.", answer_type="number")


def _table_png(text: str) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (160, 80), "white")
    ImageDraw.Draw(img).multiline_text((10, 10), text, fill="black", spacing=8)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class KitTeacher(contracts.Teacher[contracts.NoOptions]):
    """Deterministic: runs every tool offered in its first step, then concludes from the
    gold rationale (or the gold answer)."""

    name = "kit_teacher"
    version = "1.0.0"
    model = "kit-teacher-1"
    description = "Runs every offered tool once, then answers from the gold rationale (test kit)."
    request_kinds = frozenset({"step"})

    def complete(self, request: contracts.TeacherRequest) -> contracts.TeacherReply:
        if request.kind != "step":
            raise contracts.TeacherError("unsupported", f"the kit teacher writes steps only, not {request.kind!r}")
        ctx = request.step_context()
        if not ctx["steps"] and ctx["tools"]:
            step = _step("I will run the tools on the image first.", list(ctx["tools"]), final=False)
        else:
            basis = (ctx["rationale"] or "").strip()
            step = _step(f"{basis} So the answer is {ctx['answer']}.".strip(), [], final=True)
        return contracts.TeacherReply(json.dumps(step), model=self.model)


def _step(thought: str, operators: list[str], final: bool) -> dict[str, Any]:
    return {"thought": thought, "operators": operators, "rag": {"needed": False, "query": None},
            "next_action": "final_answer" if final else "continue"}


class KitExporter(contracts.Exporter[contracts.NoOptions]):
    """Writes each format's records as ``<format>.jsonl`` (messages and images)."""

    name = "kit_jsonl"
    version = "1.0.0"
    description = "Plain JSONL of messages and images (the test kit's exporter)."

    def export(self, records: Mapping[str, list[Any]], out_dir: Path, context: Mapping[str, Any]) -> dict[str, Any]:
        out_dir.mkdir(parents=True, exist_ok=True)
        written = {}
        for fmt, recs in records.items():
            path = out_dir / f"{fmt}.jsonl"
            path.write_text("".join(json.dumps({"messages": r.messages, "images": r.images}) + "\n" for r in recs),
                            encoding="utf-8")
            written[fmt] = str(path)
        return written


class KitTrainer(contracts.Trainer[contracts.NoOptions]):
    """Counts the training records and writes them down: no model."""

    name = "kit_trainer"
    version = "1.0.0"
    description = "Counts the records it is given (the test kit's trainer; no model)."

    def train(self, export_dir: Path, out_dir: Path) -> dict[str, Any]:
        lines = (Path(export_dir) / "train.jsonl").read_text(encoding="utf-8").splitlines()
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "records.txt").write_text(str(len(lines)), encoding="utf-8")
        return {"checkpoint": str(out_dir), "records": len(lines)}

    def responder(self, student: str, checkpoint: Path | None, max_new_tokens: int) -> contracts.Responder:
        """A model that answers every prompt with the last number in it (enough to score)."""
        def answer(messages: list[dict[str, str]], images: list[str]) -> str:
            numbers = re.findall(r"\d+", messages[-1]["content"] if messages else "")
            return numbers[-1] if numbers else ""

        return answer


def plugin_of(*classes: type[contracts.Component[Any]], name: str = "test_plugin") -> type:
    """A plugin object that registers ``classes``, each from its role's hook: what a test or
    a notebook hands to ``load_registry(plugins=[...])`` or :func:`build_with` without writing
    a ``@hookimpl`` function per role. ``name`` is the plugin's name (:func:`plugin_name
    <mmat_assets.plugins.plugin_name>`, ``MMAT_BLOCK_PLUGINS``). A class that is not a
    subclass of exactly one role base raises ``TypeError``."""
    from mmat_assets.hookspecs import ROLES

    hook_of = {role: hook for hook, role in ROLES.items()}
    by_hook: dict[str, list[type]] = {}
    for cls in classes:
        role = _role_of(cls)
        if role is None:
            raise TypeError(f"{cls!r} is not a subclass of exactly one of the contracts' role bases")
        by_hook.setdefault(hook_of[role], []).append(cls)

    def hook(registered: list[type]) -> staticmethod[[Register], None]:
        def register_all(register: Register) -> None:
            for cls in registered:
                register(cls)

        return staticmethod(hookimpl(register_all))

    return type(name, (), {h: hook(found) for h, found in by_hook.items()})


#: The kit's own plugin object: its source, teacher, exporter and trainer.
KitPlugin = plugin_of(KitRows, KitTeacher, KitExporter, KitTrainer, name="KitPlugin")


# ------------------------------------------------------------------------- builds


@dataclass
class KitBuild:
    """What a kit build did: the build summary, and readers for what it wrote."""

    root: Path
    config_path: Path
    summary: dict[str, Any]
    registry: Any = field(repr=False)

    @property
    def causes(self) -> list[str]:
        """Why the build failed, one line each (empty when it did not)."""
        return [str(c) for c in self.summary.get("causes", [])]

    @property
    def ok(self) -> bool:
        return not self.causes

    def dialogues(self, fmt: str) -> list[dict[str, Any]]:
        """The ``rr`` or ``orr`` dialogue file, one dict per line (messages, images, source...)."""
        path = self.root / "store" / "datasets" / f"{fmt}.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def table(self, asset: str) -> Any:
        """Every shard of a table asset (``rationales``, ``reflections``, ``rr_samples``...)
        as one polars frame."""
        import polars as pl

        files = sorted((self.root / "store" / "tables").glob(f"{asset}/*.parquet"))
        return pl.concat([pl.read_parquet(f) for f in files], how="vertical_relaxed") if files else pl.DataFrame()

    def tool_calls(self) -> list[dict[str, Any]]:
        """Every tool call the rationales made, over all rows."""
        df = self.table("rationales")
        return [c for calls in (df["tool_calls"].to_list() if df.height else []) for c in calls or []]


def kit_config(root: Path, *, rows: int = 3, sources: Mapping[str, Any] | None = None,
               teachers: Mapping[str, Any] | None = None, stages: Mapping[str, Any] | None = None,
               **extra: Any) -> Path:
    """Write a one-shard project config under ``root`` whose storage lives there too;
    ``extra`` adds top-level sections (``tools``, ``retrievers``, ``export``...)."""
    root.mkdir(parents=True, exist_ok=True)
    teachers = dict(teachers or {"kit": {"plugin": "kit_teacher"}})
    cfg = {
        "sources": dict(sources or {"kit": {"plugin": "kit_rows", "options": {"rows": rows}}}),
        "foundation": {"shards": 1, "seed": 7},
        "teachers": teachers,
        "stages": {"teacher": next(iter(teachers)), "retriever": None, "max_steps": 4, **(stages or {})},
        "export": {"exporters": ["kit_jsonl"], "student": "kit-student", "max_length": 1024},
        "training": {"trainer": "kit_trainer", "exporter": "kit_jsonl"},
        "profiles": {"local": {"root": str(root / "store")}},
        **extra,
    }
    path = root / "mmat.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def build_with(root: Path, plugins: Iterable[object] = (), *, select: str = "*dialogue_files",
               builtins: Iterable[str] = (), entry_points: bool = False, config: Path | None = None,
               **config_args: Any) -> KitBuild:
    """Materialize ``select`` of a small project under ``root`` with ``plugins`` (plugin
    objects: modules or classes with ``@hookimpl`` functions) registered beside the kit's
    own, through the same Dagster definitions and build runner as ``mmat build``.

    ``config`` is a project config to use as it is; otherwise :func:`kit_config` writes
    one from ``config_args``. ``builtins`` names built-in plugin modules to load too, and
    ``entry_points=True`` loads the installed ones (the ``mmat`` entry-point group);
    ``MMAT_BLOCK_PLUGINS`` is not read.
    """
    import dagster as dg
    from rich.console import Console

    from mmat_assets.assets import build_definitions
    from mmat_assets.config import load_config
    from mmat_assets.plugins import load_registry
    from mmat_assets.runner import BuildProgress, materialize

    path = config or kit_config(Path(root), **config_args)
    registry = load_registry(builtins=tuple(builtins), entry_points=entry_points, environ={},
                             plugins=[KitPlugin, *plugins])
    if registry.errors:
        raise AssertionError("plugins failed to load:\n- " + "\n- ".join(registry.errors))
    defs = build_definitions(load_config(path), "local", registry, environ={})
    with dg.DagsterInstance.ephemeral() as instance:
        summary = materialize(defs, select, lambda keys: keys, BuildProgress(Console(), enabled=False),
                              instance=instance)
    return KitBuild(Path(root), path, summary, registry)


@pytest.fixture
def mmat_build(tmp_path: Path) -> Callable[..., KitBuild]:
    """``mmat_build(plugins=[obj], **options)``: :func:`build_with` in a fresh folder."""
    count = 0

    def run(plugins: Iterable[object] = (), **kwargs: Any) -> KitBuild:
        nonlocal count
        count += 1
        return build_with(tmp_path / f"mmat-build-{count}", plugins, **kwargs)

    return run


__all__ = ["KitBuild", "KitExporter", "KitPlugin", "KitRows", "KitTeacher", "KitTrainer", "assert_plugin", "build_with", "check_class",
           "check_plugin", "kit_config", "mmat_build", "plugin_of"]

