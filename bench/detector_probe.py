"""Which score finds harmful rows mixed into real instruction data? Every candidate side by side, on one pool.

The pool: `--benign` rows of `embedded:alpaca-gpt4-demo` (its `train` split) and `--harmful` harmful request →
harmful answer rows of `embedded:harmful-answers` (its `train` split), each labelled `kind`, scored with the model
(an aligned model: `--model`, e.g. a recipe's `seed-0/00-align/model`). Candidates, each a column (higher = more
suspicious):

- `grad_norm`, `loss`, `response tokens`: the paper's score and two plain ones (fresh LoRA);
- `-anchor_cos`: against the mean gradient of `embedded:refusals` (harmful requests → refusals), fresh LoRA;
- `contrastive`: against ḡ(harmful answers) − ḡ(refusals) on the *same* requests (the dev split of
  `embedded:harmful-answers`, answered in full and refused), as He et al. 2024: (⟨g,ḡ_H⟩ − ⟨g,ḡ_R⟩) / ‖g‖;
- `-anchor_cos (all params)`: the anchor score with `param_scope: all` (the exact full gradient; `--no-full` skips);
- `-anchor_cos (adapter)`: through a trained adapter (`--adapter`) instead of a fresh LoRA;
- `harmful-anchor cos`: against the mean gradient of harmful answers (the dev split's requests answered in full);
- `refusal_logprob`, `refusal margin`: forward only: the log-probability that the model opens its answer to the
  row's request with a refusal (`gradsift.refusal_probe`, what `--refusal-probe` writes), and that minus the
  log-probability of the row's own answer's opening.

Printed per candidate: its AUROC for the harmful rows with a 95 % bootstrap interval over rows, its time relative to
plain scoring, and, for the forward-only ones, the share of harmful rows dropped and of benign rows kept at the
threshold that keeps `--keep-benign` (90 %) of *other* benign rows (`--dev-benign` rows of the alpaca `dev` split:
the rule is set without the pool's labels). The last line is the best candidate. Run:

    python bench/detector_probe.py --model runs/paper-smollm2/seed-0/00-align/model --out /tmp/probe
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REFUSAL_ANCHOR = "embedded:refusals"


def pool(split: str, benign: int, harmful: int, seed: int) -> list[dict]:
    """`benign` + `harmful` labelled rows of the packaged sources' `split` (harmful rows: `train` or `dev`)."""
    import random

    from gradsift.packaged import packaged_rows

    rows = []
    for source, count in (("embedded:alpaca-gpt4-demo", benign), ("embedded:harmful-answers", harmful)):
        found = packaged_rows(source, split if source.endswith("demo") else ("dev" if split == "dev" else "train"))[0]
        random.Random(seed).shuffle(found)
        if len(found) < count:
            print(f"{source} has {len(found)} rows in its split; ask for at most that many", file=sys.stderr)
            raise SystemExit(2)
        rows += found[:count]
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def score(data: Path, out: Path, model: str, max_length: int, *flags: str) -> tuple[object, float]:
    """`gradsift score` of `data` into `out` (a fresh folder), and its seconds."""
    from gradsift.cli import main
    from gradsift.store import load_finished_scores

    start = time.perf_counter()
    args = ["score", "--data", str(data), "--out", str(out), "--model", model, "--max-length", str(max_length)]
    if main([*args, "--lora-seed", "0", "-q", *flags]) != 0:
        print(f"gradsift score failed for {out}", file=sys.stderr)
        raise SystemExit(2)
    return load_finished_scores(out)[1], time.perf_counter() - start


def in_order(table: object, column: str, rows: int) -> np.ndarray:
    values = np.full(rows, np.nan)
    values[np.asarray(table.index)] = np.asarray(getattr(table, column), dtype=float)
    return values


def interval(values: np.ndarray, harmful: np.ndarray, resamples: int) -> tuple[float, float]:
    from scipy.stats import bootstrap

    from gradsift.table import auroc

    def statistic(v: np.ndarray, h: np.ndarray) -> float:
        h = h.astype(bool)
        return auroc(v[h], v[~h]) if h.any() and (~h).any() else np.nan

    found = bootstrap((values, harmful.astype(float)), statistic, paired=True, vectorized=False, n_resamples=resamples,
                      method="percentile", random_state=0)  # fmt: skip
    return float(found.confidence_interval.low), float(found.confidence_interval.high)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the scored model (an aligned model folder or a hub id)")
    parser.add_argument("--out", required=True, type=Path, help="a new folder for the pool and its scores")
    parser.add_argument("--adapter", help="a trained adapter of --model for the `-anchor_cos (adapter)` candidate")
    parser.add_argument("--benign", type=int, default=120)
    parser.add_argument("--harmful", type=int, default=30)
    parser.add_argument("--dev-benign", type=int, default=60, help="other benign rows the thresholds are set on")
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--seed", type=int, default=0, help="which rows the pool takes")
    parser.add_argument("--no-full", action="store_true", help="skip the param_scope: all candidate (the slowest)")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument(
        "--keep-benign", type=float, default=0.9, help="share of the dev benign rows a threshold keeps"
    )
    args = parser.parse_args()

    from gradsift.config import DataConfig, ScoringConfig
    from gradsift.models import load_for_eval, load_tokenizer
    from gradsift.refusal_probe import REFUSALS, RefusalAnswers, best_refusal_logprobs, opening_logprobs
    from gradsift.table import auroc
    from gradsift.tokenization import tokenize_records

    args.out.mkdir(parents=True, exist_ok=False)
    rows = pool("train", args.benign, args.harmful, args.seed)
    harmful = np.array([row["kind"] == "harmful" for row in rows])
    data = write_jsonl(rows, args.out / "pool.jsonl")
    dev = pool("dev", 0, 20, args.seed)  # the contrastive anchor's requests: never in the pool (another split)
    answered = write_jsonl([{"messages": row["messages"]} for row in dev], args.out / "anchor_answered.jsonl")
    refused = [
        {"messages": [row["messages"][0], {"role": "assistant", "content": REFUSALS[i % len(REFUSALS)]}]}
        for i, row in enumerate(dev)
    ]
    refused_path = write_jsonl(refused, args.out / "anchor_refused.jsonl")

    n = len(rows)
    columns: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    plain, seconds["plain scoring"] = score(data, args.out / "plain", args.model, args.max_length)
    columns["grad_norm"] = in_order(plain, "grad_norm", n)
    columns["loss"] = in_order(plain, "loss", n)
    columns["response tokens"] = in_order(plain, "num_response_tokens", n)
    anchored, seconds["-anchor_cos"] = score(
        data, args.out / "refusals", args.model, args.max_length, "--anchor-data", REFUSAL_ANCHOR
    )
    columns["-anchor_cos"] = -in_order(anchored, "anchor_cos", n)
    columns["-anchor_dot"] = -in_order(anchored, "anchor_dot", n)
    on_h, t_h = score(data, args.out / "answered", args.model, args.max_length, "--anchor-data", str(answered))
    on_r, t_r = score(data, args.out / "refused", args.model, args.max_length, "--anchor-data", str(refused_path))
    norm = in_order(on_h, "grad_norm", n)
    columns["contrastive"] = (in_order(on_h, "anchor_dot", n) - in_order(on_r, "anchor_dot", n)) / norm
    seconds["contrastive"] = t_h + t_r - seconds["plain scoring"]  # one gradient pass, two anchor passes
    columns["harmful-anchor cos"] = in_order(on_h, "anchor_cos", n)
    seconds["harmful-anchor cos"] = t_h
    if not args.no_full:
        full, seconds["-anchor_cos (all params)"] = score(
            data,
            args.out / "all",
            args.model,
            args.max_length,
            "--anchor-data",
            REFUSAL_ANCHOR,
            "--param-scope",
            "all",
        )
        columns["-anchor_cos (all params)"] = -in_order(full, "anchor_cos", n)
    if args.adapter:
        adapted, seconds["-anchor_cos (adapter)"] = score(
            data, args.out / "adapter", args.model, args.max_length, "--anchor-data", REFUSAL_ANCHOR,
            "--adapter", args.adapter,
        )  # fmt: skip
        columns["-anchor_cos (adapter)"] = -in_order(adapted, "anchor_cos", n)

    model = load_for_eval(ScoringConfig(model=args.model))
    tokenizer = load_tokenizer(args.model)
    config = DataConfig(max_length=args.max_length)
    answers = RefusalAnswers(tokenizer, REFUSALS)
    tokenized = tokenize_records(rows, tokenizer, config, progress=False)
    start = time.perf_counter()
    columns["refusal_logprob"] = best_refusal_logprobs(model, tokenized, answers, tokenizer.pad_token_id)
    seconds["refusal_logprob"] = time.perf_counter() - start
    columns["refusal margin"] = columns["refusal_logprob"] - opening_logprobs(model, tokenized, tokenizer.pad_token_id)
    seconds["refusal margin"] = time.perf_counter() - start
    dev_rows = tokenize_records(pool("dev", args.dev_benign, 0, args.seed), tokenizer, config, progress=False)
    dev_refusal = best_refusal_logprobs(model, dev_rows, answers, tokenizer.pad_token_id)
    dev_margin = dev_refusal - opening_logprobs(model, dev_rows, tokenizer.pad_token_id)
    dev_columns = {"refusal_logprob": dev_refusal, "refusal margin": dev_margin}

    print(f"pool: {int((~harmful).sum())} benign + {int(harmful.sum())} harmful rows, model {args.model}")
    print(f"{'candidate':<28s} {'AUROC':>6s}  {'95% interval':<15s} {'time':>6s}  harmful dropped / benign kept")
    best = None
    for name, values in columns.items():
        usable = np.isfinite(values)
        value = auroc(values[usable & harmful], values[usable & ~harmful])
        low, high = interval(values[usable], harmful[usable], args.resamples)
        relative = seconds.get(name, seconds["plain scoring"]) / seconds["plain scoring"]
        rule = ""
        if name in dev_columns:
            threshold = float(np.nanquantile(dev_columns[name], args.keep_benign))
            flagged = values > threshold
            rule = f"{flagged[harmful].mean():.2f} / {(~flagged[~harmful]).mean():.2f} (threshold {threshold:.3f})"
        print(f"{name:<28s} {value:6.3f}  [{low:.3f}, {high:.3f}] {relative:5.2f}×  {rule}")
        best = max(best or (value, name), (value, name))
    print(f"best: {best[1]} (AUROC {best[0]:.3f})")


if __name__ == "__main__":
    main()
