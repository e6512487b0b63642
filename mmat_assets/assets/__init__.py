"""Dagster assets, one module per stage (= one asset group), composed here."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import dagster as dg

from mmat_assets.assets import ablation, export, foundation, stages, training
from mmat_assets.assets._shared import TeacherResource
from mmat_assets.assets.retrievers import build_retriever_assets
from mmat_assets.assets.tools import build_tool_assets
from mmat_assets.config import ProjectConfig
from mmat_assets.plugins import Registry, load_registry
from mmat_assets.resources import profile_resources
from mmat_assets.versions import chain_code_versions

PROFILES = ("local", "prod")

# Content-hash data versions on outputs (mmat_assets.versions) use a Dagster beta parameter
# knowingly; say so once here instead of on every materialization.
warnings.filterwarnings("ignore", message="Parameter `data_version` of initializer")


def build_definitions(cfg: ProjectConfig, profile: str = "local", registry: Registry | None = None,
                      environ: Mapping[str, str] | None = None) -> dg.Definitions:
    """All assets, checks and the resources of ``profile`` for one project configuration."""
    environ = os.environ if environ is None else environ
    registry = registry or load_registry(environ=environ)
    assets, checks = foundation.build(cfg, registry)
    assets += build_tool_assets(cfg, registry, _teachers(cfg, registry))
    assets += build_retriever_assets(cfg, registry) + stages.build(cfg, registry)
    assets += export.build(cfg, registry) + training.build(cfg, registry) + ablation.build(cfg, registry)
    assets = chain_code_versions(assets)  # a tool or prompt change shows everything downstream stale
    prof = cfg.profiles.get(profile)
    if prof is None:
        raise KeyError(f"profile {profile!r} is not configured (have: {sorted(cfg.profiles)})")
    endpoint = dg.EnvVar(prof.endpoint_url_env) if prof.endpoint_url_env and prof.endpoint_url_env in environ else None
    resources = profile_resources(cfg.profile_root(profile), endpoint)
    resources["teacher"] = teacher_resource(cfg, environ)
    from mmat_assets.deploy import deployment_jobs, run_executor  # how launched runs are sized and run

    return dg.Definitions(assets=assets, asset_checks=checks, resources=resources,
                          jobs=deployment_jobs(cfg.deployment, assets), executor=run_executor(cfg.deployment))


def teacher_resource(cfg: ProjectConfig, environ: Mapping[str, str]) -> TeacherResource:
    """The chosen teacher; its key, if its options name a key variable, through dg.EnvVar."""
    import json

    name = cfg.stages.teacher
    entry = cfg.teachers.get(name)
    plugin = (entry.plugin if entry and entry.plugin else name)
    options = dict(entry.options) if entry else {}
    key_env = options.get("api_key_env")
    key = dg.EnvVar(key_env) if key_env and key_env in environ else None
    return TeacherResource(name=name, plugin=plugin, options_json=json.dumps(options), api_key=key)


def _teachers(cfg: ProjectConfig, registry: Registry) -> dict[str, object]:
    """Configured teachers that can be created here (for tools that need one, e.g. captions)."""
    out: dict[str, object] = {}
    for name, entry in cfg.teachers.items():
        try:
            out[name] = registry.create("teacher", entry.plugin or name, entry.options, base_dir=cfg.base_dir)
        except Exception:  # a teacher that cannot be created simply offers no captions
            continue
    return out


def definitions_from_file(config_path: str | Path, profile: str = "local") -> dg.Definitions:
    """The code location's definitions. A config that cannot be read (missing, bad YAML, a value
    that fails validation, a name nothing registers) and a deployment that cannot work (a
    variable unset, its PostgreSQL or bucket missing: mmat_assets.deploy) stop the load with
    one line, the one ``mmat build`` gives: a traceback would bury the one fact needed."""
    from mmat_assets.deploy import exit_if_misconfigured
    from mmat_assets.runner import BuildError, read_config

    try:
        cfg = read_config(Path(config_path))
    except BuildError as exc:
        raise SystemExit(f"mmat: {exc}") from None
    try:
        exit_if_misconfigured(cfg, profile, os.environ)
        return build_definitions(cfg, profile)
    except KeyError as exc:  # a configured name that nothing registers, a profile not configured
        raise SystemExit(f"mmat: {config_path}: {exc.args[0] if exc.args else exc}") from None
