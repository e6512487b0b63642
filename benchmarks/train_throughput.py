"""Training throughput of the ``hf_lora`` trainer on synthetic RR records.

Writes N synthetic RR dialogues (a small PNG each) as an export, trains the student for a
bounded number of steps, and prints training tokens/s, seconds per step and peak memory
(process peak RSS on CPU, torch's peak allocation on CUDA). On a GPU it also prints the
model-FLOPs utilisation: 6 x parameters x tokens/s / peak FLOPs, with the peak read from a
table by device name or given with ``--peak-tflops``. 6N is the usual full-training count;
LoRA skips the frozen weights' gradients (about 4N), so the figure is an upper bound.

    python benchmarks/train_throughput.py                  # offline student, CPU or GPU
    python benchmarks/train_throughput.py --records 32 --steps 16 --peak-tflops 989
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

#: Dense bf16 peak TFLOP/s by a substring of the CUDA device name (first match wins).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0), ("H100", 989.0), ("GH200", 989.0), ("B200", 2250.0), ("A100", 312.0),
    ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0),
    ("RTX 4090", 165.0), ("RTX 3090", 71.0), ("V100", 125.0), ("T4", 65.0),
)
COLOURS = ((220, 20, 20), (20, 200, 20), (20, 20, 220), (230, 200, 30))
NAMES = ("red", "green", "blue", "yellow")


def synthetic_export(root: Path, n: int) -> Path:
    """``n`` RR records of realistic shape (three assistant turns, one tool round)."""
    from PIL import Image

    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        colour, name = COLOURS[i % len(COLOURS)], NAMES[i % len(NAMES)]
        Image.new("RGB", (96 + i % 7, 64), colour).save(root / "images" / f"{i}.png")
        lines.append(json.dumps({"id": f"bench-{i}", "images": [f"images/{i}.png"], "messages": rr_turns(name, i)}))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def rr_turns(name: str, i: int) -> list[dict[str, str]]:
    question = f"What colour is square number {i}? Answer the question using a single word or phrase."
    return [
        {"role": "system", "content": "You are a reasoner that may call vision tools (caption, ocr, "
                                      "label_bbox, face_detection) and web search. Reply in tag format."},
        {"role": "user", "content": f"<image>{question} Please start your reasoning."},
        {"role": "assistant", "content": "<THOUGHT>The image shows one coloured square; a caption will "
                                         "confirm its colour.</THOUGHT><OPERATOR>caption</OPERATOR><SIGNAL>continue</SIGNAL>"},
        {"role": "user", "content": f"Here are caption results from the previous step: a plain {name} square "
                                    "on a white background. Please continue your reasoning."},
        {"role": "assistant", "content": f"<THOUGHT>The caption says the square is {name}.</THOUGHT><SIGNAL>end</SIGNAL>"},
        {"role": "user", "content": f"Based on the above information, please summarize and give the answer "
                                    f"to the initial question: {question}"},
        {"role": "assistant", "content": name},
    ]


def peak_tflops(device_name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((tf for key, tf in PEAK_BF16_TFLOPS if key in device_name), None)


def report(metrics: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {"torch_threads": args.threads or torch.get_num_threads()}
    out.update({k: metrics[k] for k in ("device", "steps", "seconds", "train_tokens", "tokens_per_s",
                                   "peak_memory_mb", "final_loss", "parameters", "trainable_parameters")})
    out["seconds_per_step"] = round(metrics["seconds"] / max(metrics["steps"], 1), 3)
    if str(metrics["device"]).startswith("cuda"):
        name = torch.cuda.get_device_name()
        peak = peak_tflops(name, args.peak_tflops)
        out["gpu"] = name
        out["peak_tflops"] = peak
        if peak:
            flops = 6 * metrics["parameters"] * metrics["tokens_per_s"]
            out["mfu"] = round(flops / (peak * 1e12), 6)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=16, help="synthetic RR records")
    parser.add_argument("--steps", type=int, default=8, help="training steps (bounded run)")
    parser.add_argument("--student", default="offline", help="'offline', a local folder or a hub id")
    parser.add_argument("--cache-dir", default=None, help="where the offline student is built")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default torch's choice)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's peak bf16 TFLOP/s")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    from mmat_plugins.trainers_hf_lora import HFLoRATrainer

    options = {"student": args.student, "cache_dir": args.cache_dir, "max_steps": args.steps,
               "device": args.device, "batch_size": args.batch_size, "max_length": args.max_length,
               "log_every": max(1, args.steps // 4), "cpu_threads": args.threads}
    with tempfile.TemporaryDirectory(prefix="mmat-bench-") as tmp:
        export = synthetic_export(Path(tmp) / "export", args.records)
        metrics = HFLoRATrainer(options).train(export, Path(tmp) / "out")
    print(json.dumps(report(metrics, args), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
