"""The whole plugin API of mmat, in one file.

A plugin is a module (or object) with functions marked ``@hookimpl``. Each hook receives a
``register`` callback; the plugin calls it once per implementation class it provides.
Implementation classes subclass the small ABCs in :mod:`mmat_assets.contracts`; the host
looks them up by their ``name`` attribute, creates them with their configured options (and
the config's directory as ``base_dir``), and calls only what those ABCs declare. Third-party
plugins are found through the ``mmat`` entry-point group::

    [project.entry-points.mmat]
    my_plugin = "my_package.my_module"

Tests and notebooks can pass plugin objects directly instead:
``load_registry(plugins=[my_module])`` (see :mod:`mmat_assets.testing`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("mmat")
hookimpl = pluggy.HookimplMarker("mmat")

Register = Callable[[type[Any]], None]


@hookspec
def register_sources(register: Register) -> None:
    """Register :class:`~mmat_assets.contracts.Source` subclasses.

    A source reads the public on-disk format of one QA dataset family and yields
    :class:`~mmat_assets.contracts.SourceRow` objects (or ``BadRow`` for rows it could not
    parse). Each configured source becomes the asset ``source_samples/<name>``. Its
    ``ground_truth_meta`` names the meta fields reflection may read as what the image shows.
    """


@hookspec
def register_tools(register: Register) -> None:
    """Register :class:`~mmat_assets.contracts.Tool` subclasses (vision operators).

    The tool's ``name`` is the operator name a teacher writes in ``operators``; its
    ``description`` is what the teacher's and the RR/ORR system prompts say about it (every
    tool available in a build is listed there). ``probe_args`` are the arguments of its probe
    run, ``claim_patterns`` how reflection spots a thought claiming its output. Each tool
    becomes the asset ``tools/<name>``.
    """


@hookspec
def register_retrievers(register: Register) -> None:
    """Register :class:`~mmat_assets.contracts.Retriever` subclasses (the RAG side).

    Each configured retriever becomes the asset ``retrievers/<name>``, which calls its
    ``build`` (an index, if it has one) and probes ``search``; stages call ``attach_index``.
    """


@hookspec
def register_teachers(register: Register) -> None:
    """Register :class:`~mmat_assets.contracts.Teacher` subclasses.

    A teacher writes the next rationale step and answers judge prompts; ``request_kinds``
    says which kinds of request it answers (one with no model answers only ``step``).
    """


@hookspec
def register_judges(register: Register) -> None:
    """Register :class:`~mmat_assets.contracts.Judge` subclasses (quality scorers).

    ``stages.judge`` names the one that scores every passed dialogue in the reflection stage:
    by its ``score``, or by a teacher request it returns from ``request`` (then cached).
    """


@hookspec
def register_exporters(register: Register) -> None:
    """Register :class:`~mmat_assets.contracts.Exporter` subclasses (fine-tuning formats)."""


@hookspec
def register_trainers(register: Register) -> None:
    """Register :class:`~mmat_assets.contracts.Trainer` subclasses (student fine-tuning)."""


@hookspec
def register_benchmarks(register: Register) -> None:
    """Register :class:`~mmat_assets.contracts.Benchmark` subclasses (evaluation sets)."""


#: Hook name -> role name used in the registry, ``mmat plugins`` and configuration.
ROLES: dict[str, str] = {
    "register_sources": "source",
    "register_tools": "tool",
    "register_retrievers": "retriever",
    "register_teachers": "teacher",
    "register_judges": "judge",
    "register_exporters": "exporter",
    "register_trainers": "trainer",
    "register_benchmarks": "benchmark",
}
