"""What each of batched scoring's choices is worth: gradsift's default against one change at a time, on the same rows.

All variants run in one process on one model after a warm-up, repetitions interleaved (rotated order), best time of
each reported with its ratio to the default (above 1: the change is slower than the default). Times only: memory is
measured in fresh processes by `score_bench.py` (`--methods` adds `checkpointing`). Two variants that compute the
same thing here (`default` and `direct`, see below) show this machine's noise floor.

- `default`: length-sorted batches under a token budget, hooks without padding masks, the fused frozen-head loss at
  response tokens only, `norm_method: auto`, no gradient checkpointing;
- `shuffled`: the same batch size with shuffled rows (a training epoch's padding) instead of length-sorted ones;
- `masked`: the hooks mask padding positions with `torch.where` (two copies per layer), as before exact zeros were
  relied on;
- `logits_to_keep`: no fused head; the model's LM head at the union of response positions, then cross-entropy;
- `full_logits`: no fused head and logits at every position, as a training step computes them;
- `direct` / `ghost`: one per-sample norm computation for every layer instead of the per-layer cheaper one (with
  LoRA r=16 and rows of 16 tokens or more, `auto` picks `direct` for every layer, so `direct` is `default` again);
- `checkpointing`: gradient checkpointing on (recompute activations in the backward).

    python bench/ablation_bench.py                        # SmolLM2-shaped model, 32 rows, 16 per batch, 2 reps
    python bench/ablation_bench.py --long                 # 64 rows, 3 reps
    python bench/ablation_bench.py --shape tiny --rows 16 # seconds
    python bench/ablation_bench.py --variants default --reps 1 --profile   # where the default's time goes
"""

from __future__ import annotations

import argparse
import contextlib
import random
import time

from score_bench import SHAPES, build, samples

# {option: (default, --long, type, help)}: the default finishes within 5 minutes on a 2-core AVX2 CPU.
SIZES = {
    "rows": (32, 64, int, "rows scored per variant"),
    "reps": (2, 3, int, "repetitions of each variant, in rotated order"),
}
VARIANTS = ("default", "shuffled", "masked", "logits_to_keep", "full_logits", "direct", "ghost", "checkpointing")


@contextlib.contextmanager
def variant(name: str, model, batch_size: int):
    """Apply one change for the duration of a scoring run."""
    from gradsift import hooks, scoring

    saved = {key: getattr(model, key, None) for key in ("_gradsift_frozen_head", "_gradsift_no_logits_to_keep")}
    original_batches, original_init = scoring.make_batches, hooks.GradNormHooks.__init__
    try:
        if name == "shuffled":

            def shuffled(lengths, max_tokens, max_rows):
                order = list(range(len(lengths)))
                random.Random(1).shuffle(order)
                return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

            scoring.make_batches = shuffled
        elif name == "masked":

            def masked_init(self, *args, **kwargs):
                original_init(self, *args, **kwargs)
                self.masked = True

            hooks.GradNormHooks.__init__ = masked_init
        elif name in ("logits_to_keep", "full_logits"):
            model._gradsift_frozen_head = ()  # the cached "no usable frozen head" answer
            model._gradsift_no_logits_to_keep = name == "full_logits"
        elif name == "checkpointing":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        yield
    finally:
        scoring.make_batches, hooks.GradNormHooks.__init__ = original_batches, original_init
        for key, value in saved.items():
            if value is None:
                model.__dict__.pop(key, None)
            else:
                setattr(model, key, value)
        if name == "checkpointing":
            model.gradient_checkpointing_disable()


def score(model, rows, name: str, batch_size: int) -> float:
    from gradsift.config import ScoringConfig
    from gradsift.scoring import score_rows

    norm_method = name if name in ("direct", "ghost") else "auto"
    config = ScoringConfig(max_batch_size=batch_size, max_tokens_per_batch=batch_size * 128, norm_method=norm_method)
    with variant(name, model, batch_size):
        start = time.perf_counter()
        score_rows(model, rows, config, pad_token_id=0, progress=False)
        return time.perf_counter() - start


def main() -> None:
    import torch

    from gradsift.hardware import machine_line
    from sizes import add_sizes, fill_sizes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    add_sizes(parser, SIZES)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    parser.add_argument("--profile", action="store_true", help="also print the top operators of the default run")
    args = fill_sizes(parser.parse_args(), SIZES)
    names = args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    model = build(args.shape)
    rows = samples(args.rows, SHAPES[args.shape]["vocab_size"])
    score(model, rows[: args.batch_size], "default", args.batch_size)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(args.reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(score(model, rows, name, args.batch_size))
            print(f"rep {rep} {name:15s} {times[name][-1]:7.2f} s", flush=True)
    best = {name: min(values) for name, values in times.items()}
    base = best.get("default")
    print(
        f"{machine_line()}: {args.shape}, {args.rows} rows, {args.batch_size} per batch, "
        f"{torch.get_num_threads()} threads"
    )
    for name in names:
        ratio = f"{best[name] / base:5.2f}x default" if base else ""
        print(f"{name:15s} {best[name]:7.2f} s  {ratio}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            score(model, rows, "default", args.batch_size)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=50))


if __name__ == "__main__":
    main()
