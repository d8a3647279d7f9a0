"""GPU check: batched scoring on a 4-bit (nf4) random model of Llama-3.2-1B shape, against the loop and a plain step.

One prepared script for a machine with a CUDA GPU (about 3 minutes on an H200 at the defaults). It imports only
torch, transformers, peft, bitsandbytes and gradsift's scoring and selection modules, so it runs from a checkout:

    PYTHONPATH=plugin python bench/gpu_check.py [--out gpu_check.json]
    PYTHONPATH=plugin python bench/gpu_check.py --shape tiny --device cpu --samples 16   # a smoke run, no GPU

Steps:
1. A random Llama (bf16, tied embeddings) is saved as safetensors and loaded back the way `gradsift score` loads
   a model: nf4 base, `prepare_model_for_kbit_training`, a fresh LoRA (r=16, every linear layer).
2. Equivalence on the first `--check-samples` rows: the batch-size-1 loop (`autograd.grad` per row) against batched
   scoring: max relative error of losses and norms, Spearman rank correlation of the norms, and the overlap of the
   rows kept by the paper's rule (`moderate`, keep 25%) from either.
3. Throughput over all rows, repetitions interleaved, each method timed after a warm-up: `loop`, `batched`
   (gradsift's length-sorted batches), `plain` (shuffled padded batches of the same size, full logits, the model's
   own loss, one backward, no hooks). All three run under the same bf16 autocast a `bf16: true` trainer uses.
   Peak GPU memory above the loaded model for each.

Ratios are time(other) / time(batched). The last line: `batched_vs_plain=X batched_vs_loop=Y mem_vs_plain=Z`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from importlib.metadata import version

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHAPES = {
    "llama-3.2-1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        vocab_size=128256, rope_theta=500000.0, max_position_embeddings=4096,
    ),
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=512, max_position_embeddings=1024,
    ),
}  # fmt: skip
METHODS = ("loop", "batched", "plain")


def make_rows(n: int, vocab: int, min_len: int, max_len: int, seed: int = 0):
    """Rows of mixed lengths; the loss is on a response of 30–70% of each row, as in SFT data."""
    from gradsift.data import IGNORE_INDEX
    from gradsift.tokenization import TokenizedRow

    rng = random.Random(seed)
    rows = []
    for k in range(n):
        length = rng.randint(min_len, max_len)
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        cut = int(length * rng.uniform(0.3, 0.7))
        rows.append(TokenizedRow(input_ids=ids, labels=[IGNORE_INDEX] * cut + ids[cut:], sample_id=f"row-{k}"))
    return rows


def build_model(shape: str, device: str, folder: str, quantization: str):
    """Save a random bf16 model to `folder` and load it back as gradsift scores: nf4 base + fresh LoRA."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from gradsift.config import ScoringConfig
    from gradsift.models import load_model

    torch.manual_seed(0)
    config = LlamaConfig(tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2, **SHAPES[shape])
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    scoring = ScoringConfig(
        model=folder, dtype="bfloat16", quantization=quantization, device=device, lora_r=16, lora_alpha=32
    )
    return load_model(scoring)


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def plain_pass(model, rows, batch_size: int, device: str) -> None:
    """What a training epoch computes: shuffled padded batches, full logits, the model's loss, one backward."""
    from gradsift.tokenization import collate

    order = list(range(len(rows)))
    random.Random(1).shuffle(order)
    for i in range(0, len(rows), batch_size):
        batch = collate([rows[j] for j in order[i : i + batch_size]], 0, device)
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        model.zero_grad(set_to_none=True)


def run_method(model, rows, method: str, batch_size: int, max_tokens: int, device: str):
    import torch

    from gradsift.config import ScoringConfig
    from gradsift.model_mode import compute_autocast
    from gradsift.scoring import score_rows

    if method == "plain":  # under the autocast scoring uses (bf16 on a GPU), as a `bf16: true` trainer runs
        was_training = model.training
        model.train()
        try:
            with compute_autocast(ScoringConfig(), torch.device(device)):
                plain_pass(model, rows, batch_size, device)
        finally:
            model.train(was_training)
        return None
    config = ScoringConfig(method=method, max_batch_size=batch_size, max_tokens_per_batch=max_tokens)
    return score_rows(model, rows, config, pad_token_id=0, progress=False)


def timed(model, rows, method: str, batch_size: int, max_tokens: int, device: str) -> tuple[float, float, object]:
    """Seconds and peak memory (MiB above what was allocated before) of one method over `rows`."""
    import torch

    sync(device)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    result = run_method(model, rows, method, batch_size, max_tokens, device)
    sync(device)
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20 if device == "cuda" else float("nan")
    return seconds, peak, result


def spearman(x, y) -> float:
    import numpy as np

    rx = np.argsort(np.argsort(x)).astype(float)
    ry = np.argsort(np.argsort(y)).astype(float)
    return float(np.corrcoef(rx, ry)[0, 1])


def equivalence(loop_table, batched_table) -> dict[str, float]:
    import numpy as np

    from gradsift.config import SelectionConfig
    from gradsift.selection import select_rows

    def rel(a, b):
        return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))

    config = SelectionConfig(rule="moderate", keep_fraction=0.25)
    kept = [select_rows(t.loss, t.grad_norm, t.status, config).keep for t in (loop_table, batched_table)]
    overlap = np.count_nonzero(kept[0] & kept[1]) / max(np.count_nonzero(kept[0]), 1)
    return {
        "max_rel_err_loss": rel(batched_table.loss, loop_table.loss),
        "max_rel_err_norm": rel(batched_table.grad_norm, loop_table.grad_norm),
        "spearman_norm": spearman(loop_table.grad_norm, batched_table.grad_norm),
        "kept_overlap": float(overlap),
        "kept": int(np.count_nonzero(kept[0])),
    }


def profile(model, rows, batch_size: int, max_tokens: int, device: str) -> None:
    """Print where one batch of batched scoring spends its time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        run_method(model, rows, "batched", batch_size, max_tokens, device)
        sync(device)
    keys = ("self_device_time_total", "self_cuda_time_total") if device == "cuda" else ("self_cpu_time_total",)
    for key in keys:
        try:
            print(prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=60), flush=True)
            return
        except (AttributeError, KeyError, ValueError):
            continue


def environment(device: str) -> dict[str, str]:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("transformers", "peft", "bitsandbytes"):
        try:
            info[package] = version(package)
        except Exception:  # noqa: BLE001 - report what is there
            info[package] = "missing"
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = str(torch.version.cuda)
    else:
        info["cpu_threads"] = str(torch.get_num_threads())
    return info


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quantization", choices=("nf4", "none"), default="nf4")
    parser.add_argument("--samples", type=int, default=256, help="rows timed by each method")
    parser.add_argument("--check-samples", type=int, default=32, help="rows compared with the loop")
    parser.add_argument("--min-len", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16, help="rows per batch (plain and batched)")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="print the top operators of one batched batch")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA GPU; use --device cpu for a smoke run")

    results: dict = {"args": vars(args), "environment": environment(args.device)}
    print(json.dumps(results["environment"]), flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        model = build_model(args.shape, args.device, folder, args.quantization)
    print(f"model built and loaded in {time.perf_counter() - start:.1f} s", flush=True)
    vocab = SHAPES[args.shape]["vocab_size"]
    rows = make_rows(args.samples, vocab, args.min_len, args.max_len)
    max_tokens = args.batch_size * args.max_len

    # Warm-up (kernels, cuBLAS handles, the frozen-head check), then the equivalence check.
    for method in METHODS:
        timed(model, rows[: args.batch_size], method, args.batch_size, max_tokens, args.device)
    check = rows[: args.check_samples]
    _, _, loop_table = timed(model, check, "loop", args.batch_size, max_tokens, args.device)
    _, _, batched_table = timed(model, check, "batched", args.batch_size, max_tokens, args.device)
    results["equivalence"] = equivalence(loop_table, batched_table)
    print("equivalence on", len(check), "rows:", json.dumps(results["equivalence"]), flush=True)

    times: dict[str, list[float]] = {m: [] for m in METHODS}
    memory: dict[str, list[float]] = {m: [] for m in METHODS}
    for rep in range(args.reps):
        for method in METHODS if rep % 2 == 0 else tuple(reversed(METHODS)):
            seconds, peak, _ = timed(model, rows, method, args.batch_size, max_tokens, args.device)
            times[method].append(seconds)
            memory[method].append(peak)
            print(f"rep {rep} {method:8s} {seconds:8.2f} s  peak +{peak:8.0f} MiB", flush=True)
    best = {m: min(times[m]) for m in METHODS}
    mem = {m: min(memory[m]) for m in METHODS}
    tokens = sum(len(r.input_ids) for r in rows)
    results["seconds"] = best
    results["peak_mib"] = mem
    results["tokens_per_second"] = {m: tokens / best[m] for m in METHODS}
    results["ratios"] = {
        "batched_vs_plain": best["plain"] / best["batched"],
        "batched_vs_loop": best["loop"] / best["batched"],
        "mem_vs_plain": mem["batched"] / mem["plain"] if mem["plain"] > 0 else float("nan"),
    }
    if args.profile:
        profile(model, rows[: args.batch_size], args.batch_size, max_tokens, args.device)
    results["total_seconds"] = time.perf_counter() - start
    heavy = sorted(name for name in ("trl", "datasets", "lm_eval", "axolotl") if name in sys.modules)
    results["heavy_modules_imported"] = heavy
    print(
        f"{args.shape} {args.quantization}: {len(rows)} rows, {tokens} tokens, {args.batch_size} per batch; "
        + ", ".join(f"{m} {best[m]:.2f} s / +{mem[m]:.0f} MiB" for m in METHODS)
    )
    print(f"total {results['total_seconds']:.0f} s; heavy modules imported: {heavy or 'none'}")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)
    print(" ".join(f"{key}={value:.3f}" for key, value in results["ratios"].items()))


if __name__ == "__main__":
    main()
