"""The host asks the configured trainer for its student: built, encoded for pre-flight, run.

A trainer that implements only ``train`` works: no student is built, pre-flight checks
structure only, and evaluation says plainly that this trainer's models cannot be run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from mmat_assets.assets import export as export_assets
from mmat_assets.assets import training as training_assets
from mmat_assets.config import ProjectConfig
from mmat_assets.contracts import Responder, Trainer
from mmat_assets.engine import export as ex
from mmat_assets.plugins import Implementation, Registry
from mmat_assets.resources import StorageResource
from mmat_assets.toolkit.export import Record


class OnlyTrains(Trainer):
    name = "only_trains"

    def train(self, export_dir: Path, out_dir: Path) -> dict[str, Any]:
        return {}


class Recording(OnlyTrains):
    """Answers every student question, and remembers what it was asked."""

    name = "recording"
    asked: list[tuple[str, ...]] = []

    def base_student(self, student: str, out_dir: Path) -> Path | None:
        self.asked.append(("base_student", student))
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "weights").write_text(student, encoding="utf-8")
        return out_dir

    def encoder(self, student: str, max_length: int) -> Any:
        self.asked.append(("encoder", student, str(max_length)))
        return lambda rec: {"truncated": len(rec.messages) > 2, "assistant_tokens": 1}

    def responder(self, student: str, checkpoint: Path | None, max_new_tokens: int) -> Responder:
        self.asked.append(("responder", student, str(checkpoint), str(max_new_tokens)))
        return lambda messages, images: f"{len(messages)} messages"


def registry_with(*classes: type[Trainer]) -> Registry:
    return Registry(impls={"trainer": {c.name: Implementation("trainer", c.name, c, "test", "0") for c in classes}})


def config(trainer: str, **export: Any) -> ProjectConfig:
    return ProjectConfig.model_validate({"sources": {}, "training": {"trainer": trainer}, "export": export})


def record(image: Path, turns: int) -> Record:
    messages = [{"role": "user", "content": f"{ex.IMAGE_TAG}q"}, {"role": "assistant", "content": "a"}]
    messages += [{"role": "user", "content": "more?"}, {"role": "assistant", "content": "no"}] * (turns - 1)
    return Record(f"r{turns}", "rr", messages, [str(image)])


@pytest.fixture(autouse=True)
def fresh_log() -> None:
    Recording.asked = []


def test_a_trainer_with_only_train_has_working_defaults(tmp_path: Path) -> None:
    trainer = OnlyTrains()
    assert trainer.base_student("offline", tmp_path) is None
    assert trainer.encoder("some/model", 128) is None
    with pytest.raises(NotImplementedError, match="only_trains"):
        trainer.responder("some/model", None, 8)


def test_preflight_uses_the_configured_trainers_encoder(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(b"png")
    registry = registry_with(OnlyTrains, Recording)
    encode = export_assets.encoder_for(config("recording", max_length=99), registry, "/students/base")
    assert Recording.asked == [("encoder", "/students/base", "99")]
    ok, bad = ex.preflight([record(image, 1), record(image, 2)], encode)
    assert [r.id for r in ok] == ["r1"] and [(b.id, b.reason) for b in bad] == [("r2", "truncated")]
    # a trainer without an encoder: structure only, the long record passes too
    encode = export_assets.encoder_for(config("only_trains"), registry, "/students/base")
    assert encode is None
    assert [r.id for r in ex.preflight([record(image, 2)], encode)[0]] == ["r2"]


def test_no_student_configured_asks_no_trainer() -> None:
    assert export_assets.encoder_for(config("recording", student=""), registry_with(Recording), "x") is None
    assert Recording.asked == []


def _student_base(cfg: ProjectConfig, registry: Registry, tmp_path: Path) -> dict[str, Any]:
    asset = training_assets.student_asset(cfg, registry)
    context = dg.build_asset_context()
    result = asset(context, StorageResource(root=str(tmp_path / "store")))
    return result.value


def test_the_base_student_is_built_by_the_trainer(tmp_path: Path) -> None:
    out = _student_base(config("recording", student="offline"), registry_with(Recording), tmp_path)
    assert out["built"] is True and Path(out["path"]) == tmp_path / "store" / "models" / "student-base"
    assert Recording.asked == [("base_student", "offline")]


def test_a_student_the_trainer_does_not_build_is_used_as_named(tmp_path: Path) -> None:
    out = _student_base(config("only_trains", student="org/some-vlm"), registry_with(OnlyTrains), tmp_path)
    assert out == {"path": "org/some-vlm", "built": False}


def test_evaluation_runs_the_student_through_the_trainer(tmp_path: Path) -> None:
    trainer = Recording()
    tuned = {"checkpoint": str(tmp_path / "adapter")}
    respond = training_assets._responder(trainer, {"path": "/students/base"}, tuned, 12)
    assert respond([{"role": "user", "content": "hi"}], []) == "1 messages"
    base = training_assets._responder(trainer, {"path": "/students/base"}, None, 12)
    assert base([], []) == "0 messages"
    assert Recording.asked == [("responder", "/students/base", str(tmp_path / "adapter"), "12"),
                               ("responder", "/students/base", "None", "12")]


def test_hf_lora_builds_only_the_offline_student(tmp_path: Path) -> None:
    from mmat_plugins.trainers_hf_lora import HFLoRATrainer

    assert HFLoRATrainer().base_student("org/some-vlm", tmp_path) is None
