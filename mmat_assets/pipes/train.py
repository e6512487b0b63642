"""Train a student in its own process and report back through Dagster Pipes.

Launched by :func:`mmat_assets.engine.training.run_training_pipes` as
``python -m mmat_assets.pipes.train``; reads ``{"trainer", "options", "export_dir",
"out_dir"}`` from the Pipes extras, trains through the registered trainer plugin, streams
the trainer's log lines to Dagster and reports the metrics as materialization metadata.
A separate process keeps the model's memory out of the Dagster run worker, and lets the
same command run wherever the accelerator is.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dagster_pipes import PipesContext, open_dagster_pipes

REQUIRED = ("trainer", "export_dir", "out_dir")


class PipesLogHandler(logging.Handler):
    """Forwards log records to the Pipes context, so they show in the Dagster run's logs."""

    def __init__(self, context: PipesContext) -> None:
        super().__init__(logging.INFO)
        self.context = context

    def emit(self, record: logging.LogRecord) -> None:
        message = self.format(record)
        if record.levelno >= logging.WARNING:
            self.context.log.warning(message)
        else:
            self.context.log.info(message)


def materialization_metadata(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Trainer metrics as Pipes metadata; the loss curve travels as JSON."""
    curve = metrics.get("loss_curve") or []
    return {
        "loss_curve": {"raw_value": {"points": curve}, "type": "json"},
        "final_loss": {"raw_value": float(metrics["final_loss"]), "type": "float"},
        "tokens_per_s": {"raw_value": float(metrics.get("tokens_per_s", 0.0)), "type": "float"},
        "train_tokens": {"raw_value": int(metrics.get("train_tokens", 0)), "type": "int"},
        "peak_memory_mb": {"raw_value": float(metrics.get("peak_memory_mb", 0.0)), "type": "float"},
        "steps": {"raw_value": int(metrics.get("steps", 0)), "type": "int"},
        "seconds": {"raw_value": float(metrics.get("seconds", 0.0)), "type": "float"},
        "checkpoint": {"raw_value": str(metrics.get("checkpoint", "")), "type": "path"},
    }


def train(extras: Mapping[str, Any]) -> dict[str, Any]:
    """Run the named trainer on the export; the plugin registry is loaded in this process."""
    from mmat_assets.plugins import load_registry

    missing = [k for k in REQUIRED if not extras.get(k)]
    if missing:
        raise ValueError(f"pipes extras lack {', '.join(missing)}")
    # A caller may name the plugin modules to load (tests, a locked-down deployment);
    # otherwise the child sees the same built-ins and entry points as the host.
    plugins = extras.get("plugins")
    registry = load_registry(builtins=plugins) if plugins else load_registry()
    trainer = registry.create("trainer", str(extras["trainer"]), extras.get("options") or {},
                              base_dir=extras.get("base_dir"))
    ok = trainer.availability()
    if not ok.ok:
        raise RuntimeError(f"trainer {extras['trainer']!r} cannot run here: {ok.reason}")
    return dict(trainer.train(Path(extras["export_dir"]), Path(extras["out_dir"])))


def main() -> None:
    with open_dagster_pipes() as context:
        handler = PipesLogHandler(context)
        logger = logging.getLogger("mmat")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            context.log.info(f"training request: {json.dumps(dict(context.extras), default=str)}")
            metrics = train(context.extras)
        finally:
            logger.removeHandler(handler)
        context.report_asset_materialization(metadata=materialization_metadata(metrics))


if __name__ == "__main__":
    main()
