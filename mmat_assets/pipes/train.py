"""Train a student in its own process and report back through Dagster Pipes.

Launched by :func:`mmat_assets.engine.training.run_training_pipes` as
``python -m mmat_assets.pipes.train``; reads ``{"trainer", "trainer_class", "options",
"export_dir", "out_dir", "base_dir"}`` from the Pipes extras, trains with the trainer plugin, streams
the trainer's log lines to Dagster and reports the metrics as materialization metadata.
A separate process keeps the model's memory out of the Dagster run worker, and lets the
same command run wherever the accelerator is.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from dagster_pipes import PipesContext, open_dagster_pipes

from mmat_assets.contracts import Trainer

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


#: Metrics reported as typed metadata, with their Pipes type and conversion. The contract
#: requires none of them: a trainer reports what it measures, and only that is shown.
METRIC_TYPES: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "final_loss": ("float", float), "tokens_per_s": ("float", float), "train_tokens": ("int", int),
    "peak_memory_mb": ("float", float), "steps": ("int", int), "seconds": ("float", float),
    "checkpoint": ("path", str),
}


def materialization_metadata(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Trainer metrics as Pipes metadata; the loss curve travels as JSON."""
    out: dict[str, Any] = {"loss_curve": {"raw_value": {"points": metrics.get("loss_curve") or []}, "type": "json"}}
    for key, (kind, convert) in METRIC_TYPES.items():
        if metrics.get(key) is not None:
            out[key] = {"raw_value": convert(metrics[key]), "type": kind}
    return out


def trainer_class(extras: Mapping[str, Any]) -> type[Trainer[Any]]:
    """The trainer class the host named: imported from its ``module:qualname`` reference
    (``trainer_class``), so a plugin the host registered as an object is found here too;
    without one, looked up by name in this process's plugin registry."""
    name = str(extras["trainer"])
    ref = extras.get("trainer_class")
    cls = _imported(str(ref)) if ref else _registered(name, extras.get("plugins"))
    if not (isinstance(cls, type) and issubclass(cls, Trainer) and getattr(cls, "name", None) == name):
        raise TypeError(f"{ref or name} is not the Trainer named {name!r}")
    return cls


def _imported(ref: str) -> object:
    module, _, qualname = ref.partition(":")
    obj: object = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _registered(name: str, plugins: list[str] | None) -> object:
    from mmat_assets.plugins import load_registry

    # A caller may name the plugin modules to load (tests, a locked-down deployment);
    # otherwise the child sees the same built-ins and entry points as the host.
    registry = load_registry(builtins=plugins) if plugins else load_registry()
    return registry.get("trainer", name).cls


def train(extras: Mapping[str, Any]) -> dict[str, Any]:
    """Run the named trainer on the export."""
    from mmat_assets.plugins import create

    missing = [k for k in REQUIRED if not extras.get(k)]
    if missing:
        raise ValueError(f"pipes extras lack {', '.join(missing)}")
    trainer = create(trainer_class(extras), extras.get("options") or {}, base_dir=extras.get("base_dir"))
    ok = trainer.availability()
    if not ok.ok:
        raise RuntimeError(f"trainer {extras['trainer']!r} cannot run here: {ok.reason}")
    return dict(trainer.train(Path(extras["export_dir"]), Path(extras["out_dir"])))


def exit_with_parent(every_s: float = 0.5) -> None:
    """End this process once the one that launched it is gone. A build killed while it trains
    (SIGKILL leaves no time to stop anything) must not leave the training running: it would
    hold the CPU or accelerator, and write its checkpoint beside the rerun's."""
    parent = os.getppid()
    if parent <= 1:  # started by init or a container's entrypoint: nothing to watch
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        sys.stderr.write(f"mmat training: the process that started it ({parent}) is gone; stopping\n")
        sys.stderr.flush()
        os._exit(1)

    threading.Thread(target=watch, name="mmat-parent-watch", daemon=True).start()


def main() -> None:
    exit_with_parent()
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
