"""The seam between host and plugins holds in both directions.

Built-in plugins import only the public plugin API (``hookspecs``, ``contracts``,
``records``, ``protocol``) and the toolkit, exactly what a third party can import: not the
host's internals, and not each other (a private sibling module such as ``_helpers`` is a
host internal by another name). The host imports ``mmat_plugins`` only by the module names
in its built-in plugin list. Every import counts, including relative ones and those inside
functions and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from mmat_assets.plugins import DEFAULT_PLUGINS

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = ("mmat_assets.hookspecs", "mmat_assets.contracts", "mmat_assets.records", "mmat_assets.protocol",
          "mmat_assets.toolkit")


PACKAGES = {"plugins": "mmat_plugins"}  # source folder -> the package name it installs as


def package_of(path: Path, root: Path) -> str:
    """The dotted package a file under ``root`` belongs to (what its relative imports start from)."""
    folders = path.parent.relative_to(root).parts
    return ".".join([PACKAGES.get(folders[0], folders[0]), *folders[1:]]) if folders else ""


def imported_modules(path: Path, package: str = "") -> Iterator[tuple[int, str]]:
    """``(line, module)`` for every import in a file; ``from a import b`` yields ``a.b`` too,
    since ``b`` may be a module (``from mmat_assets import engine``). Relative imports are
    resolved against ``package`` (``from . import _x`` in ``mmat_plugins`` is ``mmat_plugins._x``)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node.module, node.level, package)
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def _absolute(module: str | None, level: int, package: str) -> str:
    if not level:
        return module or ""
    parts = package.split(".")[: len(package.split(".")) - (level - 1)]
    return ".".join([*parts, *([module] if module else [])])


def is_public(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in PUBLIC)


def names_host(module: str) -> bool:
    return module == "mmat_assets" or module.startswith("mmat_assets.")


def names_plugin(module: str) -> bool:
    return module.split(".")[0] == "mmat_plugins"


def plugin_violations(root: Path) -> list[str]:
    return [f"{path.relative_to(root)}:{line}: {module}"
            for path in sorted((root / "plugins").rglob("*.py"))
            for line, module in imported_modules(path, package_of(path, root))
            if (names_host(module) and not is_public(module)) or names_plugin(module)]


def in_plugin_list(module: str) -> bool:
    """Whether ``module`` is a built-in plugin module or a name inside one."""
    parts = module.split(".")
    return any(".".join(parts[:i]) in DEFAULT_PLUGINS for i in range(2, len(parts) + 1))


def host_violations(root: Path) -> list[str]:
    return [f"{path.relative_to(root)}:{line}: {module}"
            for path in sorted((root / "mmat_assets").rglob("*.py"))
            for line, module in imported_modules(path, package_of(path, root))
            if names_plugin(module) and not in_plugin_list(module)]


def test_plugins_import_only_the_public_api_and_the_toolkit() -> None:
    assert plugin_violations(ROOT) == []


def test_host_imports_plugins_only_by_the_built_in_list() -> None:
    assert host_violations(ROOT) == []


def test_built_in_plugin_list_holds_only_plugin_modules() -> None:
    # The host may import exactly these: each must be a module of plugins/, not a helper.
    for name in DEFAULT_PLUGINS:
        package, _, module = name.partition(".")
        assert package == "mmat_plugins" and not module.startswith("_")
        assert (ROOT / "plugins" / f"{module}.py").is_file(), name


@pytest.mark.parametrize("source, bad", [
    ("from mmat_assets.engine.tools import open_rgb\n", True),
    ("def f():\n    from mmat_assets.engine import student\n", True),  # inside a function
    ("import mmat_assets.engine.answers as a\n", True),
    ("from mmat_assets import __version__\n", True),  # the host package itself
    ("from mmat_assets import contracts\n", False),
    ("from mmat_assets.toolkit.images import open_rgb\n", False),
    ("from mmat_assets.hookspecs import hookimpl\n", False),
    ("import json\nfrom pydantic import BaseModel\n", False),  # third-party packages
    ("from mmat_plugins._helpers import x\n", True),  # a private sibling module
    ("from . import _helpers as h\n", True),  # the same, relative
    ("from ._helpers import IGNORE\n", True),
    ("def f():\n    from .tools_ocr import OcrTool\n", True),  # another plugin module
    ("import mmat_plugins._helpers\n", True),
])
def test_the_scan_sees_every_kind_of_import(tmp_path: Path, source: str, bad: bool) -> None:
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "p.py").write_text(source, encoding="utf-8")
    assert bool(plugin_violations(tmp_path)) is bad


def test_the_host_scan_refuses_a_private_plugin_module(tmp_path: Path) -> None:
    (tmp_path / "mmat_assets").mkdir()
    (tmp_path / "mmat_assets" / "m.py").write_text(
        "from mmat_plugins.sources_tabmwp import TabMWPSource\n"
        "def f():\n    from mmat_plugins._jsonl import iter_jsonl\n", encoding="utf-8")
    assert host_violations(tmp_path) == ["mmat_assets/m.py:3: mmat_plugins._jsonl.iter_jsonl"]


def test_a_private_sibling_module_in_plugins_is_refused(tmp_path: Path) -> None:
    # The shape a trainer once had: its model code in a private helper module beside it.
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "_student.py").write_text("IGNORE = -100\n", encoding="utf-8")
    (tmp_path / "plugins" / "trainers_x.py").write_text(
        "from mmat_assets.contracts import Trainer\nfrom . import _student as st\n"
        "from ._student import IGNORE\n", encoding="utf-8")
    assert plugin_violations(tmp_path) == ["plugins/trainers_x.py:2: mmat_plugins._student",
                                           "plugins/trainers_x.py:3: mmat_plugins._student.IGNORE"]


def toolkit_names(path: Path) -> Iterator[tuple[int, str]]:
    """``(line, name)`` for every name a file imports from the toolkit or one of its modules."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mmat_assets.toolkit"):
            yield from ((node.lineno, alias.name) for alias in node.names)


def test_plugins_use_only_the_names_the_toolkit_declares() -> None:
    """The toolkit's promise is its ``__all__``: a name a built-in plugin needs is declared there
    (and documented), so a third party may rely on it as well."""
    import mmat_assets.toolkit as toolkit

    undeclared = [f"{path.name}:{line} {name}" for path in sorted((ROOT / "plugins").glob("*.py"))
                  for line, name in toolkit_names(path) if name not in toolkit.__all__]
    assert not undeclared, undeclared
