"""Wall-clock cost of the online mode (Algorithm 1) against plain SFT on the same data and steps.

Both arms train the same LoRA on the same rows for the same number of optimizer steps, interleaved repetitions in
one process (this machine is noisy: compare ratios, not absolute times). The paper's per-sample loop costs 1.5×.

    python bench/online_bench.py                    # a SmolLM2-135M-shaped random model, 16 rows per step
    python bench/online_bench.py --shape tiny       # seconds, for a smoke run
    python bench/online_bench.py --update recompute # the second-forward-and-backward update

Last line: `online_vs_plain=X` (online time / plain time; lower is better).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import datasets  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from gradsift.config import GradSiftConfig, ScoringConfig, SelectionConfig  # noqa: E402
from gradsift.integrations.trl import GradSiftSFTTrainer  # noqa: E402
from gradsift.models import attach_lora  # noqa: E402

from conftest import build_tokenizer  # noqa: E402

SHAPES = {
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
    "smollm2": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3
    ),
}
WORDS = "the sea grey waves fold over time keeps its own answer question capital france paris yes no eight".split()


def build(shape: str, tokenizer, seed: int = 0):
    torch.manual_seed(seed)
    vocab = 49152 if shape == "smollm2" else 512
    config = LlamaConfig(
        vocab_size=vocab,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **SHAPES[shape],
    )
    return attach_lora(LlamaForCausalLM(config), ScoringConfig(lora_r=16, lora_alpha=32))


def rows(n: int, seed: int = 0) -> datasets.Dataset:
    rng = random.Random(seed)
    data = []
    for _ in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 30)))
        completion = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 90)))
        data.append({"prompt": prompt + "?", "completion": " " + completion})
    return datasets.Dataset.from_list(data)


def run(arm: str, shape: str, tokenizer, dataset, batch_size: int, steps: int, update: str = "auto") -> float:
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out,
            per_device_train_batch_size=batch_size,
            max_steps=steps,
            report_to="none",
            save_strategy="no",
            use_cpu=True,
            gradient_checkpointing=False,
            max_length=256,
            logging_steps=steps,
            disable_tqdm=True,
            seed=0,
        )
        common = dict(model=build(shape, tokenizer), args=args, train_dataset=dataset, processing_class=tokenizer)
        if arm == "online":
            config = GradSiftConfig(
                mode="online",
                selection=SelectionConfig(keep_fraction=0.2),
                online={"log_file": None, "update": update},
            )
            trainer = GradSiftSFTTrainer(**common, gradsift_config=config)
        else:
            trainer = SFTTrainer(**common)
        start = time.perf_counter()
        trainer.train()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument(
        "--update", choices=["auto", "reuse", "recompute"], default="auto", help="the online arm's `online.update`"
    )
    args = parser.parse_args()
    tokenizer = build_tokenizer()
    dataset = rows(args.batch_size * args.steps)
    times = {"plain": [], "online": []}
    for rep in range(args.reps):
        for arm in ("plain", "online") if rep % 2 == 0 else ("online", "plain"):
            seconds = run(arm, args.shape, tokenizer, dataset, args.batch_size, args.steps, args.update)
            times[arm].append(seconds)
            print(f"rep {rep} {arm:6s} {seconds:7.2f} s  ({args.steps} steps of {args.batch_size} rows)", flush=True)
    plain, online = min(times["plain"]), min(times["online"])
    print(
        f"shape={args.shape} update={args.update} torch_threads={torch.get_num_threads()} "
        f"best plain {plain:.2f} s, online {online:.2f} s"
    )
    print(f"online_vs_plain={online / plain:.3f}")


if __name__ == "__main__":
    main()
