"""The plugin host: built-ins, entry points, blocking, broken and clashing plugins."""

from __future__ import annotations

import sys
import types

import dagster as dg

from mmat_assets.assets import build_definitions
from mmat_assets.config import load_config
from mmat_assets.plugins import DEFAULT_PLUGINS, load_registry
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


def _fake_module(name: str, body: str) -> None:
    mod = types.ModuleType(name)
    exec(body, mod.__dict__)  # a throwaway plugin module built for this test only
    sys.modules[name] = mod


def test_broken_and_clashing_plugins_are_named_and_the_rest_load() -> None:
    _fake_module("clash_plugin", (
        "from mmat_assets.hookspecs import hookimpl\n"
        "from mmat_plugins.sources_tabmwp import TabMWPSource\n"
        "class Again(TabMWPSource):\n    pass\n"
        "@hookimpl\ndef register_sources(register):\n    register(Again)\n"
    ))
    try:
        reg = load_registry(builtins=[*DEFAULT_PLUGINS, "no_such_plugin_module", "clash_plugin"],
                            entry_points=False)
    finally:
        sys.modules.pop("clash_plugin", None)
    assert any("'no_such_plugin_module' failed to load" in e and "ModuleNotFoundError" in e for e in reg.errors)
    assert any("'clash_plugin' registered source 'tabmwp'" in e and "'sources_tabmwp'" in e for e in reg.errors)
    assert reg.get("source", "tabmwp").plugin == "sources_tabmwp"  # first one kept
    assert set(reg.role("source")) == SIX_SOURCES


def test_wrong_base_class_is_refused() -> None:
    _fake_module("wrong_role_plugin", (
        "from mmat_assets.hookspecs import hookimpl\n"
        "class NotASource:\n    name = 'x'\n"
        "@hookimpl\ndef register_sources(register):\n    register(NotASource)\n"
    ))
    try:
        reg = load_registry(builtins=["wrong_role_plugin"], entry_points=False)
    finally:
        sys.modules.pop("wrong_role_plugin", None)
    assert reg.role("source") == {}
    assert "not a Source subclass" in reg.errors[0]


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
