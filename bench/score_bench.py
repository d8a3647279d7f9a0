"""Scoring cost against the batch-size-1 loop and a plain training-style forward+backward, on the same samples.

Three methods, each in its own fresh process (so its peak memory is its own) after an untimed warm-up on the first
batch of rows, repetitions interleaved in one run:

- `loop`: gradsift's reference, one sample at a time (`scoring.method: loop`);
- `batched`: gradsift's batched hook scoring with its own batching (length-sorted, token budget);
- `plain`: what a training epoch computes: shuffled padded batches of the same size, full logits, the model's own
  loss, one backward, no hooks.

Models: a tiny Llama and a SmolLM2-135M-shaped random Llama (fp32, CPU, LoRA r=16 on every linear layer), samples
of 40–120 tokens with the loss on the second half. gradsift sorts the rows of a whole scoring run by length before
batching, so its padding shrinks as rows are added: 23% of the real tokens at 32 rows, 5.6% at 128, 2.7% at 256 and
1–2% for a real dataset of thousands of rows. The plain step's shuffled batches pad about 45% at any count. The
default, 48 rows (about 18% padding) of one repetition, finishes within 5 minutes on a 2-core AVX2 CPU (each method's
fresh process costs about 20 s to start there); `--long`, 128 rows and 2 repetitions, has padding closer to a real
run's and shows the noise, so its `batched_vs_*` ratios are the fairer ones.

Ratios are time(other) / time(batched): above 1 means batched scoring is faster. This machine is noisy: compare
ratios from one run, not absolute times.

    python bench/score_bench.py                  # the SmolLM2-shaped model, 48 samples, 16 per batch, 1 repetition
    python bench/score_bench.py --long           # both models, 128 samples, 2 interleaved repetitions
    python bench/score_bench.py --shapes tiny    # seconds, for a smoke run

Last line (the SmolLM2-shaped model): `batched_vs_plain=X batched_vs_loop=Y mem_vs_plain=Z`.

`--methods batched,anchor` times the safety-anchor score against the norm alone: `anchor` is batched scoring with
`anchor_dot` (one matmul more per LoRA layer) plus the anchor pass that takes the anchor set's mean gradient first
(`--anchor-rows` rows of the same kind, 16 by default: the pass costs about anchor_rows / samples of a scoring run, so
it shrinks with the data). It prints `anchor_vs_norm=X` (time with the anchor over time without) and
`anchor_pass_share=Y` (the anchor pass's part of the anchor run).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHAPES = {
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=512,
    ),
    "smollm2": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        vocab_size=49152,
    ),
}  # fmt: skip
# {option: (default, --long, type, help)}: the default finishes within 5 minutes on a 2-core AVX2 CPU.
SIZES = {
    "shapes": ("smollm2", "tiny,smollm2", str, "comma-separated: tiny, smollm2"),
    "samples": (48, 128, int, "rows scored (length-sorted batching pads less with more rows)"),
    "reps": (1, 2, int, "repetitions of each method, interleaved (each in a fresh process)"),
}
METHODS = ("loop", "batched", "plain")
# batched scoring with gradient checkpointing (less memory, more time); batched scoring with the anchor score
EXTRA_METHODS = ("checkpointing", "anchor")


def build(shape: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from gradsift.config import ScoringConfig
    from gradsift.models import attach_lora

    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=0, **SHAPES[shape])
    return attach_lora(LlamaForCausalLM(config).eval(), ScoringConfig(lora_r=16, lora_alpha=32))


def samples(n: int, vocab: int, seed: int = 0):
    from gradsift.data import IGNORE_INDEX
    from gradsift.tokenization import TokenizedRow

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = rng.randint(40, 120)
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        cut = length // 2
        rows.append(TokenizedRow(input_ids=ids, labels=[IGNORE_INDEX] * cut + ids[cut:]))
    return rows


def rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM), so the peak read later is this method's own."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def peak_mib() -> float:
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def measure(shape: str, method: str, n: int, batch_size: int, anchor_rows: int, queue) -> None:
    """In a fresh process: build the model and samples, then time one method and its peak memory above that."""
    import torch

    from gradsift.config import ScoringConfig
    from gradsift.scoring import anchor_gradient, score_rows
    from gradsift.tokenization import collate

    torch.manual_seed(0)
    model = build(shape)
    if method == "checkpointing":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rows = samples(n, SHAPES[shape]["vocab_size"])

    def run(rows):
        if method == "plain":
            model.train()
            order = list(range(len(rows)))
            random.Random(1).shuffle(order)
            for i in range(0, len(rows), batch_size):
                batch = collate([rows[j] for j in order[i : i + batch_size]], 0, "cpu")
                loss = model(**batch, use_cache=False).loss
                loss.backward()
                model.zero_grad(set_to_none=True)
            model.eval()
        else:
            config = ScoringConfig(
                method="loop" if method == "loop" else "batched",
                max_batch_size=batch_size,
                max_tokens_per_batch=batch_size * 128,
            )
            mean = None
            if method == "anchor":
                started = time.perf_counter()
                mean = anchor_gradient(model, anchor, config, pad_token_id=0)
                anchor_seconds.append(time.perf_counter() - started)
            score_rows(model, rows, config, pad_token_id=0, progress=False, anchor=mean)

    anchor = samples(anchor_rows, SHAPES[shape]["vocab_size"], seed=1)
    anchor_seconds: list[float] = []

    before = rss_mib()  # the loaded model; the peak is read above this, warm-up included
    reset_peak()
    run(rows[:batch_size])  # warm-up: one-time costs (allocator, kernel selection, the frozen-head check) untimed
    start = time.perf_counter()
    run(rows)
    seconds = time.perf_counter() - start
    queue.put((seconds, max(peak_mib() - before, 0.0), anchor_seconds[-1] if anchor_seconds else 0.0))


def run_one(shape: str, method: str, n: int, batch_size: int, anchor_rows: int) -> tuple[float, float, float]:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=measure, args=(shape, method, n, batch_size, anchor_rows, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    import torch

    from gradsift.hardware import machine_line
    from sizes import add_sizes, fill_sizes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_sizes(parser, SIZES)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--anchor-rows", type=int, default=16, help="rows of the anchor set (method `anchor`)")
    every = ", ".join(METHODS + EXTRA_METHODS)
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated, `batched` among them: {every}; each ratio is printed when both its methods ran",
    )
    args = fill_sizes(parser.parse_args(), SIZES)
    methods = tuple(args.methods.split(","))
    if "batched" not in methods or not set(methods) <= set(METHODS + EXTRA_METHODS):
        parser.error(f"--methods must hold batched and may add {every}; got {args.methods!r}")
    summary = {}
    for shape in args.shapes.split(","):
        times: dict[str, list[float]] = {m: [] for m in methods}
        memory: dict[str, list[float]] = {m: [] for m in methods}
        anchor_pass: list[float] = []
        for rep in range(args.reps):
            for method in methods if rep % 2 == 0 else tuple(reversed(methods)):
                seconds, peak, anchor_seconds = run_one(shape, method, args.samples, args.batch_size, args.anchor_rows)
                times[method].append(seconds)
                memory[method].append(peak)
                if method == "anchor":
                    anchor_pass.append(anchor_seconds / seconds)
                print(f"{shape:8s} rep {rep} {method:13s} {seconds:7.2f} s  peak +{peak:7.0f} MiB", flush=True)
        best = {m: min(times[m]) for m in methods}
        mem = {m: min(memory[m]) for m in methods}
        ratios = {}
        if "plain" in methods:
            ratios["batched_vs_plain"] = best["plain"] / best["batched"]
        if "loop" in methods:
            ratios["batched_vs_loop"] = best["loop"] / best["batched"]
        if "plain" in methods:
            ratios["mem_vs_plain"] = mem["batched"] / mem["plain"] if mem["plain"] else float("nan")
        if "anchor" in methods:
            ratios["anchor_vs_norm"] = best["anchor"] / best["batched"]
            ratios["anchor_pass_share"] = min(anchor_pass)
        summary[shape] = ratios
        print(
            f"{machine_line()}: {shape}: {args.samples} samples, {args.batch_size} per batch, "
            f"torch_threads={torch.get_num_threads()}; "
            + ", ".join(f"{m} {best[m]:.2f} s / +{mem[m]:.0f} MiB" for m in methods)
        )
    final = summary.get("smollm2") or next(iter(summary.values()))
    print(" ".join(f"{key}={value:.3f}" for key, value in final.items()))


if __name__ == "__main__":
    main()
