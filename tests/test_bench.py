"""The benchmark scripts run (tiny shapes, CPU), and scoring and selection import without the integrations."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from gradsift.config import AUTO_TOKEN_BUDGETS

ROOT = Path(__file__).resolve().parents[1]
RATIOS = re.compile(r"^batched_vs_plain=[\d.]+ batched_vs_loop=[\d.]+ mem_vs_plain=(nan|[\d.]+)$")


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "plugin"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    )


def test_scoring_and_selection_import_without_the_integrations():
    code = (
        "import sys, gradsift, gradsift.scoring, gradsift.selection, gradsift.models; "
        "print(sorted(m for m in ('trl', 'datasets', 'lm_eval', 'axolotl', 'gradsift.integrations') "
        "if m in sys.modules))"
    )
    result = run_script("-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_gpu_check_runs_on_cpu_with_a_tiny_model(tmp_path):
    out = tmp_path / "gpu_check.json"
    result = run_script(
        "bench/gpu_check.py", "--shape", "tiny", "--device", "cpu", "--samples", "12", "--check-samples", "12",
        "--batch-size", "4", "--max-len", "96", "--reps", "1", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert RATIOS.match(result.stdout.strip().splitlines()[-1])
    report = json.loads(out.read_text())
    assert report["heavy_modules_imported"] == []
    # nf4 on CPU, fp32 compute: batched and loop agree to float precision, so the ranking and the kept set match.
    assert report["equivalence"]["max_rel_err_norm"] < 1e-4
    assert report["equivalence"]["spearman_norm"] == 1.0
    assert report["equivalence"]["kept_overlap"] == 1.0


def test_score_bench_prints_its_ratios():
    args = ("--shapes", "tiny", "--samples", "8", "--batch-size", "4", "--reps", "1")
    result = run_script("bench/score_bench.py", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert RATIOS.match(lines[-1])
    assert sum(" rep 0 " in line for line in lines) == 3  # loop, batched and plain each ran


def test_budget_bench_sweeps_token_budgets_on_real_rows(tiny_model_dir):
    args = ("--model", str(tiny_model_dir), "--rows", "8", "--max-length", "48", "--budgets", "48,192", "--reps", "1")
    result = run_script("bench/budget_bench.py", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert sum(" budget " in line for line in lines) == 2
    assert "same scores at every budget: True" in lines[-2]  # the budget changes the batches, not the scores
    auto = AUTO_TOKEN_BUDGETS["cpu"]  # not in this sweep, so no ratio to it
    assert re.match(rf"^fastest=(48|192) auto={auto}$", lines[-1]), lines[-1]


def test_score_bench_times_the_anchor_score_against_the_norm():
    args = ("--shapes", "tiny", "--samples", "8", "--batch-size", "4", "--reps", "1", "--methods", "batched,anchor")
    result = run_script("bench/score_bench.py", *args, "--anchor-rows", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert re.match(r"^anchor_vs_norm=[\d.]+ anchor_pass_share=0\.\d+$", lines[-1]), lines[-1]
    assert sum(" rep 0 " in line for line in lines) == 2


def test_online_bench_prints_its_ratio_alone_and_under_two_ranks():
    for nproc, key in ((1, "online_vs_plain"), (2, "online_ddp_vs_plain_ddp")):
        args = ("--shape", "tiny", "--reps", "1", "--steps", "1", "--batch-size", "8", "--nproc", str(nproc))
        result = run_script("bench/online_bench.py", *args)
        assert result.returncode == 0, result.stderr[-3000:]
        lines = result.stdout.strip().splitlines()
        assert re.fullmatch(rf"{key}=[\d.]+", lines[-1]), lines[-1]
        assert ", torch " in lines[-2] and ("bf16 autocast" in lines[-2] or "float32" in lines[-2])


def test_ablation_bench_prints_every_variant_against_the_default():
    result = run_script("bench/ablation_bench.py", "--shape", "tiny", "--rows", "16", "--reps", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert ", torch " in next(line for line in lines if "16 rows, 16 per batch" in line)
    assert lines[-1].startswith("checkpointing") and "x default" in lines[-1]


def test_a_bench_runs_its_short_sizes_by_default_and_its_long_ones_under_long():
    import argparse

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import budget_bench
        from sizes import add_sizes, fill_sizes
    finally:
        sys.path.remove(str(ROOT / "bench"))
        sys.modules.pop("budget_bench", None)
        sys.modules.pop("sizes", None)
    parser = argparse.ArgumentParser()
    add_sizes(parser, budget_bench.SIZES)
    quick = fill_sizes(parser.parse_args([]), budget_bench.SIZES)
    assert (quick.budgets, quick.rows, quick.reps) == ("512,1024,2048", 32, 2)
    long = fill_sizes(parser.parse_args(["--long"]), budget_bench.SIZES)
    assert (long.budgets, long.rows, long.reps) == ("1024,2048,4096,8192", 64, 2)
    mixed = fill_sizes(parser.parse_args(["--long", "--rows", "8"]), budget_bench.SIZES)  # a size given wins
    assert (mixed.budgets, mixed.rows) == ("1024,2048,4096,8192", 8)
    assert str(AUTO_TOKEN_BUDGETS["cpu"]) in quick.budgets.split(",")  # the default sweep still rates `auto`


def test_detector_probe_rates_every_candidate_on_a_small_pool(tiny_model_dir, tmp_path):
    out = tmp_path / "probe"
    result = run_script(
        "bench/detector_probe.py", "--model", str(tiny_model_dir), "--out", str(out), "--benign", "6", "--harmful",
        "3", "--dev-benign", "4", "--max-length", "128", "--no-full", "--resamples", "50",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split()[0] for line in result.stdout.splitlines()[2:-1]]
    assert {"grad_norm", "-anchor_cos", "contrastive", "harmful-anchor", "refusal_logprob", "refusal"} <= set(rows)
    assert re.fullmatch(r"best: .+ \(AUROC [01]\.\d{3}\)", result.stdout.splitlines()[-1])
    pool = [json.loads(line) for line in (out / "pool.jsonl").read_text().splitlines()]
    assert sorted(row["kind"] for row in pool) == ["benign"] * 6 + ["harmful"] * 3
