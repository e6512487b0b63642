"""The offline student: image tokens, the loss mask, truncation diagnostics, generation.

The student (LLaVA = SmolLM2-135M-Instruct + a tiny vision tower) is built once per
machine into the pytest cache and reused by every test module that needs it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mmat_plugins import trainers_hf_lora as hf

pytest.importorskip("torch")
pytest.importorskip("transformers")

IMAGE_SIZE = 64
CACHE_KEY = "mmat-offline-student"

SYSTEM = "You reason step by step and may call tools."
RR_MESSAGES: list[dict[str, str]] = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "<image>What colour is the square? Please start your reasoning."},
    {"role": "assistant", "content": "<THOUGHT>I should look closer.</THOUGHT><OPERATOR>caption</OPERATOR><SIGNAL>continue</SIGNAL>"},
    {"role": "user", "content": "Here are caption results from the previous step: a red square. Please continue your reasoning."},
    {"role": "assistant", "content": "<THOUGHT>The caption says red.</THOUGHT><SIGNAL>end</SIGNAL>"},
    {"role": "user", "content": "Based on the above information, please summarize and give the answer to the initial question: What colour is the square?"},
    {"role": "assistant", "content": "red"},
]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """On a small CPU shared with other busy processes, two torch threads run many times slower than one."""
    from mmat_plugins.trainers_hf_lora import torch_threads

    with torch_threads(1):
        yield


def build_test_student(cache: Path) -> Path:
    """The offline student in ``cache``, built from the SmolLM2 folder the teacher tests convert."""
    from tests.smollm2_server import SmolLM2Unavailable, convert

    folder = hf.offline_student_dir(cache, IMAGE_SIZE, 42)
    if hf.is_built(folder, IMAGE_SIZE, 42):
        return folder
    try:
        language_model = convert()
    except SmolLM2Unavailable as exc:
        pytest.skip(str(exc))
    return hf.build_offline_student(folder, IMAGE_SIZE, 42, language_model=language_model)


def write_png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (48, 32)) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def student_cache(request: pytest.FixtureRequest, tmp: pytest.TempPathFactory) -> Path:
    """The pytest cache keeps the student between runs; without it, this session's tmp does."""
    cache = getattr(request.config, "cache", None)
    return Path(cache.mkdir(CACHE_KEY)) if cache is not None else tmp.getbasetemp() / CACHE_KEY


@pytest.fixture(scope="module")
def student(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Path]:
    folder = build_test_student(student_cache(request, tmp_path_factory))
    model, processor = hf.load_student(str(folder))
    return model.eval(), processor, folder


@pytest.fixture(scope="module")
def red(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_png(tmp_path_factory.mktemp("img") / "red.png", (220, 20, 20))


def label_runs(enc: dict[str, Any]) -> list[list[int]]:
    """Consecutive runs of label ids that count for the loss."""
    runs: list[list[int]] = []
    prev = False
    for label in enc["labels"].tolist():
        on = label != hf.IGNORE
        if on and not prev:
            runs.append([])
        if on:
            runs[-1].append(label)
        prev = on
    return runs


def test_build_is_recorded_and_reused(student: tuple[Any, Any, Path]) -> None:
    _, processor, folder = student
    info = json.loads((folder / hf.BUILD_INFO).read_text(encoding="utf-8"))
    assert info["image_size"] == IMAGE_SIZE and info["seed"] == 42 and info["build_seconds"] > 0
    assert hf.build_offline_student(folder, IMAGE_SIZE, 42) == folder  # a cache hit, no rebuild
    # The PIL image processor: the default back-end would need torchvision.
    assert type(processor.image_processor).__name__ == "CLIPImageProcessorPil"


@pytest.mark.parametrize("n_images", [1, 2])
def test_image_tokens_match_vision_patches(student: tuple[Any, Any, Path], red: Path, n_images: int) -> None:
    import torch

    model, processor, _ = student
    messages = [{"role": "user", "content": "<image>" * n_images + "Describe."},
                {"role": "assistant", "content": "A red square."}]
    enc = hf.encode_record(processor, {"messages": messages, "images": [str(red)] * n_images}, 512)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=enc["pixel_values"]).pooler_output
    patches = sum(int(f.shape[0]) for f in features)
    assert patches == (IMAGE_SIZE // 16) ** 2 * n_images
    assert enc["n_image_tokens"] == patches
    assert enc["n_image_placeholders"] == enc["n_images"] == n_images
    with torch.no_grad():  # the model itself checks tokens against features
        assert torch.isfinite(model(**hf.model_inputs(enc)).loss)


@pytest.mark.parametrize("messages", [RR_MESSAGES, RR_MESSAGES[:3]], ids=["rr", "one_turn"])
def test_labels_cover_assistant_turns_only(student: tuple[Any, Any, Path], red: Path,
                                           messages: list[dict[str, str]]) -> None:
    _, processor, _ = student
    enc = hf.encode_record(processor, {"messages": messages, "images": [str(red)]}, 2048)
    assistant = [m["content"] for m in messages if m["role"] == "assistant"]
    decoded = [processor.tokenizer.decode(run) for run in label_runs(enc)]
    assert decoded == [text + "<|im_end|>" for text in assistant]
    assert enc["assistant_tokens"] == sum(len(run) for run in label_runs(enc))
    # Every other token (system, user, image, role headers) is ignored by the loss.
    ignored = enc["input_ids"][enc["labels"] == hf.IGNORE]
    text = processor.tokenizer.decode(ignored)
    users = [m["content"].replace("<image>", "") for m in messages if m["role"] != "assistant"]
    assert all(u in text for u in users)
    assert not any(a in text for a in assistant if "<THOUGHT>" in a)  # the bare answer also sits in a user turn


def test_truncation_is_reported(student: tuple[Any, Any, Path], red: Path) -> None:
    _, processor, _ = student
    record = {"messages": RR_MESSAGES, "images": [str(red)]}
    full = hf.encode_record(processor, record, 4096)
    first_image = int((full["input_ids"] == hf.image_token_id(processor)).nonzero()[0])
    assert not full["truncated"] and not full["truncated_through_image"]

    before = hf.encode_record(processor, record, first_image)  # cut before the image tokens
    inside = hf.encode_record(processor, record, first_image + 3)  # cut inside them
    after = hf.encode_record(processor, record, full["length"] - 5)  # cut in the last answer
    assert before["truncated_through_image"] and inside["truncated_through_image"]
    assert after["truncated"] and not after["truncated_through_image"]
    assert len(after["input_ids"]) == full["length"] - 5
    assert after["assistant_tokens"] < full["assistant_tokens"]


def test_placeholder_count_must_match_images(student: tuple[Any, Any, Path], red: Path) -> None:
    _, processor, _ = student
    with pytest.raises(hf.RecordError, match="1 <image> placeholders for 2 images"):
        hf.encode_record(processor, {"messages": RR_MESSAGES, "images": [str(red), str(red)]}, 2048)


def test_generate_returns_text(student: tuple[Any, Any, Path], red: Path) -> None:
    model, processor, _ = student
    reply = hf.generate(model, processor, RR_MESSAGES[:2], [str(red)], max_new_tokens=8)
    assert isinstance(reply, str)
