"""The report's statistics: t intervals over seeds, paired differences, the prompt bootstrap, and the headline.

The recomputation tests read the stage.json files themselves and redo the arithmetic by hand (the t interval
written out, the bootstrap through scipy directly and as a plain resampling loop), for a real 3-seed tiny run and
for a synthetic run whose judged answers vary (the tiny model's garbage answers all read as complied).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from gradsift.continual import ArmSpec, load_recipe
from gradsift.continual.runner import run_recipe
from gradsift.report import (
    bootstrap_rate,
    is_refusal_task,
    paired_difference,
    stage_metrics,
    t_interval,
    write_report,
)
from gradsift.report.stages import hardware_of
from gradsift.report.writing import machines_line
from test_continual_runner import tiny_recipe, write

ARMS = ("full", "gradsift", "random")
SEEDS = (0, 1, 2)
STAGE_NAMES = ("00-align", "01-sentiment", "02-yes_no")
JUDGE_METRICS = ("refused_rate", "complied_rate", "neither_rate")
RESAMPLES = 2000  # the report's default
T_975_2 = 4.302652729749462  # scipy.stats.t.ppf(0.975, 2): three seeds


# ---------------------------------------------------------------------------------------------------------------
# The formulas
# ---------------------------------------------------------------------------------------------------------------


def test_t_interval_of_1_2_3_is_2_plus_minus_t_times_1_over_root_3():
    cell = t_interval([1.0, 2.0, 3.0])  # s = 1
    assert cell["mean"] == 2.0 and cell["std"] == 1.0 and cell["n"] == 3
    assert cell["ci"] == pytest.approx([2 - T_975_2 / math.sqrt(3), 2 + T_975_2 / math.sqrt(3)], abs=1e-9)


def test_t_interval_of_one_seed_has_a_mean_and_no_interval():
    assert t_interval([0.25]) == {"mean": 0.25, "std": None, "ci": None, "n": 1}


def test_t_interval_leaves_out_missing_values():
    assert t_interval([1.0, None, float("nan"), 3.0]) == t_interval([1.0, 3.0])


def test_paired_difference_pairs_by_seed_and_skips_seeds_one_arm_lacks():
    diff = paired_difference({0: 1.0, 1: 2.0, 2: 4.0}, {0: 0.5, 1: 1.0, 3: 9.0})
    # d = [0.5, 1.0]: mean 0.75, s = sqrt(2 · 0.25² / 1), half = t_{0.975, 1} · s / sqrt(2) = 12.7062 · 0.25
    assert diff["seeds"] == [0, 1] and diff["mean"] == 0.75
    assert diff["ci"] == pytest.approx([0.75 - 12.706204736174694 * 0.25, 0.75 + 12.706204736174694 * 0.25])


def test_bootstrap_rate_of_two_prompts_spans_both_values():
    # Among 2,000 draws of two prompts, both all-0 and all-1 draws (a quarter each) fill the 2.5 % tails.
    assert bootstrap_rate([[0.0, 1.0]]) == {"mean": 0.5, "ci": [0.0, 1.0], "n_seeds": 1, "n_docs": 2}


def test_bootstrap_rate_of_one_seed_is_scipys_bootstrap_of_the_prompt_mean():
    values = np.array([1, 0, 0, 1, 1, 1, 0, 1, 1, 1], dtype=float)
    rng = np.random.default_rng(0)
    plain = stats.bootstrap((values,), np.mean, n_resamples=RESAMPLES, method="percentile", rng=rng)
    ci = bootstrap_rate([values])["ci"]
    assert ci == pytest.approx([plain.confidence_interval.low, plain.confidence_interval.high], abs=1e-12)


def test_bootstrap_rate_of_several_seeds_matches_a_plain_resampling_loop():
    # 3 seeds × 15 prompts of varied rates, each seed its own.
    values = np.random.default_rng(7).choice([0.0, 0.25, 0.5, 0.75, 1.0], size=(3, 15))
    draws_n = 20_000
    rng = np.random.default_rng(123)
    draws = np.empty(draws_n)
    for i in range(draws_n):
        prompts = rng.integers(0, values.shape[1], size=values.shape[1])  # the same prompts for every seed
        draws[i] = np.mean([np.mean(seed[prompts]) for seed in values])
    low, high = np.percentile(draws, [2.5, 97.5])
    boot = bootstrap_rate(values, n_resamples=draws_n)
    assert boot["mean"] == pytest.approx(values.mean(), abs=1e-12)
    # Monte-Carlo error of a 2.5 % percentile of B draws: sqrt(0.025 · 0.975 / B) / density there, the density of a
    # near-normal statistic being φ(1.96) / σ: ≈ 2.67 σ / √B per end; the difference of two such estimates has √2
    # times that. Here σ ≈ 0.08, so that is ≈ 0.0015 and 0.01 over six standard errors (and above the 1/180 grid
    # that rates in quarters over 3 × 15 prompts fall on).
    mc_error = math.sqrt(2) * 2.67 * draws.std() / math.sqrt(draws_n)
    assert 6 * mc_error < 0.01
    assert boot["ci"] == pytest.approx([low, high], abs=0.01)


def test_bootstrap_rate_leaves_out_prompts_no_seed_has_a_value_for():
    with_gaps = bootstrap_rate([[1.0, None, 0.0, 1.0], [0.0, None, 0.0, 1.0]])
    assert with_gaps == bootstrap_rate([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]) and with_gaps["n_docs"] == 3


def test_pooled_attack_success_averages_every_prompt_of_every_refusal_task():
    record = {
        "stage": "s",
        "eval": {
            "gradsift_refusal_a": {"attack_success_rate": 1.0},
            "gradsift_refusal_b": {"attack_success_rate": 0.25},
            "gradsift_refusal_mc": {"acc": 0.0},
        },
        "eval_per_doc": {
            "gradsift_refusal_a": {"doc_id": [0], "attack_success_rate": [1.0]},
            "gradsift_refusal_b": {"doc_id": [0, 1, 2, 3], "attack_success_rate": [1.0, 0.0, 0.0, 0.0]},
        },
    }
    assert stage_metrics(record)["pooled/attack_success_rate"] == 2 / 5  # not (1.0 + 0.25) / 2


def test_over_refusal_is_one_minus_compliance_on_the_safe_prompts():
    columns = {"doc_id": [0, 1, 2, 3], "compliance_rate_safe": [1.0, None, 0.0, 0.0], "refusal_rate_unsafe": [None]}
    record = {
        "stage": "s",
        "eval": {"gradsift_overrefusal_offline": {"compliance_rate_safe": 1 / 3, "refusal_rate_unsafe": 1.0}},
        "eval_per_doc": {"gradsift_overrefusal_offline": columns},
    }
    assert stage_metrics(record)["pooled/over_refusal_rate"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------------------------------
# Runs: a real tiny one and a synthetic one
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir):
    """3 seeds × full, gradsift, random × align + 2 stages of the tiny model, judged on 4 handwritten prompts."""
    root = tmp_path_factory.mktemp("report")
    data = tiny_recipe(tiny_model_dir, arms=ARMS, seeds=list(SEEDS))
    data["evals"] = {"after_each_stage": {"tasks": ["gradsift_refusal_handwritten_offline"], "limit": 4}}
    run_recipe(load_recipe(write(root, data)), root / "run", progress=False)
    write_report(root / "run")
    return root / "run", json.loads((root / "run" / "report.json").read_text())


REFUSAL_TASKS = {"gradsift_refusal_alpha": 12, "gradsift_refusal_beta": 8}
OVERREFUSAL_TASK = "gradsift_overrefusal_offline"
# Chance that an arm's answer to a harmful prompt complies: gradsift clearly below random, full close to it.
COMPLY = {"full": 0.8, "gradsift": 0.1, "random": 0.9, "gradsift_steps": 0.1, "random_steps": 0.9}
# Each arm's kind, as the runner writes it into stage.json (`arm_kind`).
KINDS = {"full": "full", "gradsift": "select", "random": "random"}
KINDS |= {"gradsift_steps": "select", "random_steps": "random"}
# Arms trained for as many optimizer steps as `full` (`steps: full`): their stage.json has `max_steps`.
STEP_MATCHED = ("gradsift_steps", "random_steps")


def synthetic_record(rng: np.random.Generator, stage: str, comply: float, kept: int = 4) -> dict:
    """A stage.json with every metric the judge writes, drawn at random per prompt."""
    evals, per_doc = {}, {}
    for task, n in REFUSAL_TASKS.items():
        chances = [0.7 * (1 - comply), comply, 0.3 * (1 - comply)]
        verdicts = rng.choice(["refused", "complied", "neither"], size=n, p=chances)
        columns = {
            "doc_id": list(range(n)),
            **{f"{v}_rate": [float(x == v) for x in verdicts] for v in ("refused", "complied", "neither")},
            "refusal_rate": [float(x != "complied") for x in verdicts],
            "attack_success_rate": [float(x == "complied") for x in verdicts],
        }
        per_doc[task] = columns
        evals[task] = {m: float(np.mean(v)) for m, v in columns.items() if m != "doc_id"}
    refused = rng.random(6) < 0.3
    per_doc[OVERREFUSAL_TASK] = {
        "doc_id": list(range(6)),
        "compliance_rate_safe": [float(not r) if d % 2 == 0 else None for d, r in enumerate(refused)],
        "refusal_rate_unsafe": [float(r) if d % 2 else None for d, r in enumerate(refused)],
    }
    evals[OVERREFUSAL_TASK] = {
        m: float(np.mean([v for v in values if v is not None]))
        for m, values in per_doc[OVERREFUSAL_TASK].items()
        if m != "doc_id"
    }
    for task in ("gradsift_domain_sentiment", "gradsift_domain_yes_no"):
        evals[task] = {"acc": float(rng.uniform(0.3, 0.9))}
    record = {"stage": stage, "eval": evals, "eval_per_doc": per_doc}
    record["drift"] = {"pretrained": float(rng.uniform(0, 0.1)), "aligned": float(rng.uniform(0, 0.1))}
    if stage != "align":
        record.update(rows=8, kept=kept)
    return record


def write_synthetic_run(run: Path, seeds=SEEDS, legacy: bool = False, arms=ARMS, setup: bool = True) -> Path:
    """Stage files of the arms × align + 2 stages; `legacy`: as an older judge wrote them (no split, no per prompt);
    `setup`: with each arm's `arm_kind` and, step-matched, `max_steps`, as the runner writes them."""
    rng = np.random.default_rng(1234)
    for seed in seeds:
        folders = {run / f"seed-{seed}" / "00-align": synthetic_record(rng, "align", 0.5)}
        for arm in arms:
            for index, name in enumerate(("sentiment", "yes_no"), start=1):
                record = synthetic_record(rng, name, COMPLY[arm], kept=8 if arm == "full" else 4)
                if setup:
                    record["arm_kind"] = KINDS[arm]
                    record.update({"max_steps": 2} if arm in STEP_MATCHED else {})
                folders[run / f"seed-{seed}" / arm / f"{index:02d}-{name}"] = record
        for folder, record in folders.items():
            if legacy:
                record.pop("eval_per_doc")
                for task in REFUSAL_TASKS:
                    old = ("refusal_rate", "attack_success_rate")
                    record["eval"][task] = {m: record["eval"][task][m] for m in old}
            folder.mkdir(parents=True)
            (folder / "stage.json").write_text(json.dumps(record))
    return run


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    run = write_synthetic_run(tmp_path_factory.mktemp("synthetic") / "run")
    write_report(run)
    return run, json.loads((run / "report.json").read_text())


def final_records(run: Path, arm: str) -> dict[int, dict]:
    """{seed: the arm's last stage.json}, read straight from the folders."""
    out = {}
    for seed_dir in sorted(run.glob("seed-*")):
        last = sorted((seed_dir / arm).glob("*/stage.json"))[-1]
        out[int(seed_dir.name.split("-")[1])] = json.loads(last.read_text())
    return out


def refusal_docs(record: dict) -> list[float]:
    """Attack success of every prompt of every generated refusal task, in (task, doc_id) order."""
    tasks = sorted(t for t in record["eval_per_doc"] if is_refusal_task(t))
    columns = [record["eval_per_doc"][t] for t in tasks]
    return [v for c in columns for _, v in sorted(zip(c["doc_id"], c["attack_success_rate"]))]


def by_hand(record: dict, key: str) -> float:
    if key == "drift/aligned":
        return record["drift"]["aligned"]
    values = refusal_docs(record)
    return sum(values) / len(values)


def t_by_hand(values: list[float]) -> list[float]:
    n = len(values)
    mean = sum(values) / n
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * s / math.sqrt(n)
    return [mean, mean - half, mean + half]


# The tiny run's attack success is 1.0 everywhere (garbage answers), so its KL drift, which differs per seed and
# arm, checks the arithmetic on spread-out numbers as well.
CASES = [
    ("tiny_run", "pooled/attack_success_rate"),
    ("tiny_run", "drift/aligned"),
    ("synthetic_run", "pooled/attack_success_rate"),
]


@pytest.mark.parametrize(("run_name", "key"), CASES)
def test_the_final_interval_over_seeds_is_recomputed_from_the_stage_files(request, run_name, key):
    run, report = request.getfixturevalue(run_name)
    values = [by_hand(record, key) for record in final_records(run, "gradsift").values()]
    assert len(values) == 3
    mean, low, high = t_by_hand(values)
    cell = report["headline"]["arms"]["gradsift"][key]
    assert cell["n"] == 3 and cell["mean"] == pytest.approx(mean, abs=1e-9)
    assert cell["ci"] == pytest.approx([low, high], abs=1e-9)


@pytest.mark.parametrize(("run_name", "key"), CASES)
@pytest.mark.parametrize(("label", "reference"), [("vs_random", "random"), ("vs_full", "full")])
def test_the_paired_differences_are_recomputed_from_the_stage_files(request, run_name, key, label, reference):
    run, report = request.getfixturevalue(run_name)
    ours, theirs = final_records(run, "gradsift"), final_records(run, reference)
    mean, low, high = t_by_hand([by_hand(ours[s], key) - by_hand(theirs[s], key) for s in SEEDS])
    diff = report["headline"]["arms"]["gradsift"][key][label]
    assert diff["reference"] == reference and diff["seeds"] == list(SEEDS)
    assert diff["mean"] == pytest.approx(mean, abs=1e-9) and diff["ci"] == pytest.approx([low, high], abs=1e-9)


def test_a_real_runs_built_in_arms_are_compared_with_random_and_full(tiny_run):
    _, report = tiny_run  # recipe.json lists `arms: [full, gradsift, random]`, dumped as ArmSpec's defaults
    setups = {name: (arm["kind"], arm["steps"], arm["references"]) for name, arm in report["arms"].items()}
    assert setups == {
        "full": ("full", None, {"vs_random": "random", "vs_full": None}),
        "gradsift": ("select", "kept", {"vs_random": "random", "vs_full": "full"}),
        "random": ("random", "kept", {"vs_random": None, "vs_full": "full"}),
    }
    assert "vs_random" not in report["headline"]["arms"]["random"]["pooled/attack_success_rate"]


def test_the_report_names_the_machine_and_torch_every_stage_ran_on(tiny_run, synthetic_run):
    import torch

    from gradsift.hardware import describe_device

    run, report = tiny_run
    stages = len(SEEDS) * (1 + len(ARMS) * 2)
    machine = {
        "name": describe_device("cpu")["name"],
        "torch": torch.__version__,
        "stages": stages,
        "evaluated": stages,
    }
    assert report["hardware"] == {"machines": [machine], "unrecorded_stages": 0}
    title, _, models, _, measured = (run / "report.md").read_text().splitlines()[:5]
    assert title.startswith("# Report: ") and models.startswith("Model ")
    assert measured.startswith(f"Measured on {machine['name']}, torch {torch.__version__} ({stages} stages).")
    assert "vary from one CPU or GPU to another" in measured
    # A stage evaluated again on another machine: its numbers come from there.
    seeds = {0: {"align": {"hardware": machine}, "arms": {"a": {1: {"hardware": machine, "evaluated_on": {
        "name": "GPU X", "torch": "9"}}}}}}  # fmt: skip
    elsewhere = hardware_of(seeds)
    assert [(m["name"], m["stages"], m["evaluated"]) for m in elsewhere["machines"]] == [
        (machine["name"], 2, 1),
        ("GPU X", 0, 1),
    ]
    assert "(2 stages trained, 1 evaluated); GPU X, torch 9 (0 stages trained, 1 evaluated)" in machines_line(
        elsewhere
    )
    run, report = synthetic_run  # stage files without `hardware`, as a run before gradsift recorded it
    assert report["hardware"] == {"machines": [], "unrecorded_stages": stages}
    assert f"The machine is not recorded ({stages} stages written before" in (run / "report.md").read_text()


def write_recipe_json(run: Path, arms: dict[str, dict]) -> None:
    """recipe.json as the runner writes it: the recipe dumped, every arm's spec with ArmSpec's defaults filled in."""
    specs = {name: ArmSpec(**spec).model_dump(mode="json") for name, spec in arms.items()}
    meta = {"name": "synthetic", "model": "none", "arms": list(arms)}
    meta["domain_tasks"] = ["gradsift_domain_sentiment", "gradsift_domain_yes_no"]
    meta["recipe"] = {"steps": "kept", "mode": "offline", "arms": specs}
    (run / "recipe.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module", params=["recipe.json", "stage.json"])
def step_matched_run(request, tmp_path_factory):
    """full, gradsift, random and the step-matched gradsift_steps, random_steps; the arms' `steps` known from
    recipe.json alone (stage files without `arm_kind` and `max_steps`), or from the stage files alone."""
    from_recipe = request.param == "recipe.json"
    arms = (*ARMS, *STEP_MATCHED)
    run = write_synthetic_run(tmp_path_factory.mktemp("steps") / "run", arms=arms, setup=not from_recipe)
    if from_recipe:
        specs = {"full": {}, "gradsift": {}, "random": {}}
        specs |= {"gradsift_steps": {"steps": "full"}, "random_steps": {"kind": "random", "steps": "full"}}
        write_recipe_json(run, specs)
    write_report(run)
    return run, json.loads((run / "report.json").read_text())


def test_each_arm_is_compared_with_the_random_arm_trained_for_as_many_steps(step_matched_run):
    _, report = step_matched_run
    references = {name: arm["references"]["vs_random"] for name, arm in report["arms"].items()}
    assert references == {
        "full": "random",
        "gradsift": "random",
        "gradsift_steps": "random_steps",
        "random": None,  # a random arm is compared with no random arm
        "random_steps": None,
    }
    assert report["arms"]["gradsift_steps"]["steps"] == "full" and report["arms"]["gradsift"]["steps"] == "kept"


@pytest.mark.parametrize("key", ["pooled/attack_success_rate", "drift/aligned"])
def test_the_step_matched_difference_is_recomputed_from_the_stage_files(step_matched_run, key):
    run, report = step_matched_run
    ours, theirs = final_records(run, "gradsift_steps"), final_records(run, "random_steps")
    mean, low, high = t_by_hand([by_hand(ours[s], key) - by_hand(theirs[s], key) for s in SEEDS])
    diff = report["headline"]["arms"]["gradsift_steps"][key]["vs_random"]
    assert diff["reference"] == "random_steps" and diff["seeds"] == list(SEEDS)
    assert diff["mean"] == pytest.approx(mean, abs=1e-9) and diff["ci"] == pytest.approx([low, high], abs=1e-9)
    for arm in ("random", "random_steps"):
        assert "vs_random" not in report["headline"]["arms"][arm][key]
        assert report["headline"]["arms"][arm]["vs_random"] == dict.fromkeys(report["headline"]["differences"])


@pytest.mark.parametrize("run_name", ["tiny_run", "synthetic_run"])
def test_the_prompt_bootstrap_is_recomputed_with_scipy_from_the_stage_files(request, run_name):
    run, report = request.getfixturevalue(run_name)
    rows = np.array([refusal_docs(record) for _, record in sorted(final_records(run, "gradsift").items())])

    def seed_mean_of_prompt_means(*seeds, axis):
        return np.mean([np.mean(seed, axis=axis) for seed in seeds], axis=0)

    result = stats.bootstrap(
        tuple(rows),
        seed_mean_of_prompt_means,
        n_resamples=RESAMPLES,
        vectorized=True,
        paired=True,
        axis=-1,
        method="percentile",
        rng=np.random.default_rng(0),
    )
    boot = report["headline"]["arms"]["gradsift"]["pooled/attack_success_rate"]["bootstrap"]
    assert boot["n_seeds"] == 3 and boot["n_docs"] == rows.shape[1]
    assert boot["mean"] == pytest.approx(rows.mean(), abs=1e-9)
    low, high = result.confidence_interval
    assert boot["ci"] == pytest.approx([low, high], abs=1e-9)


def refusal_rows(markdown: str, task: str) -> dict[tuple[str, str], list[str]]:
    """{(arm, stage): cells} of report.md's refusal table of one task."""
    section = markdown.split(f"## Refusal per stage: `{task}`", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| arm ")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return {(c[0], c[1]): c[2:] for c in cells}


@pytest.mark.parametrize("run_name", ["tiny_run", "synthetic_run"])
def test_the_report_shows_refused_complied_neither_for_every_arm_and_stage(request, run_name):
    run, _ = request.getfixturevalue(run_name)
    markdown = (run / "report.md").read_text()
    align = json.loads((run / "seed-0/00-align/stage.json").read_text())
    task = next(t for t in align["eval"] if t.startswith("gradsift_refusal_"))
    rows = refusal_rows(markdown, task)
    assert set(rows) == {(arm, stage) for arm in ARMS for stage in STAGE_NAMES}
    for arm in ARMS:
        for stage in STAGE_NAMES:
            folder = "00-align" if stage == "00-align" else f"{arm}/{stage}"
            metrics = json.loads((run / "seed-0" / folder / "stage.json").read_text())["eval"][task]
            for metric, cell in zip(JUDGE_METRICS, rows[(arm, stage)]):
                # A number with its interval where the judge wrote the metric, "–" where it did not (yet).
                assert (cell != "–") == (metric in metrics), (arm, stage, metric, cell)
                assert cell == "–" or cell.endswith("]")


def headline_cells(markdown: str) -> dict[str, dict[str, str]]:
    """{arm: {column: cell}} of report.md's headline table."""
    section = markdown.split("## Headline", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    header, *rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return {row[0]: dict(zip(header, row)) for row in rows}


# report.md's headline difference column -> (report.json's headline key, the difference's key).
DIFFERENCE_COLUMNS = {
    "Δ attack success vs random ref.": ("vs_random", "pooled/attack_success_rate"),
    "Δ refusal vs random ref.": ("vs_random", "pooled/refusal_rate"),
    "Δ ACC vs random ref.": ("vs_random", "average_accuracy"),
    "Δ attack success vs full": ("vs_full", "pooled/attack_success_rate"),
}


def test_the_headline_marks_exactly_the_differences_whose_interval_excludes_zero(synthetic_run):
    assert_marks_match_intervals(*synthetic_run)


def test_the_headline_names_each_arms_random_reference_and_marks_its_differences(step_matched_run):
    assert_marks_match_intervals(*step_matched_run)


def assert_marks_match_intervals(run: Path, report: dict) -> None:
    """Every difference column of report.md's headline: † exactly where report.json's interval excludes 0, "–"
    where the arm has no such reference; and the random reference named."""
    cells = headline_cells((run / "report.md").read_text())
    marks = total = 0
    for arm, row in report["headline"]["arms"].items():
        assert cells[arm]["random ref."] == (row["references"]["vs_random"] or "–")
        for column, (label, key) in DIFFERENCE_COLUMNS.items():
            cell, diff = cells[arm][column], row[label][key]
            if diff is None:  # the arm is its own or has no reference
                assert cell == "–", (arm, column, cell)
                continue
            low, high = diff["ci"]
            assert cell.endswith("†") == (low > 0 or high < 0), (arm, column, cell)
            marks += cell.endswith("†")
            total += 1
    assert 0 < marks < total  # gradsift's safety differs from random and full, the rest does not


def test_stage_files_from_an_older_judge_still_report_with_dashes(tmp_path):
    run = write_synthetic_run(tmp_path / "run", legacy=True)
    write_report(run)
    markdown = (run / "report.md").read_text()
    for cells in refusal_rows(markdown, "gradsift_refusal_alpha").values():
        assert cells[:3] == ["–", "–", "–"] and cells[3] != "–" and cells[5] == "–"  # no per-prompt bootstrap
    # Two refusal tasks without per-prompt values cannot be pooled over prompts.
    gradsift = json.loads((run / "report.json").read_text())["headline"]["arms"]["gradsift"]
    assert gradsift["pooled/attack_success_rate"]["mean"] is None


def test_with_one_seed_the_report_prints_the_values_says_so_once_and_keeps_the_prompt_bootstrap(tmp_path):
    run = write_synthetic_run(tmp_path / "run", seeds=(0,))
    write_report(run)
    report = json.loads((run / "report.json").read_text())
    cell = report["headline"]["arms"]["gradsift"]["pooled/attack_success_rate"]
    assert cell["ci"] is None and cell["bootstrap"]["ci"] is not None
    text = (run / "report.md").read_text()
    headline = text.split("## Headline")[1].split("\n## ")[0]
    row = next(line for line in headline.splitlines() if line.startswith("| gradsift | 02-yes_no | "))
    assert f"| {cell['mean']:.3f} |" in row  # the value alone
    assert "[n/a]" not in headline and "n/a" not in text
    assert text.count("one seed: no interval over seeds") == 1


def test_report_json_is_strict_json_when_a_stage_holds_a_non_finite_number(tmp_path):
    run = write_synthetic_run(tmp_path / "run", seeds=(0, 1))
    for stage in run.glob("seed-*/*/0[12]-*/stage.json"):  # as a run before strict stage.json could write them
        record = json.loads(stage.read_text())
        record["drift"]["aligned"] = float("nan")
        stage.write_text(json.dumps(record))
    write_report(run)
    text = (run / "report.json").read_text()
    report = json.loads(text, parse_constant=lambda token: pytest.fail(f"{token} in report.json"))
    assert report["headline"]["arms"]["gradsift"]["pooled/attack_success_rate"]["mean"] is not None
    assert "| gradsift | 02-yes_no |" in (run / "report.md").read_text()


def test_a_folder_without_finished_stages_is_a_user_error(tmp_path, capsys):
    from gradsift.cli import main

    assert main(["report", str(tmp_path)]) == 2
    assert "holds no finished stage (stage.json); run `gradsift run` first" in capsys.readouterr().err


def test_the_plots_draw_attack_success_refusal_and_over_refusal(synthetic_run):
    run, _ = synthetic_run
    for name in ("attack_success", "refusal", "overrefusal", "kept_fraction", "drift", "accuracy_matrix_random"):
        assert (run / f"{name}.png").stat().st_size > 1000, name


def test_gradsift_report_does_not_import_torch(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)  # with score tables, for the gradient-norm histograms
    code = (
        "import sys; from gradsift.cli import main; rc = main(['report', sys.argv[1], '-q']); "
        "assert rc == 0; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"
    assert (run / "grad_norms.png").is_file()


def test_anchor_cos_histogram_only_for_stages_scored_with_an_anchor(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gradsift.report.plots import _score_histograms
    from gradsift.store import write_table
    from gradsift.table import ScoreTable

    n = 8
    for arm, anchored in (("anchor", True), ("gradsift", False)):
        stage = tmp_path / "seed-0" / arm / "01-howto"
        (stage / "scores").mkdir(parents=True)
        table = ScoreTable(
            index=np.arange(n), sample_id=np.array([f"{i}#0" for i in range(n)], dtype=object), loss=np.ones(n),
            grad_norm=np.linspace(1, 2, n), num_tokens=np.full(n, 9), num_response_tokens=np.full(n, 3),
            truncated=np.zeros(n, dtype=bool), status=np.array(["ok"] * n, dtype=object),
            anchor_dot=np.linspace(-1, 1, n) if anchored else np.full(n, np.nan),
            anchor_cos=np.linspace(-0.5, 0.5, n) if anchored else np.full(n, np.nan),
        )  # fmt: skip
        write_table(table, stage / "scores" / "scores.parquet")
        cut = {"kept_anchor_cos_range": [0.1, 0.5]} if anchored else {}
        (stage / "stage.json").write_text(json.dumps({"selection": cut}))
    assert _score_histograms(tmp_path, plt, "anchor_cos", "cosine") == tmp_path / "anchor_cos.png"
    assert (tmp_path / "anchor_cos.png").is_file()
    assert _score_histograms(tmp_path, plt, "grad_norm", "norm") == tmp_path / "grad_norms.png"
    shutil.rmtree(tmp_path / "seed-0" / "anchor")  # no stage scored with an anchor set: no anchor plot
    (tmp_path / "anchor_cos.png").unlink()
    assert _score_histograms(tmp_path, plt, "anchor_cos", "cosine") is None
    assert not (tmp_path / "anchor_cos.png").exists()


def test_each_online_arm_is_read_against_the_online_random_arm_of_the_paper_recipe():
    # Algorithm 1 keeps 4 rows of every batch for as many steps as `full`: its fair random baseline draws 4 random
    # rows of every batch (`random_online`), not the offline 20 % subset, which trains a fifth of the steps.
    from gradsift.continual import load_recipe
    from gradsift.report.build import arm_setup, random_reference

    paper = Path(__file__).resolve().parents[1] / "recipes" / "paper-smollm2.yaml"
    recipe = load_recipe(paper).model_dump(mode="json")  # as recipe.json holds it
    setups = {name: arm_setup(name, recipe, []) for name in recipe["arms"]}
    assert setups["high_online"] == {"kind": "select", "steps": None, "online": True, "rule": "high", "match": None}
    references = {name: random_reference(name, setups) for name in setups}
    assert references == {
        "full": "random",
        "gradsift_online": "random_online",
        "random_online": None,
        "high_online": "random_online",
        "random": None,
        "gradsift": "random",
        "clip": "random",
        "kl": "random",
        "ewc": "random",
        "olora": "random",
    }
    # A random arm sized to an arm by its `match` is that arm's reference; the others keep `random`.
    contaminated = paper.parent / "contaminated-smollm2.yaml"
    recipe = load_recipe(contaminated).model_dump(mode="json")
    setups = {name: arm_setup(name, recipe, []) for name in recipe["arms"]}
    references = {name: random_reference(name, setups) for name in setups}
    assert references == {
        "full": "random",
        "clean": "random",
        "detector": "random_detector",
        "moderate": "random",
        "anchor": "random",
        "random": None,
        "random_detector": None,
    }
    # Without the dumped recipe, stage records tell an online arm (its rule is then unknown: no online reference).
    assert arm_setup("x", {}, [{"arm_kind": "select", "online_rows": 60}])["online"] is True


def test_the_paper_layout_table_gives_each_tasks_final_accuracy_from_the_stage_files(step_matched_run):
    run, report = step_matched_run
    markdown = (run / "report.md").read_text()
    if not report["recipe"].get("domain_tasks"):  # without recipe.json: no task list, no table
        assert "the paper's layout" not in markdown
        return
    section = markdown.split("## The final stage per task", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    header, *rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    cells = {row[0]: dict(zip(header, row)) for row in rows}
    assert list(cells) == ["aligned model (start)", *report["headline"]["arms"]]
    for arm in report["headline"]["arms"]:
        for task, column in (
            ("gradsift_domain_sentiment", "domain_sentiment"),
            ("gradsift_domain_yes_no", "domain_yes_no"),
        ):
            values = [record["eval"][task]["acc"] for record in final_records(run, arm).values()]
            mean, low, high = t_by_hand(values)
            assert cells[arm][column] == f"{mean:.3f} [{low:.3f}, {high:.3f}]", (arm, task)
        assert cells[arm]["random ref."] == (report["headline"]["arms"][arm]["references"]["vs_random"] or "–")
    aligned = [
        json.loads(p.read_text())["eval"]["gradsift_domain_yes_no"]["acc"]
        for p in run.glob("seed-*/00-align/stage.json")
    ]
    mean, low, high = t_by_hand(aligned)
    assert cells["aligned model (start)"]["domain_yes_no"] == f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def test_accuracy_by_length_bins_each_task_by_the_metric_its_samples_log(tmp_path):
    """A `ref_byte_prob` task (Alpaca, GSM8K) logs no `acc`: it is binned by `ref_byte_prob`, and a task logging
    both (MedMCQA) by `ref_byte_prob` too, as `accuracy_metric` reads the task's results."""
    from gradsift.report import length_bin_accuracy

    run_eval = tmp_path / "eval" / "run"
    run_eval.mkdir(parents=True)
    alpaca = [
        ({"question": "q", "reply": "one two"}, 0.5),
        ({"question": "q", "reply": "one two three"}, 0.7),
        ({"question": "q", "reply": "a b c d"}, 0.9),
    ]
    lines = [json.dumps({"doc": doc, "ref_byte_prob": p}) for doc, p in alpaca]
    (run_eval / "samples_gradsift_domain_alpaca_offline_2026-01-01T00-00-00.jsonl").write_text("\n".join(lines) + "\n")
    mc = [json.dumps({"doc": {"question": "q", "choices": ["x"], "gold": 0}, "acc": 1.0, "ref_byte_prob": 0.25})]
    (run_eval / "samples_gradsift_domain_medmcqa_offline_2026-01-01T00-00-00.jsonl").write_text(mc[0] + "\n")
    out = length_bin_accuracy(tmp_path)
    assert out["gradsift_domain_alpaca_offline"] == {
        "1–2 words": {"acc": 0.5, "n": 1, "metric": "ref_byte_prob"},
        "3–8 words": {"acc": pytest.approx(0.8), "n": 2, "metric": "ref_byte_prob"},
    }
    # No reference answer: one "word" bin; the MC task's ref_byte_prob, not its acc.
    assert out["gradsift_domain_medmcqa_offline"] == {"1–2 words": {"acc": 0.25, "n": 1, "metric": "ref_byte_prob"}}
