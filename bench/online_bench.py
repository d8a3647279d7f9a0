"""Wall-clock cost of the online mode (Algorithm 1) against plain SFT on the same data and steps.

Both arms train the same LoRA on the same rows for the same number of optimizer steps, interleaved repetitions in
one process (this machine is noisy: compare ratios, not absolute times). The paper's per-sample loop costs 1.5×.

    python bench/online_bench.py                    # a SmolLM2-135M-shaped random model, 2 steps of 16 rows
    python bench/online_bench.py --long             # 3 steps
    python bench/online_bench.py --shape tiny       # seconds, for a smoke run
    python bench/online_bench.py --update recompute # the second-forward-and-backward update
    python bench/online_bench.py --nproc 2          # two DDP ranks (torchrun, gloo on CPU), the same global batch

Last line: `online_vs_plain=X` (online time / plain time; lower is better), or with `--nproc N > 1`
`online_ddp_vs_plain_ddp=X` (both arms under N data-parallel ranks, the online arm selecting from the global batch).
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/sizes.py, also when imported from elsewhere

import datasets  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from gradsift.config import GradSiftConfig, ScoringConfig, SelectionConfig  # noqa: E402
from gradsift.hardware import machine_line, native_bf16  # noqa: E402
from gradsift.integrations.trl import GradSiftSFTTrainer  # noqa: E402
from gradsift.models import attach_lora  # noqa: E402
from sizes import add_sizes, fill_sizes  # noqa: E402

from conftest import build_tokenizer  # noqa: E402

SHAPES = {
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
    "smollm2": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3
    ),
}
# {option: (default, --long, type, help)}: the default finishes within 5 minutes on a 2-core AVX2 CPU.
SIZES = {
    "batch_size": (16, 16, int, "rows per optimizer step, across all processes"),
    "steps": (2, 3, int, "optimizer steps per run"),
    "reps": (2, 2, int, "repetitions of each arm, interleaved"),
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


def run(arm: str, shape: str, tokenizer, dataset, batch_size: int, steps: int, update: str = "auto") -> tuple:
    """(seconds, whether the online arm reused the scoring pass's gradients) of one training run; `batch_size` is the
    global batch, split among the data-parallel ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    with tempfile.TemporaryDirectory() as out:
        args = sft_config(out, batch_size // world, steps, world)
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
        return time.perf_counter() - start, getattr(trainer, "gradsift_reuse", None)


def sft_config(out: str, per_device_batch: int, steps: int, world: int = 1) -> SFTConfig:
    """Both arms' training settings: on the CPU, bfloat16 autocast (TRL's default) only where the CPU computes
    bfloat16 natively (`gradsift.hardware.native_bf16`), else float32."""
    return SFTConfig(
        output_dir=out,
        per_device_train_batch_size=per_device_batch,
        ddp_backend="gloo" if world > 1 else None,
        max_steps=steps,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=native_bf16("cpu"),
        gradient_checkpointing=False,
        max_length=256,
        logging_steps=steps,
        disable_tqdm=True,
        seed=0,
    )


def relaunch(nproc: int) -> int:
    """Run this script again as `nproc` torchrun ranks, the cores shared among them; return their exit status."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = max(1, (os.cpu_count() or 1) // nproc)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    own = [arg for i, arg in enumerate(sys.argv[1:]) if not _is_nproc(sys.argv[1:], i)]  # torchrun would read it
    command += ["--master_port", str(port), str(Path(__file__).resolve()), *own]
    return subprocess.call(command, env=env)


def _is_nproc(args: list[str], i: int) -> bool:
    """Whether `args[i]` is `--nproc`, its value, or `--nproc=N`."""
    return args[i] == "--nproc" or args[i].startswith("--nproc=") or (i > 0 and args[i - 1] == "--nproc")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    add_sizes(parser, SIZES)
    parser.add_argument(
        "--update", choices=["auto", "reuse", "recompute"], default="auto", help="the online arm's `online.update`"
    )
    parser.add_argument(
        "--nproc", type=int, default=1, help="data-parallel processes (torchrun, gloo); the global batch is split"
    )
    args = fill_sizes(parser.parse_args(), SIZES)
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        raise SystemExit(relaunch(args.nproc))
    world, main_rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")) == 0
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} does not split among {world} processes")
    tokenizer = build_tokenizer()
    dataset = rows(args.batch_size * args.steps)
    times: dict[str, list[float]] = {"plain": [], "online": []}
    reused = None
    for rep in range(args.reps):
        for arm in ("plain", "online") if rep % 2 == 0 else ("online", "plain"):
            seconds, reuse = run(arm, args.shape, tokenizer, dataset, args.batch_size, args.steps, args.update)
            times[arm].append(seconds)
            reused = reuse if arm == "online" else reused
            if main_rank:
                print(
                    f"rep {rep} {arm:6s} {seconds:7.2f} s  ({args.steps} steps of {args.batch_size} rows)", flush=True
                )
    if not main_rank:
        return
    plain, online = min(times["plain"]), min(times["online"])
    precision = "bf16 autocast" if native_bf16("cpu") else "float32"
    print(
        f"{machine_line()}, {precision}: shape={args.shape} "
        f"update={args.update} (reuse chosen: {reused}) processes={world} torch_threads={torch.get_num_threads()} "
        f"best plain {plain:.2f} s, online {online:.2f} s"
    )
    print(f"{'online_ddp_vs_plain_ddp' if world > 1 else 'online_vs_plain'}={online / plain:.3f}")


if __name__ == "__main__":
    main()
