"""The plugin manager factory and the registry of implementations it yields.

Built-in plugins are modules named in :data:`DEFAULT_PLUGINS`; third-party ones arrive
through the ``mmat`` entry-point group. ``MMAT_BLOCK_PLUGINS`` (comma-separated plugin
names) blocks plugins. A plugin that fails to import (whatever it raises, ``sys.exit`` included),
fails in its register hook, or registers a second implementation under a name already taken in
its role, is recorded as an error naming it; the rest load. Only Ctrl-C (KeyboardInterrupt)
goes through: a user who interrupts a slow import means to stop.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pluggy

from mmat_assets import contracts, hookspecs

DEFAULT_PLUGINS: tuple[str, ...] = (
    "mmat_plugins.sources_tabmwp",
    "mmat_plugins.sources_llava_cot",
    "mmat_plugins.sources_visual_cot",
    "mmat_plugins.sources_cauldron",
    "mmat_plugins.sources_infoseek",
    "mmat_plugins.sources_qa_table",
    "mmat_plugins.tools_ocr",
    "mmat_plugins.tools_face",
    "mmat_plugins.tools_label_bbox",
    "mmat_plugins.tools_caption",
    "mmat_plugins.retrievers_lancedb",
    "mmat_plugins.retrievers_web",
    "mmat_plugins.teachers_grounded",
    "mmat_plugins.teachers_openai",
    "mmat_plugins.exporters_swift",
    "mmat_plugins.exporters_sharegpt",
    "mmat_plugins.exporters_internvl",
    "mmat_plugins.exporters_hf",
    "mmat_plugins.benchmarks",
    "mmat_plugins.trainers_hf_lora",
    "mmat_plugins.judges_teacher",
)
ENTRY_POINT_GROUP = "mmat"
C = TypeVar("C", bound=contracts.Component[Any])
BLOCK_ENV = "MMAT_BLOCK_PLUGINS"

ROLE_BASES: dict[str, type[contracts.Component[Any]]] = {
    "source": contracts.Source,
    "tool": contracts.Tool,
    "retriever": contracts.Retriever,
    "teacher": contracts.Teacher,
    "judge": contracts.Judge,
    "exporter": contracts.Exporter,
    "trainer": contracts.Trainer,
    "benchmark": contracts.Benchmark,
}


@dataclass(frozen=True)
class Implementation:
    """One registered implementation class and where it came from."""

    role: str
    name: str
    cls: type[contracts.Component[Any]]
    plugin: str
    plugin_version: str


@dataclass
class Registry:
    """Implementations by role and name, plus the errors met while loading plugins."""

    impls: dict[str, dict[str, Implementation]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)

    def get(self, role: str, name: str) -> Implementation:
        """Look up one implementation; a clear KeyError lists what exists."""
        try:
            return self.impls.get(role, {})[name]
        except KeyError:
            known = ", ".join(sorted(self.impls.get(role, {}))) or "none"
            raise KeyError(f"no {role} named {name!r} is registered (known: {known})") from None

    def version(self, role: str, name: str) -> str | None:
        """``name``'s code version for asset code versions: its class version, and its prompt
        version where it has one; None when nothing is registered under that name."""
        try:
            cls = self.get(role, name).cls
        except KeyError:
            return None
        prompt = cls.prompt_version
        return f"{cls.version}+{prompt}" if prompt else str(cls.version)

    def role(self, role: str) -> dict[str, Implementation]:
        """All implementations of one role, by name."""
        return dict(self.impls.get(role, {}))

    def create(self, role: str, name: str, options: Mapping[str, Any] | None = None, *,
               base_dir: str | Path | None = None) -> Any:
        """Instantiate implementation ``name`` of ``role`` with validated ``options``.

        ``base_dir`` (the config file's directory; default the working directory) is set
        before the class's ``__init__`` runs: relative option paths resolve against it from
        the start, and a plugin's own ``__init__(options)`` needs no extra argument.
        """
        return create(self.get(role, name).cls, options, base_dir=base_dir)

    def all(self) -> Iterable[Implementation]:
        for role in ROLE_BASES:
            yield from self.impls.get(role, {}).values()


def create(cls: type[C], options: Mapping[str, Any] | None = None, *, base_dir: str | Path | None = None) -> C:
    """Instantiate an implementation class as :meth:`Registry.create` does: ``base_dir``
    set before ``__init__`` runs."""
    obj = cls.__new__(cls)
    obj.base_dir = Path(base_dir) if base_dir is not None else Path.cwd()
    cls.__init__(obj, options)
    return obj


def class_ref(cls: type[Any]) -> str:
    """``module:qualname``, how another process imports ``cls`` (see :func:`create`); a class
    defined inside a function or in ``__main__`` has none (ValueError)."""
    if "<locals>" in cls.__qualname__ or cls.__module__ == "__main__":
        raise ValueError(f"{cls.__module__}.{cls.__qualname__} cannot be imported by another process: "
                         "define it at the top level of an importable module")
    return f"{cls.__module__}:{cls.__qualname__}"


def blocked_names(environ: Mapping[str, str] | None = None) -> set[str]:
    """Plugin names blocked through ``MMAT_BLOCK_PLUGINS`` (read when called, not at import)."""
    raw = (environ if environ is not None else os.environ).get(BLOCK_ENV, "")
    return {part.strip() for part in raw.split(",") if part.strip()}


def _plugin_version(module: Any, dist: md.Distribution | None) -> str:
    if dist is not None:
        return dist.version
    return str(getattr(module, "__version__", None) or _own_version())


def _own_version() -> str:
    from mmat_assets import __version__

    return __version__


def _describe(exc: BaseException) -> str:
    """What a plugin raised, in words: ``sys.exit`` is easy to miss as an exception."""
    if isinstance(exc, SystemExit):
        return f"SystemExit: it called sys.exit({exc.code!r})"
    return f"{type(exc).__name__}: {exc}"


def _short_name(module_name: str) -> str:
    return module_name.rsplit(".", 1)[-1]


def plugin_name(obj: object) -> str:
    """The name a plugin object is registered (and blocked) under: a module's or class's
    last name part."""
    return _short_name(str(getattr(obj, "__name__", None) or type(obj).__name__))


def get_plugin_manager(
    builtins: Iterable[str] = DEFAULT_PLUGINS,
    entry_points: bool = True,
    environ: Mapping[str, str] | None = None,
    plugins: Iterable[object] = (),
) -> tuple[pluggy.PluginManager, list[str], dict[str, str]]:
    """Build a fresh plugin manager: built-ins from the list, then entry points, then
    ``plugins``: objects (modules, classes) with ``@hookimpl`` functions, registered as they
    are, under :func:`plugin_name` (tests and notebooks need no entry point).

    Returns the manager, the load errors, and each plugin's version by name.
    """
    pm = pluggy.PluginManager("mmat")
    pm.add_hookspecs(hookspecs)
    errors: list[str] = []
    versions: dict[str, str] = {}
    blocked = blocked_names(environ)
    for name in blocked:
        pm.set_blocked(name)

    def add(name: str, load: Any, dist: md.Distribution | None) -> None:
        if name in blocked:
            return
        try:
            module = load()
            pm.register(module, name=name)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # a broken plugin must not take the others down, sys.exit included
            errors.append(f"plugin {name!r} failed to load: {_describe(exc)}")
            return
        versions[name] = _plugin_version(module, dist)

    for module_name in builtins:
        add(_short_name(module_name), lambda m=module_name: importlib.import_module(m), None)
    if entry_points:
        for ep in md.entry_points(group=ENTRY_POINT_GROUP):
            add(ep.name, ep.load, ep.dist)
    for obj in plugins:
        add(plugin_name(obj), lambda o=obj: o, None)
    return pm, errors, versions


def _collect(pm: pluggy.PluginManager, registry: Registry, versions: dict[str, str]) -> None:
    for hook_name, role in hookspecs.ROLES.items():
        base = ROLE_BASES[role]
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            plugin = impl.plugin_name

            def register(cls: type[Any], plugin: str = plugin, role: str = role) -> None:
                _add(registry, role, base, cls, plugin, versions.get(plugin, "?"))

            try:
                impl.function(register=register)
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # as at import: contained, named, the rest go on
                registry.errors.append(f"plugin {plugin!r} failed in {hook_name}: {_describe(exc)}")


def _add(
    registry: Registry,
    role: str,
    base: type[contracts.Component[Any]],
    cls: type[Any],
    plugin: str,
    version: str,
) -> None:
    if not (isinstance(cls, type) and issubclass(cls, base)):
        registry.errors.append(
            f"plugin {plugin!r} registered {cls!r} as a {role}, but it is not a "
            f"{base.__name__} subclass"
        )
        return
    name = getattr(cls, "name", None)
    if not name:
        registry.errors.append(f"plugin {plugin!r} registered a {role} with no name: {cls!r}")
        return
    taken = registry.impls.setdefault(role, {})
    if name in taken:
        registry.errors.append(
            f"plugin {plugin!r} registered {role} {name!r}, already registered by plugin "
            f"{taken[name].plugin!r}; the second one is ignored"
        )
        return
    taken[name] = Implementation(role, name, cls, plugin, version)


def load_registry(
    builtins: Iterable[str] = DEFAULT_PLUGINS,
    entry_points: bool = True,
    environ: Mapping[str, str] | None = None,
    plugins: Iterable[object] = (),
) -> Registry:
    """Load every plugin and collect what each registers, by role and name; ``plugins`` are
    plugin objects added after the others (see :func:`get_plugin_manager`)."""
    pm, errors, versions = get_plugin_manager(builtins, entry_points, environ, plugins)
    registry = Registry(errors=list(errors), blocked=sorted(blocked_names(environ)))
    _collect(pm, registry, versions)
    return registry


__all__ = [
    "DEFAULT_PLUGINS",
    "Implementation",
    "Registry",
    "class_ref",
    "create",
    "get_plugin_manager",
    "load_registry",
    "plugin_name",
]
