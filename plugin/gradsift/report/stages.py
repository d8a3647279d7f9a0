"""Reading a run's stages: each stage's numbers, per-prompt values, the accuracy matrix and forgetting.

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
a stage; `pooled/over_refusal_rate = 1 − compliance_rate_safe` over the safe prompts of the over-refusal tasks;
`pooled/benign_refusal_rate` is `refused_rate` over the ordinary requests of the benign-refusal tasks.

A stage's numbers are keyed `task/metric` (`task_metric` splits one), the pooled rates `pooled/...`, then
`kept_fraction` and `drift/<name>`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gradsift.continual.layout import STAGE_FILE, RunLayout, iter_stage_files
from gradsift.errors import UserError
from gradsift.evaluation import judged_task_kind
from gradsift.report.stats import finite

# The judge's rates as stage.json stores them; older runs lack some (shown "–").
REFUSAL_METRICS = ("refused_rate", "complied_rate", "neither_rate", "refusal_rate", "attack_success_rate")
OVERREFUSAL_METRICS = ("compliance_rate_safe", "refusal_rate_unsafe")
BENIGN_REFUSAL_METRICS = ("refused_rate", "complied_rate", "neither_rate")
# Arm-level numbers (one per arm and seed, from the accuracy matrix), next to the per-stage ones.
FORGETTING_KEYS = ("average_accuracy", "bwt", "fm", "max_drop")


def is_refusal_task(task: str) -> bool:
    """A generated refusal task (judged answers), not the multiple-choice likelihood one."""
    return judged_task_kind(task) == "refusal"


def is_overrefusal_task(task: str) -> bool:
    """An over-refusal task (benign prompts that look risky)."""
    return judged_task_kind(task) == "overrefusal"


def is_benign_refusal_task(task: str) -> bool:
    """A benign-refusal task (ordinary requests the model should answer)."""
    return judged_task_kind(task) == "benign_refusal"


# Pooled key -> (which tasks, their per-prompt metric, whether the pooled rate is 1 − that metric).
POOLED: dict[str, tuple[Callable[[str], bool], str, bool]] = {
    "pooled/attack_success_rate": (is_refusal_task, "attack_success_rate", False),
    "pooled/refusal_rate": (is_refusal_task, "refusal_rate", False),
    "pooled/over_refusal_rate": (is_overrefusal_task, "compliance_rate_safe", True),
    "pooled/benign_refusal_rate": (is_benign_refusal_task, "refused_rate", False),
}


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


def hardware_of(seeds: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """What the stages ran on: each distinct machine and torch, in first-seen order, with the stages trained on it
    (`stage.json`'s `hardware`) and the stages whose evals it measured (`evaluated_on` where a stage was evaluated
    again elsewhere, else its training machine); and how many stages do not say (written before gradsift recorded
    it)."""
    machines: dict[tuple[str, str], dict[str, int]] = {}
    unrecorded = 0

    def count(described: dict[str, Any], what: str) -> None:
        key = (str(described.get("name")), str(described.get("torch")))
        machines.setdefault(key, {"stages": 0, "evaluated": 0})[what] += 1

    for entry in seeds.values():
        records = [entry["align"]] if entry["align"] else []
        records += [record for stages in entry["arms"].values() for record in stages.values()]
        for record in records:
            trained, evaluated = record.get("hardware"), record.get("evaluated_on")
            if not isinstance(trained, dict):
                unrecorded += 1
                continue
            count(trained, "stages")
            count(evaluated if isinstance(evaluated, dict) else trained, "evaluated")
    found = [{"name": name, "torch": torch, **counts} for (name, torch), counts in machines.items()]
    return {"machines": found, "unrecorded_stages": unrecorded}


def stage_metrics(record: dict[str, Any]) -> dict[str, float | None]:
    """The numbers of one stage: refusal, over-refusal and benign-refusal rates (per task and pooled), accuracies,
    kept, drift."""
    out: dict[str, float | None] = {}
    evals = record.get("eval", {})
    for task, metrics in evals.items():
        if is_refusal_task(task):
            out.update({f"{task}/{m}": metrics[m] for m in REFUSAL_METRICS if m in metrics})
        elif is_overrefusal_task(task):
            out.update({f"{task}/{m}": metrics.get(m) for m in OVERREFUSAL_METRICS})
        elif is_benign_refusal_task(task):
            out.update({f"{task}/{m}": metrics[m] for m in BENIGN_REFUSAL_METRICS if m in metrics})
        elif (metric := accuracy_metric(metrics)) is not None:
            out[f"{task}/{metric}"] = metrics[metric]
    docs = doc_values(record)
    for key, (wanted, metric, flip) in POOLED.items():
        tasks = [task for task in evals if wanted(task)]
        if key in docs:
            kept = finite(docs[key].values())
            out[key] = sum(kept) / len(kept) if kept else None
        elif len(tasks) == 1:  # no per-prompt values (an older run): one task's own rate is the pooled one
            value = evals[tasks[0]].get(metric)
            out[key] = None if value is None else (1 - value if flip else value)
        elif tasks:
            out[key] = None
    if "kept" in record and record.get("rows"):
        rows = record.get("online_rows", record["rows"])
        out["kept_fraction"] = record["kept"] / rows if rows else None
    for label, counts in record.get("labels", {}).items():  # rows by their label (`label_column`), where counted
        if "kept" in counts:
            out[f"labels/{label}/kept"] = counts["kept"]
            out[f"labels/{label}/kept_fraction"] = counts["kept"] / counts["rows"] if counts["rows"] else None
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


# The metric read as a domain task's accuracy, first found: gradsift's real-data tasks report `ref_byte_prob` (the
# held-out reference answer's probability per byte: it moves where a small model's accuracy sits at chance, and the
# MedMCQA task's `acc` beside it is read as such), lm-eval's multiple-choice and synthetic tasks `acc`, gsm8k
# `exact_match`, squadv2 `exact` and `f1`.
ACCURACY_METRICS = ("ref_byte_prob", "acc", "exact_match", "exact", "f1")


def accuracy_metric(metrics: dict[str, float | None]) -> str | None:
    """The metric of a domain task's results read as its accuracy (`ACCURACY_METRICS`), or None."""
    return next((m for m in ACCURACY_METRICS if metrics.get(m) is not None), None)


def _acc(evals: dict[str, dict[str, float]], task: str | None) -> float | None:
    if task is None or task not in evals:
        return None
    metric = accuracy_metric(evals[task])
    return None if metric is None else evals[task][metric]


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


# Response-length bins (words of the reference answer) for accuracy per length.
LENGTH_BINS = ((1, 2), (3, 8), (9, 20), (21, 10**9))


def _bin_label(low: int, high: int) -> str:
    return f"{low}+ words" if high >= 10**9 else f"{low}–{high} words"


def length_bin_accuracy(stage_dir: Path) -> dict[str, dict[str, dict[str, float | int | str]]]:
    """Accuracy per domain task and reference-answer length bin, from a stage's logged lm-eval samples.

    A task's accuracy is the first of `ACCURACY_METRICS` its samples log (as `accuracy_metric` reads a
    task's results), so a `ref_byte_prob` task is binned by that; each cell names its `metric`.
    """
    out: dict[str, dict[str, dict[str, float | int | str]]] = {}
    for path in sorted(RunLayout.eval_dir(stage_dir).rglob("samples_gradsift_domain_*.jsonl")):
        task = path.name[len("samples_") :].rsplit("_", 1)[0]
        samples = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        metric = accuracy_metric(samples[0]) if samples else None
        if metric is None:
            continue
        bins: dict[str, list[float]] = {}
        for sample in samples:
            doc = sample["doc"]
            words = len(str(doc.get("reply", doc.get("answer", ""))).split())
            label = next(_bin_label(lo, hi) for lo, hi in LENGTH_BINS if lo <= max(words, 1) <= hi)
            bins.setdefault(label, []).append(float(sample[metric]))
        out[task] = {label: {"acc": float(np.mean(v)), "n": len(v), "metric": metric} for label, v in bins.items()}
    return out


def task_metric(key: str) -> tuple[str, str]:
    """A stage key `task/metric` as (task, metric); a key without "/" (`kept_fraction`) as (key, "")."""
    task, _, metric = key.partition("/")
    return task, metric


def short_key(key: str) -> str:
    """A stage key or task as the tables and plot legends show it (`gradsift_` and `_offline` shortened)."""
    return key.replace("gradsift_", "").replace("_offline", "·off")
