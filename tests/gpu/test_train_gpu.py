"""The ``hf_lora`` trainer on CUDA with bfloat16: the same small run as on CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_lora_steps_on_cuda_bf16(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> None:
    from mmat_plugins.trainers_hf_lora import HFLoRATrainer

    from tests.test_student import build_test_student, student_cache
    from tests.test_trainer_hf_lora import COLOURS, rr_record, write_export

    student_dir = build_test_student(student_cache(request, tmp_path_factory))
    export = write_export(tmp_path_factory.mktemp("export"), [rr_record(n) for n in COLOURS])
    trainer = HFLoRATrainer({"student": str(student_dir), "max_steps": 3, "log_every": 1, "max_length": 512})
    assert trainer._use_bf16("cuda")  # bf16 is the default on CUDA
    metrics = trainer.train(export, tmp_path_factory.mktemp("out"))
    assert metrics["device"] == "cuda" and metrics["steps"] == 3
    assert all(math.isfinite(loss) for _, loss in metrics["loss_curve"])
    assert 0 < metrics["peak_memory_mb"] < torch.cuda.get_device_properties(0).total_memory / 2**20
    meta = json.loads((Path(metrics["checkpoint"]).parent / "training_meta.json").read_text(encoding="utf-8"))
    assert meta["config"]["bf16"] is None and meta["steps"] == 3


def test_reloaded_adapter_generates_on_cuda(request: pytest.FixtureRequest,
                                            tmp_path_factory: pytest.TempPathFactory) -> None:
    from mmat_plugins import trainers_hf_lora as hf
    from tests.test_student import RR_MESSAGES, build_test_student, student_cache
    from tests.test_trainer_hf_lora import COLOURS, orr_record, write_export

    student_dir = build_test_student(student_cache(request, tmp_path_factory))
    export = write_export(tmp_path_factory.mktemp("export"), [orr_record(n) for n in COLOURS])
    metrics = hf.HFLoRATrainer({"student": str(student_dir), "max_steps": 2}).train(export, tmp_path_factory.mktemp("out"))
    model, processor = hf.load_tuned_student(Path(metrics["checkpoint"]), device="cuda")
    reply = hf.generate(model, processor, RR_MESSAGES[:2], [export / "images" / "red.png"], max_new_tokens=8)
    assert isinstance(reply, str)
