"""A process that trains through Dagster Pipes with a trainer that waits, for the test that
kills this process mid-training (``tests/test_training_child.py``).

``python -m tests.pipes_parent WORKDIR``: the trainer writes its pid to ``WORKDIR/out/pid``,
then waits two minutes. No `from __future__ import annotations`: Dagster reads the context
annotation.
"""

import os
import sys
import time
from pathlib import Path
from typing import Any

import dagster as dg

from mmat_assets.contracts import NoOptions, Responder, Trainer
from mmat_assets.engine.training import run_training_pipes


class WaitingTrainer(Trainer[NoOptions]):
    """Writes its pid, then waits: the training the test's build is killed in."""

    name = "waiting"
    version = "1.0.0"
    description = "Waits two minutes (a training that outlives its build)."

    def train(self, export_dir: Path, out_dir: Path) -> dict[str, Any]:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "pid").write_text(str(os.getpid()), encoding="utf-8")
        time.sleep(120)
        return {"checkpoint": str(out_dir)}

    def responder(self, student: str, checkpoint: Path | None, max_new_tokens: int) -> Responder:
        raise NotImplementedError


def main(workdir: Path) -> None:
    @dg.asset
    def trained(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        return run_training_pipes(context, "waiting", {}, workdir, workdir / "out",
                                  trainer_class="tests.pipes_parent:WaitingTrainer").get_materialize_result()

    dg.materialize([trained], instance=dg.DagsterInstance.ephemeral())


if __name__ == "__main__":
    main(Path(sys.argv[1]))
