"""The ``hf_lora`` trainer: a few real LoRA steps on tiny RR and ORR exports, and through Pipes.

No ``from __future__ import annotations`` here: Dagster reads the asset's context annotation.
"""

import json
import math
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from mmat_assets.engine.training import run_training_pipes
from mmat_assets.plugins import load_registry
from mmat_plugins import trainers_hf_lora as hf
from mmat_plugins.trainers_hf_lora import HFLoRATrainer, RecordError
from tests.test_student import build_test_student, one_torch_thread, student_cache, write_png

pytest.importorskip("torch")
pytest.importorskip("peft")

__all__ = ["one_torch_thread"]  # an autouse fixture, imported to apply here too
PLUGIN = "mmat_plugins.trainers_hf_lora"
COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}
METRIC_KEYS = {"loss_curve", "tokens_per_s", "train_tokens", "peak_memory_mb", "steps", "seconds",
               "checkpoint", "final_loss"}


def rr_record(name: str) -> dict[str, Any]:
    return {"id": f"rr-{name}", "images": [f"images/{name}.png"], "messages": [
        {"role": "system", "content": "You reason with tools."},
        {"role": "user", "content": "<image>What colour is it? Please start your reasoning."},
        {"role": "assistant", "content": "<THOUGHT>Check it.</THOUGHT><OPERATOR>caption</OPERATOR><SIGNAL>continue</SIGNAL>"},
        {"role": "user", "content": f"Here are caption results from the previous step: {name}. Please continue your reasoning."},
        {"role": "assistant", "content": f"<THOUGHT>It is {name}.</THOUGHT><SIGNAL>end</SIGNAL>"},
        {"role": "user", "content": "Based on the above information, please summarize and give the answer to the initial question: What colour is it?"},
        {"role": "assistant", "content": name},
    ]}


def orr_record(name: str) -> dict[str, Any]:
    return {"id": f"orr-{name}", "images": [f"images/{name}.png"], "messages": [
        {"role": "system", "content": "Answer with the API outputs."},
        {"role": "user", "content": "<image>What colour is it? Use the following API outputs to help answer the question:"
                                    f"<|begin_api_invoke|>caption<|end_api_invoke|><|begin_result_of_api|>{name}<|end_result_of_api|>"},
        {"role": "assistant", "content": f"<THOUGHT>It is {name}.</THOUGHT><ANSWER>The answer is: {name}</ANSWER>"},
    ]}


def write_export(root: Path, records: list[dict[str, Any]]) -> Path:
    for name, colour in COLOURS.items():
        write_png(root / "images" / f"{name}.png", colour)
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return root


class CapturingTrainer(HFLoRATrainer):
    """Keeps the trained model in memory, to compare it with the adapter reloaded from disk."""

    trained: Any = None

    def _save(self, model: Any, *args: Any, **kwargs: Any) -> Path:
        self.trained = model
        return super()._save(model, *args, **kwargs)


@pytest.fixture(scope="module")
def student_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_student(student_cache(request, tmp_path_factory))


def options(student_dir: Path, **extra: Any) -> dict[str, Any]:
    # One CPU thread: see tests/test_student.py::one_torch_thread (the Pipes child is another process).
    return {"student": str(student_dir), "max_steps": 3, "log_every": 1, "max_length": 512, "cpu_threads": 1,
            **extra}


@pytest.fixture(scope="module", params=["rr", "orr"])
def run(request: pytest.FixtureRequest, student_dir: Path,
        tmp_path_factory: pytest.TempPathFactory) -> tuple[CapturingTrainer, dict[str, Any], Path]:
    make = rr_record if request.param == "rr" else orr_record
    export = write_export(tmp_path_factory.mktemp(f"export_{request.param}"), [make(n) for n in COLOURS])
    trainer = CapturingTrainer(options(student_dir))
    return trainer, trainer.train(export, tmp_path_factory.mktemp(f"out_{request.param}")), export


def test_registered_as_plugin() -> None:
    registry = load_registry(builtins=[PLUGIN], entry_points=False)
    assert not registry.errors
    trainer = registry.create("trainer", "hf_lora", {})
    assert trainer.options.learning_rate == 4e-5 and trainer.options.weight_decay == 0.1
    assert (trainer.options.lora_r, trainer.options.lora_alpha, trainer.options.seed) == (8, 32, 42)
    assert trainer.options.epochs == 1 and trainer.options.batch_size == 1
    with pytest.raises(ValueError):
        registry.create("trainer", "hf_lora", {"learning_rat": 1e-4})  # typos are refused


def test_metrics_and_files(run: tuple[CapturingTrainer, dict[str, Any], Path]) -> None:
    _, metrics, export = run
    assert METRIC_KEYS <= set(metrics)
    assert metrics["steps"] == 3 and [s for s, _ in metrics["loss_curve"]] == [1, 2, 3]
    assert all(math.isfinite(loss) for _, loss in metrics["loss_curve"])
    assert metrics["tokens_per_s"] > 0 and metrics["peak_memory_mb"] > 0
    checkpoint = Path(metrics["checkpoint"])
    assert (checkpoint / "adapter_config.json").is_file()
    assert (checkpoint / "adapter_model.safetensors").is_file()
    meta = json.loads((checkpoint.parent / "training_meta.json").read_text(encoding="utf-8"))
    assert meta["steps"] == 3 and meta["config"]["learning_rate"] == 4e-5
    from mmat_plugins.trainers_hf_lora import file_sha256

    assert meta["data"]["sha256"] == file_sha256(export / "train.jsonl")


def test_only_lora_weights_changed(run: tuple[CapturingTrainer, dict[str, Any], Path], student_dir: Path) -> None:
    import torch
    from safetensors.torch import load_file

    trainer, metrics, _ = run
    adapter = load_file(str(Path(metrics["checkpoint"]) / "adapter_model.safetensors"))
    assert adapter and all(".language_model." in k and "lora_" in k for k in adapter)
    # lora_B starts at zero: any non-zero value means the step moved it.
    assert any(float(v.abs().sum()) > 0 for k, v in adapter.items() if "lora_B" in k)
    base, _ = hf.load_student(str(student_dir))
    trained = {k.replace("base_model.model.", "", 1).replace(".base_layer", ""): v
               for k, v in trainer.trained.state_dict().items() if "lora_" not in k}
    original = base.state_dict()
    assert set(trained) == set(original)
    assert all(torch.equal(trained[k].cpu(), original[k]) for k in original)


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "adapter"])
def test_reloaded_adapter_gives_same_logits(run: tuple[CapturingTrainer, dict[str, Any], Path], merge: bool) -> None:
    import torch

    trainer, metrics, export = run
    reloaded, processor = hf.load_tuned_student(Path(metrics["checkpoint"]), merge=merge)
    assert any("lora_" in name for name, _ in reloaded.named_parameters()) is not merge
    record = json.loads((export / "train.jsonl").read_text(encoding="utf-8").splitlines()[0])
    batch = hf.model_inputs(hf.encode_record(processor, record, 512, image_root=export))
    with torch.no_grad():
        want = trainer.trained.eval()(**batch).logits
        got = reloaded(**batch).logits
    # Folding the adapter into the weights reorders float sums: ~1e-4 on logits of ~30.
    assert torch.allclose(want, got, atol=1e-3 if merge else 1e-5)
    assert torch.equal(want.argmax(-1), got.argmax(-1))  # greedy decoding picks the same tokens


def test_bad_record_stops_the_run_by_name(student_dir: Path, tmp_path: Path) -> None:
    bad = rr_record("red")
    bad["images"] = []  # one <image> placeholder, no image
    export = write_export(tmp_path / "export", [rr_record("green"), bad])
    trainer = HFLoRATrainer(options(student_dir, max_steps=2))
    with pytest.raises(RecordError, match=r"train.jsonl line 2 \(id rr-red\).*1 <image> placeholders for 0"):
        trainer.train(export, tmp_path / "out")


def test_truncation_stops_the_run(student_dir: Path, tmp_path: Path) -> None:
    export = write_export(tmp_path / "export", [rr_record("red")])
    trainer = HFLoRATrainer(options(student_dir, max_length=12))
    with pytest.raises(RecordError, match="cuts into or before its image tokens"):
        trainer.train(export, tmp_path / "out")


@pytest.mark.slow
def test_training_through_dagster_pipes(student_dir: Path, tmp_path: Path) -> None:
    export = write_export(tmp_path / "export", [orr_record(n) for n in COLOURS])

    @dg.asset
    def tuned_model(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        return run_training_pipes(context, "hf_lora", options(student_dir, max_steps=2), export,
                                  tmp_path / "out", plugins=[PLUGIN]).get_materialize_result()

    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([tuned_model], instance=instance)
    assert result.success
    metadata: dict[str, Any] = dict(result.asset_materializations_for_node("tuned_model")[0].metadata)
    curve = metadata["loss_curve"].value["points"]
    assert [step for step, _ in curve] == [1, 2] and all(math.isfinite(loss) for _, loss in curve)
    assert Path(metadata["checkpoint"].value, "adapter_model.safetensors").is_file()
    assert metadata["steps"].value == 2 and metadata["tokens_per_s"].value > 0
    messages = [e.user_message for e in instance.all_logs(result.run_id)]
    assert any("step 2/2 loss" in m for m in messages)  # the trainer's log reached the run


def test_collate_pads_and_keeps_image_tensors(student_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoProcessor

    from mmat_plugins.trainers_hf_lora import collate, pad_id

    export = write_export(tmp_path, [])
    processor = AutoProcessor.from_pretrained(str(student_dir))
    text_only = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    encoded = [hf.encode_record(processor, r, 512, image_root=export) for r in (text_only, orr_record("red"))]
    batch = collate(encoded, pad_id(processor), "cpu")
    width = max(len(e["input_ids"]) for e in encoded)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, width)
    short = len(encoded[0]["input_ids"])
    assert batch["attention_mask"][0, short:].sum() == 0 and (batch["labels"][0, short:] == hf.IGNORE).all()
    assert batch["pixel_values"].shape[0] == 1  # the text-only record adds no image


def tiny_idefics3(folder: Path) -> Path:
    """A randomly initialised Idefics3 (SmolVLM's family) with the SmolLM2 tokenizer, built offline."""
    from transformers import AutoTokenizer, Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    from tests.smollm2_server import convert

    images = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                       do_image_splitting=False)
    # image_seq_len = (32 px / 8 px patches)^2 / scale_factor^2 = 4
    processor = Idefics3Processor(image_processor=images, tokenizer=AutoTokenizer.from_pretrained(convert()),
                                  image_seq_len=4, chat_template=hf.CHAT_TEMPLATE)
    tok = processor.tokenizer
    config = Idefics3Config(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        text_config={"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": len(tok)},
        image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=2)
    Idefics3ForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_another_family_through_the_auto_classes(tmp_path: Path) -> None:
    student = tiny_idefics3(tmp_path / "idefics3")
    export = write_export(tmp_path / "export", [orr_record("red")])
    _, processor = hf.load_student(str(student))
    enc = hf.encode_record(processor, orr_record("red"), 512, image_root=export)
    assert enc["n_image_tokens"] == 4
    assert processor.tokenizer.decode(enc["input_ids"][enc["labels"] != hf.IGNORE]).endswith(
        "<ANSWER>The answer is: red</ANSWER><|im_end|>")
    metrics = HFLoRATrainer({"student": str(student), "max_steps": 1, "log_every": 1}).train(export, tmp_path / "out")
    assert metrics["steps"] == 1 and math.isfinite(metrics["final_loss"])
    from safetensors.torch import load_file

    adapter = load_file(str(Path(metrics["checkpoint"]) / "adapter_model.safetensors"))
    assert adapter and all(".text_model." in k for k in adapter)  # the language model only
