"""The plugin host: built-ins, entry points, blocking, broken and clashing plugins."""

from __future__ import annotations

import sys

import dagster as dg
import pytest

from mmat_assets.assets import build_definitions
from mmat_assets.config import load_config
from mmat_assets.hookspecs import Register, hookimpl
from mmat_assets.plugins import DEFAULT_PLUGINS, load_registry
from mmat_plugins.sources_tabmwp import TabMWPSource
from tests.conftest import write_project

SIX_SOURCES = {"tabmwp", "llava_cot", "visual_cot", "cauldron", "infoseek", "qa_table"}


def test_builtins_register_six_sources_without_errors() -> None:
    reg = load_registry(entry_points=False)
    assert reg.errors == []
    assert set(reg.role("source")) == SIX_SOURCES
    impl = reg.get("source", "tabmwp")
    assert impl.plugin == "sources_tabmwp" and impl.cls.license == "CC BY-NC-SA 4.0"


def test_block_env_removes_a_plugin() -> None:
    reg = load_registry(entry_points=False, environ={"MMAT_BLOCK_PLUGINS": "sources_tabmwp, x"})
    assert "tabmwp" not in reg.role("source")
    assert "llava_cot" in reg.role("source")
    assert reg.blocked == ["sources_tabmwp", "x"]


class clash_plugin:  # noqa: N801  (a plugin object, registered under this name)
    """Registers a second source named ``tabmwp``."""

    @staticmethod
    @hookimpl
    def register_sources(register: Register) -> None:
        class Again(TabMWPSource):
            pass

        register(Again)


class wrong_role_plugin:  # noqa: N801
    """Registers a class that is not a Source as a source."""

    @staticmethod
    @hookimpl
    def register_sources(register: Register) -> None:
        class NotASource:
            name = "x"

        register(NotASource)


def test_broken_and_clashing_plugins_are_named_and_the_rest_load() -> None:
    reg = load_registry(builtins=[*DEFAULT_PLUGINS, "no_such_plugin_module"], entry_points=False,
                        plugins=[clash_plugin])
    assert any("'no_such_plugin_module' failed to load" in e and "ModuleNotFoundError" in e for e in reg.errors)
    assert any("'clash_plugin' registered source 'tabmwp'" in e and "'sources_tabmwp'" in e for e in reg.errors)
    assert reg.get("source", "tabmwp").plugin == "sources_tabmwp"  # first one kept
    assert set(reg.role("source")) == SIX_SOURCES


def test_wrong_base_class_is_refused() -> None:
    reg = load_registry(builtins=[], entry_points=False, plugins=[wrong_role_plugin])
    assert reg.role("source") == {}
    assert "not a Source subclass" in reg.errors[0]


def test_plugin_objects_are_blocked_by_name_like_any_plugin() -> None:
    reg = load_registry(builtins=[], entry_points=False, plugins=[clash_plugin],
                        environ={"MMAT_BLOCK_PLUGINS": "clash_plugin"})
    assert reg.role("source") == {} and reg.errors == [] and reg.blocked == ["clash_plugin"]


def test_third_party_plugin_appears_as_dagster_asset(example_plugin, tmp_path) -> None:
    reg = load_registry()
    impl = reg.get("source", "colour_swatches")
    assert (impl.plugin, impl.plugin_version) == ("example", "0.3.1")
    assert reg.get("tool", "mean_colour").plugin == "example"

    cfg = load_config(write_project(tmp_path, {"swatches": {"plugin": "colour_swatches",
                                                            "options": {"repeat": 2}}}, shards=2))
    defs = build_definitions(cfg, "local", reg)
    key = dg.AssetKey(["source_samples", "swatches"])
    assert key in {k for a in defs.assets for k in a.keys}
    result = dg.materialize(list(defs.assets), selection=[key, dg.AssetKey(["quarantine", "source", "swatches"])],
                            resources=defs.resources)
    assert result.success
    df = result.output_for_node("source_swatches", "samples")
    assert sorted(df["answer"].to_list()) == ["blue", "blue", "green", "green", "red", "red"]
    assert set(df["license"]) == {"CC0-1.0"}


def _module_file(tmp_path, monkeypatch, name: str, body: str) -> str:
    """A plugin module on disk, imported for real by the loader (not pre-built)."""
    (tmp_path / f"{name}.py").write_text(body, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name


def test_a_plugin_that_exits_at_import_or_in_its_hook_is_named_and_the_rest_load(tmp_path, monkeypatch) -> None:
    at_import = _module_file(tmp_path, monkeypatch, "exits_at_import", "import sys\nsys.exit(3)\n")
    in_hook = _module_file(tmp_path, monkeypatch, "exits_in_hook", (
        "import sys\nfrom mmat_assets.hookspecs import hookimpl\n"
        "@hookimpl\ndef register_tools(register):\n    sys.exit('no tools today')\n"
    ))
    reg = load_registry(builtins=[*DEFAULT_PLUGINS, at_import, in_hook], entry_points=False)
    assert any("'exits_at_import' failed to load" in e and "SystemExit" in e and "3" in e for e in reg.errors)
    assert any("'exits_in_hook' failed in register_tools" in e and "no tools today" in e for e in reg.errors)
    assert set(reg.role("source")) == SIX_SOURCES and "ocr" in reg.role("tool")


def test_ctrl_c_while_a_plugin_loads_still_stops(tmp_path, monkeypatch) -> None:
    name = _module_file(tmp_path, monkeypatch, "interrupted_plugin", "raise KeyboardInterrupt\n")
    with pytest.raises(KeyboardInterrupt):
        load_registry(builtins=[name], entry_points=False)
