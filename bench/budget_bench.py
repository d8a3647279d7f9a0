"""Scoring time and peak memory per token budget (`scoring.max_tokens_per_batch`), on real rows with the real model.

The budget caps rows × longest row of one batch: a small one makes many small batches (more per-batch overhead), a
large one makes few large batches whose activations and per-layer norm work no longer fit the CPU's caches.
`max_tokens_per_batch: auto` picks the budget per device type from this sweep (`AUTO_TOKEN_BUDGETS` in
`gradsift/config.py`).

Rows: the testbed's synthetic `howto` and `lists` rows (half each), tokenized with the model's chat template at
`--max-length`, the way `gradsift run recipes/testbed-smollm2.yaml` scores them. Model: the embedded SmolLM2-135M-
Instruct with a fresh LoRA (r 16 on every linear layer), float32 on the CPU (what `auto`'s CPU entry is for). Each
budget runs in a fresh process (its peak memory is its own) after an untimed warm-up batch, repetitions interleaved
(forward order, then reversed), and the best of the repetitions counts.

    python bench/budget_bench.py                                  # 512,1024,2048 on 32 rows, 2 reps
    python bench/budget_bench.py --long                           # 1024,2048,4096,8192 on 64 rows
    python bench/budget_bench.py --budgets 2048,4096 --rows 128

Last line: `fastest=B auto=A auto_vs_fastest=X` (time at `auto`'s budget over the fastest budget's; 1.0 = auto is the
fastest measured).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue as queue_module
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# {option: (default, --long, type, help)}: the default finishes within 5 minutes on a 2-core AVX2 CPU.
SIZES = {
    "budgets": ("512,1024,2048", "1024,2048,4096,8192", str, "comma-separated token budgets"),
    "rows": (32, 64, int, "rows scored (half howto, half lists)"),
    "reps": (2, 2, int, "repetitions of each budget, interleaved"),
}

from score_bench import peak_mib, reset_peak, rss_mib  # noqa: E402


def scoring_config(model: str, budget: int):
    from gradsift.config import ScoringConfig

    return ScoringConfig(
        model=model, lora_r=16, lora_alpha=32, max_tokens_per_batch=budget, device="cpu", dtype="float32"
    )


def rows_for(model: str, n: int, max_length: int):
    from gradsift.config import DataConfig
    from gradsift.models import load_tokenizer
    from gradsift.synthetic import generate
    from gradsift.tokenization import tokenize_records

    records = generate("howto", n // 2) + generate("lists", n - n // 2)
    return tokenize_records(records, load_tokenizer(model), DataConfig(max_length=max_length), progress=False)


def measure(model_spec: str, budget: int, n: int, max_length: int, queue) -> None:
    """In a fresh process: load the model and rows, then time scoring them under one budget, and its peak memory."""
    import numpy as np
    import torch

    from gradsift.models import load_model, load_tokenizer
    from gradsift.scoring import score_rows

    torch.manual_seed(0)
    config = scoring_config(model_spec, budget)
    model = load_model(config)
    pad = load_tokenizer(model_spec).pad_token_id
    rows = rows_for(model_spec, n, max_length)
    before = rss_mib()
    reset_peak()
    score_rows(model, rows[:4], config, pad, progress=False)  # warm-up, untimed
    start = time.perf_counter()
    table = score_rows(model, rows, config, pad, progress=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(row.input_ids) for row in rows)
    queue.put((seconds, max(peak_mib() - before, 0.0), tokens, float(np.nansum(table.grad_norm))))


def run_one(model: str, budget: int, n: int, max_length: int) -> tuple[float, float, int, float]:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=measure, args=(model, budget, n, max_length, queue))
    process.start()
    while True:  # a child that died (a bad --model, out of memory) puts nothing: stop instead of waiting forever
        try:
            result = queue.get(timeout=5)
            break
        except queue_module.Empty:
            if not process.is_alive():
                raise SystemExit(
                    f"budget {budget}: the measuring process exited with status {process.exitcode}"
                ) from None
    process.join()
    return result


def main() -> None:
    import torch

    from gradsift.config import ScoringConfig
    from gradsift.hardware import machine_line
    from sizes import add_sizes, fill_sizes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_sizes(parser, SIZES)
    parser.add_argument("--max-length", type=int, default=256, help="tokens per row at most (the testbed's)")
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    args = fill_sizes(parser.parse_args(), SIZES)
    try:
        budgets = [int(b) for b in args.budgets.split(",")]
    except ValueError:
        budgets = []
    if not budgets or min(budgets) < 1:
        parser.error(f"--budgets takes whole numbers ≥ 1 separated by commas; got {args.budgets!r}")
    times: dict[int, list[float]] = {b: [] for b in budgets}
    memory: dict[int, list[float]] = {b: [] for b in budgets}
    sums: list[float] = []  # the sum of the rows' gradient norms: a budget changes the batches, not the scores
    for rep in range(args.reps):
        for budget in budgets if rep % 2 == 0 else list(reversed(budgets)):
            seconds, peak, tokens, norm_sum = run_one(args.model, budget, args.rows, args.max_length)
            times[budget].append(seconds)
            memory[budget].append(peak)
            sums.append(norm_sum)
            print(
                f"rep {rep} budget {budget:6d} {seconds:7.2f} s  peak +{peak:7.0f} MiB  ({tokens} tokens)", flush=True
            )
    best = {b: min(times[b]) for b in budgets}
    fastest = min(best, key=best.__getitem__)
    auto = ScoringConfig().token_budget("cpu")
    same = max(sums) - min(sums) <= 1e-4 * max(abs(value) for value in sums)
    print(
        f"{machine_line()}: {args.rows} rows, {torch.get_num_threads()} threads, same scores at every budget: {same}; "
        + ", ".join(f"{b}: {best[b]:.2f} s / +{min(memory[b]):.0f} MiB" for b in budgets)
    )
    line = f"fastest={fastest} auto={auto}"
    if auto in best:
        line += f" auto_vs_fastest={best[auto] / best[fastest]:.3f}"
    print(line)


if __name__ == "__main__":
    main()
