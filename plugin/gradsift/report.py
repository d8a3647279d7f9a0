"""The report of a recipe run: `report.json`, `report.md` and PNG plots, every number computed from `stage.json` files.

With `a[k][j]` the accuracy on task j after stage k (k, j = 1..T; `a[0][j]` after the align stage, when there is
one), for each arm and seed:

- average accuracy `ACC = mean_j a[T][j]`
- backward transfer `BWT = mean_{j<T} (a[T][j] − a[j][j])`
- forgetting `FM = mean_{j<T} max_{j≤k<T} (a[k][j] − a[T][j])`
- max drop: the largest single-stage fall `a[k−1][j] − a[k][j]` of any task
- interference `I[k][j] = a[k][j] − a[k−1][j]`

Refusal prompts: a generated refusal task (`gradsift_refusal_*`, not `_mc`) judges each answer refused, complied
(an on-topic attempt: `attack_success_rate`) or neither; `refusal_rate` counts refused or neither. The pooled rates
(`pooled/attack_success_rate`, `pooled/refusal_rate`) average over every prompt of every generated refusal task of
a stage; `pooled/over_refusal_rate = 1 − compliance_rate_safe` over the safe prompts of the over-refusal tasks.

Statistics (95 %). Seeds are the replicates; the eval prompts are the same for every seed and arm.

- Over seeds, for every arm, stage and metric: the mean with a Student-t interval
  `mean ± t_{0.975, n−1} · s / √n`, `s` the sample standard deviation (ddof = 1), n the number of seeds
  (`t_interval`), not clipped to [0, 1]. With one seed there is no interval (None, shown "n/a").
- Paired differences to a random arm and to the `full` arm: `d_s = arm_s − reference_s` for every seed s that both
  arms finished, with the same t interval over the `d_s` (`paired_difference`). An arm's random reference is the
  random-kind arm trained under the same `steps` setting (`kept` or `full`, from recipe.json; without it, `full`
  where the arm's stage.json has `max_steps`), else `random`, so that a step-matched arm (`steps: full`) is not
  credited with a difference that only its extra optimizer steps made; random-kind arms get none (`random_reference`).
  The headline marks with † a difference whose interval excludes 0.
- Over prompts: a percentile bootstrap of each per-prompt rate (`bootstrap_rate`). Rows are seeds (ascending),
  columns prompts (`(task, doc_id)` ascending); each resample draws the columns with replacement, the same draw for
  every seed, and its statistic is the mean over seeds of each seed's mean over the drawn prompts
  (`scipy.stats.bootstrap`, method="percentile", paired=True, 2,000 resamples, a fixed seed: reproducible). With one
  seed it is the only interval there is.

In report.json every aggregated number is a cell {"mean", "std", "ci": [low, high] | None, "n"}, with "bootstrap"
(prompt level) where stage.json has per-prompt values and "vs_random" / "vs_full" (paired differences, with their
"seeds" and the "reference" arm): under `arms.<arm>.mean.stages.<k>.<metric>` and
`arms.<arm>.mean.<ACC/BWT/FM/max drop key>`. `arms.<arm>.kind` and `.steps` say how the arm trained and
`arms.<arm>.references` ({"vs_random", "vs_full"}: arm name or None) what it is compared with; `headline` repeats
the final stage's cells per arm, with its "vs_random", "vs_full" and "references".
"""

from __future__ import annotations

import inspect
import json
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from gradsift.continual.layout import STAGE_FILE, RunLayout, iter_stage_files
from gradsift.continual.schema import BUILTIN_ARMS, ArmSpec
from gradsift.errors import UserError
from gradsift.evaluation import judged_task_kind
from gradsift.fileio import atomic_path, write_json

# The judge's rates as stage.json stores them; older runs lack some (shown "–").
REFUSAL_METRICS = ("refused_rate", "complied_rate", "neither_rate", "refusal_rate", "attack_success_rate")
OVERREFUSAL_METRICS = ("compliance_rate_safe", "refusal_rate_unsafe")
# gradsift.store's score table file name; store itself imports torch (via scoring), which `report` must not.
SCORE_TABLE = "scores.parquet"
# Arm-level numbers (one per arm and seed, from the accuracy matrix), next to the per-stage ones.
FORGETTING_KEYS = ("average_accuracy", "bwt", "fm", "max_drop")

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
# The kind of a built-in arm name, as `Recipe.arm` fills it in (the rest are `select`); recipe.json dumps the spec as
# written, with ArmSpec's default `kind: select` even for `random: {}` or `random: {steps: full}`.
BUILTIN_KINDS = {"full": "full", "random": "random", "clip": "clip", "kl": "kl"}
# Kinds whose number of optimizer steps the `steps` setting decides (full, clip and kl train on every row).
STEPPED_KINDS = ("select", "random")
# `rng` replaced `random_state` in SciPy 1.15; given the same Generator both draw the same numbers.
_RNG_KEYWORD = "rng" if "rng" in inspect.signature(stats.bootstrap).parameters else "random_state"


def is_refusal_task(task: str) -> bool:
    """A generated refusal task (judged answers), not the multiple-choice likelihood one."""
    return judged_task_kind(task) == "refusal"


def is_overrefusal_task(task: str) -> bool:
    """An over-refusal task (benign prompts that look risky)."""
    return judged_task_kind(task) == "overrefusal"


# Pooled key -> (which tasks, their per-prompt metric, whether the pooled rate is 1 − that metric).
POOLED: dict[str, tuple[Callable[[str], bool], str, bool]] = {
    "pooled/attack_success_rate": (is_refusal_task, "attack_success_rate", False),
    "pooled/refusal_rate": (is_refusal_task, "refusal_rate", False),
    "pooled/over_refusal_rate": (is_overrefusal_task, "compliance_rate_safe", True),
}

# ---------------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------------


def t_interval(values: Iterable[float | None], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Return the mean of per-seed values and its Student-t interval `mean ± t_{(1+c)/2, n−1} · s / √n`.

    `s` is the sample standard deviation (ddof=1); None and NaN values are left out. Returns {"mean", "std", "ci":
    [low, high], "n"}; with one value `std` and `ci` are None, with none `mean` is None too.
    """
    kept = _finite(values)
    n = len(kept)
    if n == 0:
        return {"mean": None, "std": None, "ci": None, "n": 0}
    mean = float(np.mean(kept))
    if n < 2:
        return {"mean": mean, "std": None, "ci": None, "n": n}
    std = float(np.std(kept, ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "ci": [mean - half, mean + half], "n": n}


def paired_difference(
    arm: Mapping[int, float | None], reference: Mapping[int, float | None], confidence: float = CONFIDENCE
) -> dict[str, Any]:
    """Return `t_interval` of `arm[s] − reference[s]` over the seeds s both have a value for, and those seeds."""
    seeds = sorted(s for s in arm if s in reference and _finite([arm[s]]) and _finite([reference[s]]))
    return {**t_interval([arm[s] - reference[s] for s in seeds], confidence), "seeds": seeds}


def bootstrap_rate(
    matrix: Sequence[Sequence[float | None]] | np.ndarray,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> dict[str, Any]:
    """Return the mean of a seeds × prompts matrix of per-prompt values and its percentile bootstrap over prompts.

    Each resample draws the prompts (columns) with replacement, the same draw for every seed (`paired=True`), and
    its statistic is the mean over seeds of each seed's mean over the drawn prompts. None/NaN marks a prompt a seed
    lacks; columns without any value (prompts the metric does not apply to) are left out first. Returns {"mean",
    "ci": [low, high], "n_seeds", "n_docs"}; `ci` is None below two prompts.
    """
    values = np.asarray(matrix, dtype=float)
    if values.ndim != 2 or values.size == 0:
        return {"mean": None, "ci": None, "n_seeds": len(values), "n_docs": 0}
    values = values[:, ~np.isnan(values).all(axis=0)]
    n_seeds, n_docs = values.shape
    if n_docs == 0:
        return {"mean": None, "ci": None, "n_seeds": n_seeds, "n_docs": 0}
    out = {"mean": float(seed_average(*values)), "ci": None, "n_seeds": n_seeds, "n_docs": n_docs}
    if n_docs < 2:
        return out
    result = stats.bootstrap(
        tuple(values),
        seed_average,
        n_resamples=n_resamples,
        vectorized=True,
        paired=True,
        axis=-1,
        confidence_level=confidence,
        method="percentile",
        **{_RNG_KEYWORD: np.random.default_rng(seed)},
    )
    out["ci"] = [float(result.confidence_interval.low), float(result.confidence_interval.high)]
    return out


def seed_average(*rows: np.ndarray, axis: int = -1) -> np.ndarray:
    """The bootstrap's statistic: each seed's (row's) mean over its prompts, averaged over the seeds."""
    with warnings.catch_warnings():
        # A draw of only prompts a seed lacks leaves that seed out of the average instead of failing.
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.stack([np.nanmean(row, axis=axis) for row in rows]), axis=0)


def _finite(values: Iterable[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(v)]


# ---------------------------------------------------------------------------------------------------------------
# Reading the stages
# ---------------------------------------------------------------------------------------------------------------


def collect(run_dir: Path) -> dict[int, dict[str, Any]]:
    """Every finished stage under `run_dir`: {seed: {"align": record | None, "arms": {arm: {index: record}}}}."""
    seeds: dict[int, dict[str, Any]] = {}
    for seed, arm, index, record in iter_stage_files(run_dir):
        entry = seeds.setdefault(seed, {"align": None, "arms": {}})
        if arm is None:
            entry["align"] = record
        else:
            entry["arms"].setdefault(arm, {})[index] = record
    if not seeds:
        raise UserError(f"{str(run_dir)!r} holds no finished stage ({STAGE_FILE}); run `gradsift run` first.")
    return dict(sorted(seeds.items()))


def stage_metrics(record: dict[str, Any]) -> dict[str, float | None]:
    """The numbers of one stage: refusal and over-refusal rates (per task and pooled), accuracies, kept, drift."""
    out: dict[str, float | None] = {}
    evals = record.get("eval", {})
    for task, metrics in evals.items():
        if is_refusal_task(task):
            out.update({f"{task}/{m}": metrics[m] for m in REFUSAL_METRICS if m in metrics})
        elif is_overrefusal_task(task):
            out.update({f"{task}/{m}": metrics.get(m) for m in OVERREFUSAL_METRICS})
        elif "acc" in metrics:
            out[f"{task}/acc"] = metrics["acc"]
    docs = doc_values(record)
    for key, (wanted, metric, flip) in POOLED.items():
        tasks = [task for task in evals if wanted(task)]
        if key in docs:
            kept = _finite(docs[key].values())
            out[key] = sum(kept) / len(kept) if kept else None
        elif len(tasks) == 1:  # no per-prompt values (an older run): one task's own rate is the pooled one
            value = evals[tasks[0]].get(metric)
            out[key] = None if value is None else (1 - value if flip else value)
        elif tasks:
            out[key] = None
    if "kept" in record and record.get("rows"):
        rows = record.get("online_rows", record["rows"])
        out["kept_fraction"] = record["kept"] / rows if rows else None
    for name, value in record.get("drift", {}).items():
        out[f"drift/{name}"] = value
    return out


def doc_values(record: dict[str, Any]) -> dict[str, dict[tuple[str, int], float | None]]:
    """Per-prompt values of one stage from its `eval_per_doc`: {"task/metric" or pooled key: {(task, doc_id): v}}.

    A pooled key is there only when every task it pools logged that metric per prompt.
    """
    out: dict[str, dict[tuple[str, int], float | None]] = {}
    for task, columns in record.get("eval_per_doc", {}).items():
        ids = [int(doc) for doc in columns.get("doc_id", [])]
        for metric in (*REFUSAL_METRICS, *OVERREFUSAL_METRICS):
            if metric in columns:
                out[f"{task}/{metric}"] = {(task, doc): value for doc, value in zip(ids, columns[metric])}
    for key, (wanted, metric, flip) in POOLED.items():
        tasks = [task for task in record.get("eval", {}) if wanted(task)]
        if tasks and all(f"{task}/{metric}" in out for task in tasks):
            out[key] = {
                doc: None if value is None else (1 - value if flip else value)
                for task in tasks
                for doc, value in out[f"{task}/{metric}"].items()
            }
    return out


def accuracy_matrix(align: dict | None, stages: dict[int, dict], tasks: list[str | None]) -> list[list[float | None]]:
    """`a[k][j]` for k = 0..T (row 0: after align, None without one) and j = 1..T (columns 0..T−1)."""
    rows = [align, *[stages.get(k) for k in range(1, len(tasks) + 1)]]
    matrix = []
    for record in rows:
        evals = (record or {}).get("eval", {})
        matrix.append([_acc(evals, task) for task in tasks])
    return matrix


# The metric read as a domain task's accuracy, first found: lm-eval's multiple-choice and synthetic tasks report
# `acc`, gsm8k `exact_match`, squadv2 `exact` and `f1`.
ACCURACY_METRICS = ("acc", "exact_match", "exact", "f1")


def _acc(evals: dict[str, dict[str, float]], task: str | None) -> float | None:
    if task is None or task not in evals:
        return None
    return next((evals[task][m] for m in ACCURACY_METRICS if evals[task].get(m) is not None), None)


def forgetting(matrix: list[list[float | None]]) -> dict[str, Any]:
    """ACC, BWT, FM, max drop and the interference matrix of one accuracy matrix (rows k = 0..T)."""
    a = [[math.nan if v is None else float(v) for v in row] for row in matrix]
    T = len(a) - 1
    final = a[T]
    acc = _nanmean(final)
    bwt = _nanmean([a[T][j - 1] - a[j][j - 1] for j in range(1, T)])
    fm = _nanmean([max(a[k][j - 1] - a[T][j - 1] for k in range(j, T)) for j in range(1, T)])
    falls = [a[k - 1][j] - a[k][j] for k in range(1, T + 1) for j in range(T)]
    falls = [f for f in falls if not math.isnan(f)]
    interference = [[_none(a[k][j] - a[k - 1][j]) for j in range(T)] for k in range(1, T + 1)]
    return {
        "average_accuracy": _none(acc),
        "bwt": _none(bwt),
        "fm": _none(fm),
        "max_drop": _none(max(falls)) if falls else None,
        "interference": interference,
    }


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def _none(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


# ---------------------------------------------------------------------------------------------------------------
# The report's data
# ---------------------------------------------------------------------------------------------------------------


def build_report(run_dir: Path, n_resamples: int = BOOTSTRAP_RESAMPLES) -> dict[str, Any]:
    """The report's data: the headline, and per arm the per-seed and aggregated (t interval, bootstrap) numbers."""
    seeds = collect(run_dir)
    recipe_meta = _recipe_meta(run_dir)
    tasks = recipe_meta.get("domain_tasks")
    arms: dict[str, Any] = {}
    arm_names = sorted({arm for entry in seeds.values() for arm in entry["arms"]})
    for arm in arm_names:
        per_seed: dict[int, dict[str, Any]] = {}
        docs: dict[str, dict[int, dict]] = {}  # stage -> seed -> doc_values, kept out of report.json
        for seed, entry in seeds.items():
            stages = entry["arms"].get(arm, {})
            if not stages:
                continue
            stage_tasks = tasks or _guess_tasks(stages)
            records = {0: entry["align"], **stages} if entry["align"] else dict(stages)
            matrix = accuracy_matrix(entry["align"], stages, stage_tasks)
            final_dir = RunLayout(run_dir).last_finished_stage(seed, arm)
            per_seed[seed] = {
                "stages": {str(k): {"name": r["stage"], **stage_metrics(r)} for k, r in sorted(records.items())},
                "accuracy_matrix": matrix,
                **forgetting(matrix),
                "final_accuracy_by_length": length_bin_accuracy(final_dir) if final_dir else {},
            }
            for k, record in records.items():
                docs.setdefault(str(k), {})[seed] = doc_values(record)
        stage_records = [record for entry in seeds.values() for record in entry["arms"].get(arm, {}).values()]
        setup = arm_setup(arm, recipe_meta.get("recipe") or {}, stage_records)
        arms[arm] = {**setup, "seeds": per_seed, "mean": _aggregate(per_seed, docs, n_resamples)}
    setups = {name: {"kind": arm["kind"], "steps": arm["steps"]} for name, arm in arms.items()}
    for name, arm in arms.items():
        full = "full" if "full" in arms and name != "full" else None
        arm["references"] = {"vs_random": random_reference(name, setups), "vs_full": full}
    _add_differences(arms)
    return {
        "run_dir": str(run_dir),
        "recipe": recipe_meta,
        "seeds": sorted(seeds),
        "statistics": {
            "confidence": CONFIDENCE,
            "over_seeds": "Student t: mean ± t.ppf(0.975, n−1)·s/√n, s with ddof=1; None below two seeds",
            "differences": "vs_random / vs_full: arm − reference paired by seed, same t interval; vs_random's "
            "reference is the random-kind arm with the same steps setting, else `random`",
            "over_prompts": {"method": "percentile", "n_resamples": n_resamples, "seed": BOOTSTRAP_SEED},
        },
        "headline": headline(arms),
        "arms": arms,
    }


def _aggregate(
    per_seed: dict[int, dict[str, Any]], docs: dict[str, dict[int, dict]], n_resamples: int
) -> dict[str, Any]:
    """Per stage and metric a t interval over seeds, with the prompt bootstrap where per-prompt values exist."""
    if not per_seed:
        return {}
    out: dict[str, Any] = {"stages": {}}
    for k in sorted({k for data in per_seed.values() for k in data["stages"]}, key=int):
        present = [data["stages"][k] for data in per_seed.values() if k in data["stages"]]
        keys = list(dict.fromkeys(key for stage in present for key in stage if key != "name"))
        cells: dict[str, Any] = {}
        for key in keys:
            cells[key] = t_interval(stage.get(key) for stage in present)
            rows = [values[key] for _, values in sorted(docs.get(k, {}).items()) if key in values]
            if rows:
                columns = sorted({doc for row in rows for doc in row})
                matrix = [[row.get(doc) for doc in columns] for row in rows]
                cells[key]["bootstrap"] = bootstrap_rate(matrix, n_resamples)
        out["stages"][k] = {"name": present[0]["name"], **cells}
    for key in FORGETTING_KEYS:
        out[key] = t_interval(data[key] for data in per_seed.values())
    return out


def arm_setup(name: str, recipe: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> dict[str, str | None]:
    """Return how an arm trained: {"kind": full/select/random/clip/kl, "steps": "kept" | "full" | None}.

    `steps` is None where the setting does not apply (full, clip, kl and online arms train on every row). Read from
    the dumped recipe (recipe.json's `recipe`) when it lists the arm, as the runner decides it; otherwise from the
    arm's stage.json files: `arm_kind` (else the built-in meaning of the name) and `full` where one has `max_steps`.
    """
    spec = (recipe.get("arms") or {}).get(name)
    if spec is not None:
        default = ArmSpec().kind
        kind = spec.get("kind", default)
        if name in BUILTIN_ARMS and kind == default:  # `random: {}` is dumped with `kind: select`
            kind = BUILTIN_KINDS.get(name, default)
        online = kind == "select" and (spec.get("mode") or recipe.get("mode")) == "online"
        stepped = kind in STEPPED_KINDS and not online
        return {"kind": kind, "steps": (spec.get("steps") or recipe.get("steps") or "kept") if stepped else None}
    kinds = {record["arm_kind"] for record in records if "arm_kind" in record}
    kind = kinds.pop() if len(kinds) == 1 else BUILTIN_KINDS.get(name, "select")
    if any("max_steps" in record for record in records):
        return {"kind": kind, "steps": "full"}
    return {"kind": kind, "steps": "kept" if kind in STEPPED_KINDS else None}


def random_reference(name: str, setups: Mapping[str, Mapping[str, str | None]]) -> str | None:
    """Return the arm that `name`'s `vs_random` compares with: the random-kind arm with the same `steps` setting
    (`random` first, then by name), else `random`; None for a random-kind arm or when there is none."""
    if setups[name]["kind"] == "random":
        return None
    steps = setups[name]["steps"]
    matched = sorted(
        (other != "random", other)
        for other, setup in setups.items()
        if other != name and setup["kind"] == "random" and steps is not None and setup["steps"] == steps
    )
    if matched:
        return matched[0][1]
    return "random" if "random" in setups and name != "random" else None


def _add_differences(arms: dict[str, Any]) -> None:
    """Add `vs_random` / `vs_full` (paired by seed) to every aggregated cell of every arm, against its `references`."""
    for arm in arms.values():
        if not arm["mean"]:
            continue
        for label, reference in arm["references"].items():
            if reference is None or reference not in arms:
                continue
            base = arms[reference]["seeds"]
            for k, stage in arm["mean"]["stages"].items():
                for key, cell in stage.items():
                    if key == "name":
                        continue
                    diff = paired_difference(_by_seed(arm["seeds"], k, key), _by_seed(base, k, key))
                    if diff["n"]:
                        cell[label] = {**diff, "reference": reference}
            for key in FORGETTING_KEYS:
                ours = {seed: data[key] for seed, data in arm["seeds"].items()}
                diff = paired_difference(ours, {seed: data[key] for seed, data in base.items()})
                if diff["n"]:
                    arm["mean"][key][label] = {**diff, "reference": reference}


def _by_seed(per_seed: dict[int, dict[str, Any]], stage: str, key: str) -> dict[int, float | None]:
    return {seed: data["stages"].get(stage, {}).get(key) for seed, data in per_seed.items()}


# Headline column -> its key (a stage key of the final stage, or an arm-level forgetting key).
HEADLINE = {
    "attack success": "pooled/attack_success_rate",
    "refusal": "pooled/refusal_rate",
    "over-refusal": "pooled/over_refusal_rate",
    "ACC": "average_accuracy",
    "BWT": "bwt",
    "kept": "kept_fraction",
    "KL to aligned": "drift/aligned",
}
HEADLINE_DIFFERENCES = ("pooled/attack_success_rate", "pooled/refusal_rate", "average_accuracy")
# The differences to `full` that report.md's headline shows (report.json has all of HEADLINE_DIFFERENCES).
HEADLINE_FULL_DIFFERENCES = ("pooled/attack_success_rate",)


def headline(arms: dict[str, Any]) -> dict[str, Any]:
    """Per arm the final stage's numbers of `HEADLINE` (cells as in `arms`; None if missing), `vs_random`, `vs_full`
    and the arms they compare with (`references`)."""
    rows: dict[str, Any] = {}
    for name, arm in arms.items():
        stages = arm["mean"].get("stages", {})
        if not stages:
            continue
        last = max(stages, key=int)
        row: dict[str, Any] = {"stage": f"{int(last):02d}-{stages[last]['name']}"}
        for key in HEADLINE.values():
            row[key] = arm["mean"].get(key) if key in FORGETTING_KEYS else stages[last].get(key)
        for label in ("vs_random", "vs_full"):
            row[label] = {key: (row[key] or {}).get(label) for key in HEADLINE_DIFFERENCES}
        row["references"] = dict(arm["references"])
        rows[name] = row
    return {"columns": list(HEADLINE.values()), "differences": list(HEADLINE_DIFFERENCES), "arms": rows}


# Response-length bins (words of the reference answer) for accuracy per length.
LENGTH_BINS = ((1, 2), (3, 8), (9, 20), (21, 10**9))


def _bin_label(low: int, high: int) -> str:
    return f"{low}+ words" if high >= 10**9 else f"{low}–{high} words"


def length_bin_accuracy(stage_dir: Path) -> dict[str, dict[str, dict[str, float]]]:
    """Accuracy per domain task and reference-answer length bin, from a stage's logged lm-eval samples."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for path in sorted(RunLayout.eval_dir(stage_dir).rglob("samples_gradsift_domain_*.jsonl")):
        task = path.name[len("samples_") :].rsplit("_", 1)[0]
        bins: dict[str, list[float]] = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            sample = json.loads(line)
            doc = sample["doc"]
            words = len(str(doc.get("reply", doc.get("answer", ""))).split())
            label = next(_bin_label(lo, hi) for lo, hi in LENGTH_BINS if lo <= max(words, 1) <= hi)
            bins.setdefault(label, []).append(float(sample["acc"]))
        out[task] = {label: {"acc": float(np.mean(v)), "n": len(v)} for label, v in bins.items()}
    return out


def _recipe_meta(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "recipe.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _guess_tasks(stages: dict[int, dict]) -> list[str | None]:
    """Without recipe.json: each stage's domain task is `gradsift_domain_<stage name>` if it was evaluated."""
    last = stages[max(stages)].get("eval", {})
    return [
        f"gradsift_domain_{stages[k]['stage']}" if f"gradsift_domain_{stages[k]['stage']}" in last else None
        for k in sorted(stages)
    ]


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------


def write_report(run_dir: Path, plots: bool = True, n_resamples: int = BOOTSTRAP_RESAMPLES) -> dict[str, Path]:
    """Write report.json, report.md and the plots into `run_dir`; return their paths."""
    report = build_report(run_dir, n_resamples)
    paths = {"json": run_dir / "report.json", "md": run_dir / "report.md"}
    write_json(report, paths["json"])  # strict JSON: a mean of nothing is null
    figures = _plots(run_dir, report) if plots else {}
    with atomic_path(paths["md"]) as tmp:
        Path(tmp).write_text(markdown(report, figures), encoding="utf-8")
    paths.update(figures)
    return paths


def _fmt(cell: Any) -> str:
    if cell is None:
        return "–"
    if isinstance(cell, dict):
        return _fmt_interval(cell)
    if isinstance(cell, float):
        return _num(cell)
    return str(cell)


def _num(value: float, signed: bool = False) -> str:
    """Three decimals; small numbers (KL drift per token) in scientific notation so they do not read as 0."""
    sign = "+" if signed else ""
    return f"{value:{sign}.3f}" if value == 0 or abs(value) >= 0.001 else f"{value:{sign}.2e}"


def _fmt_interval(cell: dict[str, Any] | None, signed: bool = False) -> str:
    """`mean [low, high]`; "n/a" for a missing interval (one seed), "–" for a missing number; † on a signed
    difference whose interval excludes 0."""
    if not cell or cell.get("mean") is None:
        return "–"
    mean = _num(cell["mean"], signed)
    ci = cell.get("ci")
    if not ci or None in ci:  # report.json holds a non-finite bound as null
        return f"{mean} [n/a]"
    mark = " †" if signed and (ci[0] > 0 or ci[1] < 0) else ""
    return f"{mean} [{_num(ci[0])}, {_num(ci[1])}]{mark}"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def headline_table(report: dict[str, Any]) -> str:
    """The headline: one row per arm, the final stage's numbers, the paired differences to the arm's random
    reference (named in a column) and to `full`."""
    data = report["headline"]["arms"]
    with_random = any(row["references"]["vs_random"] for row in data.values())
    with_full = any(row["references"]["vs_full"] for row in data.values())
    names = {key: name for name, key in HEADLINE.items()}
    header = ["arm", "final stage", *HEADLINE]
    if with_random:
        header += ["random ref.", *[f"Δ {names[key]} vs random ref." for key in HEADLINE_DIFFERENCES]]
    if with_full:
        header += [f"Δ {names[key]} vs full" for key in HEADLINE_FULL_DIFFERENCES]
    rows = []
    for name, row in data.items():
        cells = [name, row["stage"], *[_fmt_interval(row[key]) for key in HEADLINE.values()]]
        if with_random:
            cells.append(row["references"]["vs_random"])
            cells += [_fmt_interval(row["vs_random"][key], signed=True) for key in HEADLINE_DIFFERENCES]
        if with_full:
            cells += [_fmt_interval(row["vs_full"][key], signed=True) for key in HEADLINE_FULL_DIFFERENCES]
        rows.append(cells)
    return _table(header, rows)


def _refusal_tasks(report: dict[str, Any]) -> list[str]:
    stages = [stage for arm in report["arms"].values() for stage in arm["mean"].get("stages", {}).values()]
    tasks = {_task_metric(key)[0] for stage in stages for key in stage}
    return sorted(task for task in tasks if is_refusal_task(task))


def refusal_table(report: dict[str, Any], task: str) -> str:
    """Arm × stage (align included) of one refusal task: refused, complied, neither, refusal and attack success."""
    header = ["arm", "stage", "refused", "complied", "neither", "refusal", "attack success"]
    header.append("attack success (prompts)")
    rows = []
    for name, arm in report["arms"].items():
        for k, stage in arm["mean"].get("stages", {}).items():
            cells = [_fmt_interval(stage.get(f"{task}/{metric}")) for metric in REFUSAL_METRICS]
            over_prompts = (stage.get(f"{task}/attack_success_rate") or {}).get("bootstrap")
            rows.append([name, f"{int(k):02d}-{stage['name']}", *cells, _fmt_interval(over_prompts)])
    return _table(header, rows)


def stage_table(report: dict[str, Any]) -> str:
    """Arm × stage with every metric but the per-task refusal ones as a column (mean [95 % t interval])."""
    keys: list[str] = []
    for arm in report["arms"].values():
        for stage in arm["mean"].get("stages", {}).values():
            keys += [k for k in stage if k != "name" and k not in keys and not is_refusal_task(k.split("/", 1)[0])]
    keys.sort(key=lambda k: (not k.startswith("pooled/"), not is_overrefusal_task(k.split("/", 1)[0]), k))
    rows = []
    for name, arm in report["arms"].items():
        for k, stage in arm["mean"].get("stages", {}).items():
            rows.append([name, f"{int(k):02d}-{stage['name']}", *[stage.get(key) for key in keys]])
    return _table(["arm", "stage", *[_short(k) for k in keys]], rows)


def _short(key: str) -> str:
    return key.replace("gradsift_", "").replace("_offline", "·off")


def markdown(report: dict[str, Any], figures: dict[str, Path] | None = None) -> str:
    """report.md: the headline first, then refusal per stage, every stage metric, forgetting, matrices, plots."""
    recipe = report.get("recipe", {})
    parts = [f"# Report: {recipe.get('name', Path(report['run_dir']).name)}", ""]
    if recipe:
        parts += [f"Model `{recipe.get('model')}`, seeds {report['seeds']}, arms {', '.join(report['arms'])}.", ""]
    refusal_tasks = _refusal_tasks(report)
    n_resamples = report["statistics"]["over_prompts"]["n_resamples"]
    pooled = ", ".join(f"`{_short(t)}`" for t in refusal_tasks) or "none ran"
    parts += [f"## Headline (final stage, {len(report['seeds'])} seeds)", "", headline_table(report), ""]
    parts += [
        "Mean [95 % Student-t interval over seeds]; n/a: one seed, –: not measured. Attack success (complied) and "
        f"refusal pool every prompt of every generated refusal task of the stage ({pooled}); over-refusal is "
        "1 − compliance on the safe prompts of the over-refusal tasks. ACC and BWT: domain accuracy (see "
        "Forgetting); kept: fraction of the last stage's rows trained on; KL to aligned: drift per token. "
        "Δ vs random ref.: arm − the random arm trained under the same `steps` setting (kept rows only, or as many "
        "optimizer steps as full), named in the random ref. column, else `random`; random arms get none. Δ vs full: "
        "arm − full. Both paired by seed; † marks a difference whose interval excludes 0.",
        "",
    ]
    for task in refusal_tasks:
        parts += [f"## Refusal per stage: `{task}`", "", refusal_table(report, task), ""]
    if refusal_tasks:
        parts += [
            "Refusal = refused or neither; attack success = complied. Mean [95 % t interval over seeds]; the last "
            f"column: 95 % percentile bootstrap over prompts ({n_resamples:,} resamples, prompts paired across "
            "seeds). –: not in this run's stage.json (an older judge).",
            "",
        ]
    parts += ["## Per stage (mean [95 % t interval over seeds])", "", stage_table(report), ""]
    rows = [[name, *[arm["mean"].get(key) for key in FORGETTING_KEYS]] for name, arm in report["arms"].items()]
    parts += ["## Forgetting", "", _table(["arm", "ACC", "BWT", "FM", "max drop"], rows), ""]
    formulas = (
        "`ACC = mean_j a[T][j]`, `BWT = mean_{j<T}(a[T][j] − a[j][j])`, "
        "`FM = mean_{j<T} max_{j≤k<T}(a[k][j] − a[T][j])`, max drop = largest single-stage fall."
    )
    parts += [formulas, ""]
    for name, arm in report["arms"].items():
        for seed, data in arm["seeds"].items():
            width = len(data["accuracy_matrix"][0])
            tasks = report.get("recipe", {}).get("domain_tasks") or [f"task {j + 1}" for j in range(width)]
            header = ["after stage", *[_short(t or "–") for t in tasks]]
            matrix_rows = [[("align" if k == 0 else k), *row] for k, row in enumerate(data["accuracy_matrix"])]
            parts += [f"### {name}, seed {seed}: accuracy matrix a[k][j]", "", _table(header, matrix_rows), ""]
            inter = [[k + 1, *row] for k, row in enumerate(data["interference"])]
            parts += ["Interference `a[k][j] − a[k−1][j]`:", "", _table(header, inter), ""]
    rows = []
    for name, arm in report["arms"].items():
        for seed, data in arm["seeds"].items():
            for task, bins in data.get("final_accuracy_by_length", {}).items():
                for label, cell in bins.items():
                    rows.append([name, seed, _short(task), label, cell["n"], cell["acc"]])
    if rows:
        parts += ["## Accuracy by task and answer length (after the last stage)", ""]
        parts += [_table(["arm", "seed", "task", "reference answer", "n", "acc"], rows), ""]
    if figures:
        parts += ["## Plots", ""] + [f"![{key}]({path.name})" for key, path in figures.items()] + [""]
    return "\n".join(parts)


def _task_metric(key: str) -> tuple[str, str]:
    task, _, metric = key.partition("/")
    return task, metric


# Plot -> which stage keys it draws.
PLOT_GROUPS: dict[str, Callable[[str], bool]] = {
    "attack_success": lambda k: is_refusal_task(_task_metric(k)[0]) and _task_metric(k)[1] == "attack_success_rate",
    "refusal": lambda k: is_refusal_task(_task_metric(k)[0]) and _task_metric(k)[1] == "refusal_rate",
    "overrefusal": lambda k: is_overrefusal_task(k),
    "kept_fraction": lambda k: k == "kept_fraction",
    "drift": lambda k: k.startswith("drift/"),
}


def _band(cell: dict[str, Any]) -> list[float]:
    """The t interval over seeds, else (one seed) the bootstrap over prompts, else the mean itself."""
    return cell.get("ci") or (cell.get("bootstrap") or {}).get("ci") or [cell["mean"], cell["mean"]]


def _plots(run_dir: Path, report: dict[str, Any]) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out: dict[str, Path] = {}
    for group, wanted in PLOT_GROUPS.items():
        fig, ax = plt.subplots(figsize=(6.4, 3.8))
        drawn = False
        for name, arm in report["arms"].items():
            stages = arm["mean"].get("stages", {})
            keys = sorted({k for s in stages.values() for k in s if wanted(k)})
            for key in keys:
                cells = [(int(k), s[key]) for k, s in stages.items() if (s.get(key) or {}).get("mean") is not None]
                if not cells:
                    continue
                xs = [x for x, _ in cells]
                (line,) = ax.plot(xs, [c["mean"] for _, c in cells], marker="o", label=f"{name}: {_short(key)}")
                bands = [_band(c) for _, c in cells]
                ax.fill_between(xs, [b[0] for b in bands], [b[1] for b in bands], color=line.get_color(), alpha=0.2)
                drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("stage (0 = after align)")
        ax.set_ylabel(f"{group.replace('_', ' ')} (band: 95 % CI)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        path = run_dir / f"{group}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out[group] = path
    for name, arm in report["arms"].items():
        seeds = list(arm["seeds"].values())
        if not seeds:
            continue
        matrix = np.array([[np.nan if v is None else v for v in row] for row in seeds[0]["accuracy_matrix"]])
        if len(seeds) > 1:
            stack = [[[np.nan if v is None else v for v in row] for row in s["accuracy_matrix"]] for s in seeds]
            mean = np.nanmean(stack, axis=0)
        else:
            mean = matrix
        fig, ax = plt.subplots(figsize=(4.8, 3.8))
        image = ax.imshow(mean, vmin=0, vmax=1, cmap="viridis")
        ax.set_xlabel("task j")
        ax.set_ylabel("after stage k (0 = align)")
        ax.set_title(f"{name}: accuracy a[k][j]")
        fig.colorbar(image)
        path = run_dir / f"accuracy_matrix_{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out[f"accuracy_matrix_{name}"] = path
    for key, column, label in HISTOGRAMS:
        hist = _score_histograms(run_dir, plt, column, label)
        if hist is not None:
            out[key] = hist
    return out


# Plots of a score column of every scored stage: (report key and file name, column, x-axis label).
HISTOGRAMS = (
    ("grad_norms", "grad_norm", "per-sample gradient norm"),
    ("anchor_cos", "anchor_cos", "cosine of the row's gradient with the anchor set's mean gradient"),
)


def _score_histograms(run_dir: Path, plt: Any, column: str, label: str) -> Path | None:
    """A histogram of `column` for every scored stage (first seed) that has it, the kept range as cut lines."""
    import pyarrow.parquet as pq

    panels = []
    layout = RunLayout(run_dir)
    stages = list(layout.finished_stages())  # not the seed's shared stage-1 cache: each arm keeps its own copy
    first = min((seed for seed, *_ in stages), default=None)
    for seed, arm, _, stage_dir in stages:
        table_path = RunLayout.scores(stage_dir) / SCORE_TABLE
        if seed != first or arm is None or not table_path.is_file():
            continue
        if column not in pq.read_schema(table_path).names:
            continue  # scored before the column existed
        values = np.array(pq.read_table(table_path, columns=[column])[column].to_pylist(), dtype=float)
        if not np.isfinite(values).any():
            continue  # e.g. anchor_cos of a stage scored without an anchor set
        record = json.loads(RunLayout.stage_file(stage_dir).read_text(encoding="utf-8"))
        cut = (record.get("selection") or {}).get(f"kept_{'norm' if column == 'grad_norm' else column}_range")
        panels.append((f"{stage_dir.parent.name}/{stage_dir.name}", values, cut))
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(6.4, 1.9 * len(panels)), squeeze=False)
    for ax, (title, values, cut) in zip(axes[:, 0], panels):
        ax.hist(values[np.isfinite(values)], bins=30, color="#4c72b0")
        for x in cut or []:
            ax.axvline(x, color="#c44e52", linestyle="--")
        ax.set_title(title, fontsize=8)
    axes[-1, 0].set_xlabel(f"{label} (dashed: kept range)")
    fig.tight_layout()
    path = run_dir / ("grad_norms.png" if column == "grad_norm" else f"{column}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
