"""Dagster assets, one module per stage (= one asset group), composed here."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import dagster as dg

from mmat_assets.assets import foundation
from mmat_assets.config import ProjectConfig, load_config
from mmat_assets.plugins import Registry, load_registry
from mmat_assets.resources import profile_resources

PROFILES = ("local", "prod")


def build_definitions(cfg: ProjectConfig, profile: str = "local", registry: Registry | None = None,
                      environ: Mapping[str, str] | None = None) -> dg.Definitions:
    """All assets, checks and the resources of ``profile`` for one project configuration."""
    environ = os.environ if environ is None else environ
    registry = registry or load_registry(environ=environ)
    assets, checks = foundation.build(cfg, registry)
    prof = cfg.profiles.get(profile)
    if prof is None:
        raise KeyError(f"profile {profile!r} is not configured (have: {sorted(cfg.profiles)})")
    endpoint = dg.EnvVar(prof.endpoint_url_env) if prof.endpoint_url_env and prof.endpoint_url_env in environ else None
    return dg.Definitions(
        assets=assets,
        asset_checks=checks,
        resources=profile_resources(cfg.profile_root(profile), endpoint),
    )


def definitions_from_file(config_path: str | Path, profile: str = "local") -> dg.Definitions:
    return build_definitions(load_config(config_path), profile)
