"""A config that starts from another (``extends:``) and changes only what differs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mmat_assets.config import ConfigError, load_config, merged

BASE = {
    "sources": {"tabmwp": {"plugin": "tabmwp", "options": {"path": "data/tabmwp"}}},
    "stages": {"teacher": "grounded", "max_steps": 6, "concurrency": 8},
    "training": {"trainer": "hf_lora", "options": {"max_length": 1024, "cpu_threads": 1}},
    "export": {"formats": ["rr", "orr"]},
    "profiles": {"local": {"root": "store"}},
}


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_mappings_merge_key_by_key_and_everything_else_is_replaced_whole() -> None:
    base = {"a": {"x": 1, "y": {"p": 1, "q": 2}}, "l": [1, 2, 3], "s": "keep", "n": 5}
    out = merged(base, {"a": {"y": {"q": 9}}, "l": [7], "n": None, "new": {"k": 1}})
    assert out == {"a": {"x": 1, "y": {"p": 1, "q": 9}}, "l": [7], "s": "keep", "n": None, "new": {"k": 1}}
    assert base["a"]["y"]["q"] == 2  # the base is not changed in place


def test_a_config_that_extends_another_is_that_one_with_its_own_keys_over_it(tmp_path: Path) -> None:
    _write(tmp_path / "base.yaml", BASE)
    child = _write(tmp_path / "child.yaml", {
        "extends": "base.yaml",
        "stages": {"max_steps": 4},
        "training": {"options": {"cpu_threads": 2}},
        "export": {"formats": ["rr"]},
    })
    cfg, base = load_config(child), load_config(tmp_path / "base.yaml")
    assert (cfg.stages.max_steps, cfg.stages.teacher, cfg.stages.concurrency) == (4, "grounded", 8)
    assert cfg.training.options == {"max_length": 1024, "cpu_threads": 2}
    assert cfg.export.formats == ["rr"]
    # the base's relative paths mean the same from the file that extends it
    assert cfg.base_dir == tmp_path and cfg.profile_root("local") == base.profile_root("local")
    assert cfg.sources == base.sources
    # and apart from the overridden keys the two are equal
    dumped, expected = cfg.model_dump(), base.model_dump()
    expected["stages"]["max_steps"], expected["training"]["options"]["cpu_threads"] = 4, 2
    expected["export"]["formats"] = ["rr"]
    assert dumped == expected


def test_extends_chains_and_the_nearest_file_wins(tmp_path: Path) -> None:
    _write(tmp_path / "a.yaml", BASE)
    _write(tmp_path / "b.yaml", {"extends": "a.yaml", "stages": {"max_steps": 3, "concurrency": 2}})
    c = _write(tmp_path / "c.yaml", {"extends": "b.yaml", "stages": {"max_steps": 5}})
    cfg = load_config(c)
    assert (cfg.stages.max_steps, cfg.stages.concurrency, cfg.stages.teacher) == (5, 2, "grounded")


@pytest.mark.parametrize("case", ["loop", "self", "missing", "other_folder", "not_a_name"])
def test_a_broken_extends_is_one_line_naming_the_file(tmp_path: Path, case: str) -> None:
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "sub" / "base.yaml", BASE)
    target = {"loop": "b.yaml", "self": "a.yaml", "missing": "nosuch.yaml",
              "other_folder": "sub/base.yaml", "not_a_name": ["base.yaml"]}[case]
    a = _write(tmp_path / "a.yaml", {"extends": target, **BASE})
    _write(tmp_path / "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(ConfigError) as caught:
        load_config(a)
    message = str(caught.value)
    assert "\n" not in message and str(tmp_path) in message, message
    reason = {"loop": "loops: a.yaml -> b.yaml -> a.yaml", "self": "loops: a.yaml -> a.yaml",
              "missing": "no config file nosuch.yaml", "other_folder": "not in the same folder",
              "not_a_name": "names a config file"}[case]
    assert reason in message, message


def test_mmat_build_reports_a_broken_extends_as_a_usage_error(tmp_path: Path) -> None:
    from mmat_assets.runner import BuildError, _definitions

    path = _write(tmp_path / "mmat.yaml", {"extends": "gone.yaml", **BASE})
    with pytest.raises(BuildError) as caught:
        _definitions(path, "local")
    assert caught.value.exit_code == 2 and "no config file gone.yaml" in str(caught.value)


def test_the_shipped_micro_variants_are_the_micro_profile_but_for_their_own_keys() -> None:
    """micro_rr.yaml and micro_serial.yaml share micro.yaml's store and cells; they may differ
    in nothing but the keys they set, or their results would stop being the micro matrix's."""
    profiles = Path(__file__).resolve().parents[1] / "profiles"
    micro = load_config(profiles / "micro.yaml").model_dump()
    for name, variants in (("micro_rr", ["untuned", "rr"]), ("micro_serial", micro["ablation"]["variants"])):
        raw = yaml.safe_load((profiles / f"{name}.yaml").read_text(encoding="utf-8"))
        assert raw["extends"] == "micro.yaml" and set(raw) <= {"extends", "training", "ablation"}, name
        cfg = load_config(profiles / f"{name}.yaml").model_dump()
        assert cfg["ablation"]["variants"] == variants and cfg["training"]["options"]["cpu_threads"] == 2
        expected = merged(micro, {"ablation": {"variants": variants}, "training": {"options": {"cpu_threads": 2}}})
        assert cfg == expected, name


@pytest.mark.parametrize("command", [["plugins"], ["plugins", "--json"], ["show", "abcd1234"],
                                     ["lineage", "abcd1234"], ["audit", "tuned_model"], ["estimate"]])
@pytest.mark.parametrize("broken", ["extends", "invalid"])
def test_every_command_reports_a_broken_config_in_one_line(tmp_path: Path, command: list[str],
                                                           broken: str) -> None:
    """Not only ``mmat build``: each command that reads the config says what is wrong with it
    in one line and exits 2, without a traceback."""
    from typer.testing import CliRunner

    from mmat_assets.cli import app

    bad = {"extends": {"extends": "gone.yaml", **BASE},
           "invalid": {**BASE, "stages": {**BASE["stages"], "max_steps": "many"}}}[broken]
    path = _write(tmp_path / "mmat.yaml", bad)
    res = CliRunner().invoke(app, [*command, "--config", str(path)])
    assert isinstance(res.exception, SystemExit) and res.exit_code == 2, (res.exception, res.output)
    reason = {"extends": "no config file gone.yaml", "invalid": "stages.max_steps"}[broken]
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and reason in errors[0], res.output
    assert "Traceback" not in res.output
