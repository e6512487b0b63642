"""Batched generation of a tuned student, adapter merged vs kept apart.

The evaluation generates every step of every held-out problem with the tuned student. This
trains the offline student for a few steps on synthetic RR records (as
``benchmarks/train_throughput.py`` does), then times ``generate_batch`` on the same batch of
RR prompts with the checkpoint loaded two ways, in alternating rounds of the same run:
``merge=False`` (the ``PeftModel``, the adapter's products on every layer at every token)
and ``merge=True`` (the adapter folded into the weights, what evaluation uses). It prints
the seconds per batch of each, the ratio, and how many replies the two agree on (greedy
decoding; float rounding may flip a rare token).

    python benchmarks/eval_generation.py                       # 16 prompts, 64 new tokens, 3 rounds
    python benchmarks/eval_generation.py --batch 8 --new-tokens 128 --threads 2
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import synthetic_export  # noqa: E402


def prompts(export: Path, n: int) -> list[tuple[list[dict[str, str]], list[str]]]:
    """The first ``n`` records cut before their first assistant turn: step-one prompts."""
    out = []
    for line in (export / "train.jsonl").read_text(encoding="utf-8").splitlines()[:n]:
        record = json.loads(line)
        out.append((record["messages"][:2], [str(export / p) for p in record["images"]]))
    return out


def timed(responder: Any, batch: list[Any], new_tokens: int) -> tuple[float, list[str]]:
    start = time.perf_counter()
    replies = responder.generate_batch(batch, new_tokens)
    return time.perf_counter() - start, [r.text for r in replies]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16, help="prompts generated together")
    parser.add_argument("--new-tokens", type=int, default=64, help="max_new_tokens of each reply")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of each way")
    parser.add_argument("--train-steps", type=int, default=4, help="steps that give the adapter its weights")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default torch's choice)")
    parser.add_argument("--cache-dir", default=None, help="where the offline student is built")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    from mmat_plugins import trainers_hf_lora as hf

    options = {"student": "offline", "cache_dir": args.cache_dir, "max_steps": args.train_steps,
               "learning_rate": 1e-2, "log_every": args.train_steps, "cpu_threads": args.threads}
    with tempfile.TemporaryDirectory(prefix="mmat-bench-") as tmp:
        export = synthetic_export(Path(tmp) / "export", max(args.batch, 4))
        metrics = hf.HFLoRATrainer(options).train(export, Path(tmp) / "out")
        checkpoint = Path(metrics["checkpoint"])
        batch = prompts(export, args.batch)
        ways = {}
        for merge in (False, True):
            model, processor = hf.load_tuned_student(checkpoint, merge=merge)
            ways["merged" if merge else "adapter"] = hf.StudentResponder(model, processor, args.new_tokens, args.threads)
        for responder in ways.values():  # warm-up: first calls pay one-off allocation
            timed(responder, batch[:2], 4)
        seconds: dict[str, list[float]] = {name: [] for name in ways}
        texts: dict[str, list[str]] = {}
        for _ in range(args.rounds):
            for name, responder in ways.items():
                s, texts[name] = timed(responder, batch, args.new_tokens)
                seconds[name].append(s)
    adapter, merged = statistics.median(seconds["adapter"]), statistics.median(seconds["merged"])
    same = sum(a == b for a, b in zip(texts["adapter"], texts["merged"], strict=True))
    print(json.dumps({
        "batch": args.batch, "new_tokens": args.new_tokens, "rounds": args.rounds,
        "adapter_s_per_batch": round(adapter, 3), "merged_s_per_batch": round(merged, 3),
        "speedup": round(adapter / merged, 3), "same_replies": f"{same}/{len(batch)}",
        "all_seconds": {k: [round(x, 3) for x in v] for k, v in seconds.items()},
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
