"""Launch a trainer plugin out of process through Dagster Pipes.

The ``tuned_model`` asset calls :func:`run_training_pipes`; the child process
(:mod:`mmat_assets.pipes.train`) loads the trainer from the plugin registry, trains, and
reports the loss curve, throughput, peak memory and checkpoint path as the asset's
materialization metadata.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PIPES_MODULE = "mmat_assets.pipes.train"


def training_extras(trainer: str, options: Mapping[str, Any], export_dir: Path | str,
                    out_dir: Path | str, plugins: Sequence[str] | None = None,
                    base_dir: Path | str | None = None, trainer_class: str | None = None) -> dict[str, Any]:
    """The request the child process reads from the Pipes extras (paths made absolute).

    ``trainer_class`` is the trainer's ``module:qualname``
    (:func:`mmat_assets.plugins.class_ref`): the child imports it, so any trainer the host
    has registered, a plugin object included, trains there. Without it the child looks
    ``trainer`` up in its own registry, loading the modules ``plugins`` names (default: the
    host's list plus entry points). ``base_dir`` is the trainer's (the config file's directory).
    """
    extras = {"trainer": trainer, "options": dict(options),
              "export_dir": str(Path(export_dir).resolve()), "out_dir": str(Path(out_dir).resolve()),
              "base_dir": str(Path(base_dir or Path.cwd()).resolve())}
    if plugins is not None:
        extras["plugins"] = list(plugins)
    if trainer_class is not None:
        extras["trainer_class"] = trainer_class
    return extras


def run_training_pipes(context: Any, trainer: str, options: Mapping[str, Any], export_dir: Path | str,
                       out_dir: Path | str, env: Mapping[str, str] | None = None,
                       plugins: Sequence[str] | None = None, base_dir: Path | str | None = None,
                       trainer_class: str | None = None) -> Any:
    """Train in a subprocess with Dagster Pipes; returns the completed invocation.

    An asset finishes with ``return run_training_pipes(...).get_materialize_result()``.
    ``env`` adds variables for the child (``CUDA_VISIBLE_DEVICES``, cache locations, ...).
    """
    import dagster as dg

    client = dg.PipesSubprocessClient()
    extras = training_extras(trainer, options, export_dir, out_dir, plugins, base_dir, trainer_class)
    return client.run(command=[sys.executable, "-m", PIPES_MODULE], context=context, extras=extras,
                      env=dict(env or {}))
