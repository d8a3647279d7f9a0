"""The report's data (report.json): per arm and seed the stages' numbers, aggregated over seeds, and the headline.

Each arm is compared, paired by seed, with a random arm and with the `full` arm (`paired_difference`). An arm's
random reference is the random-kind arm trained under the same `steps` setting (`kept` or `full`, from
recipe.json; without it, `full` where the arm's stage.json has `max_steps`), else `random`, so that a step-matched
arm (`steps: full`) is not credited with a difference that only its extra optimizer steps made; random-kind arms get
none (`random_reference`).

In report.json every aggregated number is a cell {"mean", "std", "ci": [low, high] | None, "n"}, with "bootstrap"
(prompt level) where stage.json has per-prompt values and "vs_random" / "vs_full" (paired differences, with their
"seeds" and the "reference" arm): under `arms.<arm>.mean.stages.<k>.<metric>` and
`arms.<arm>.mean.<ACC/BWT/FM/max drop key>`. `arms.<arm>.kind` and `.steps` say how the arm trained and
`arms.<arm>.references` ({"vs_random", "vs_full"}: arm name or None) what it is compared with; `headline` repeats
the final stage's cells per arm, with its "vs_random", "vs_full" and "references", and `headline.aligned` the align
stage's cells (the start every arm is read against; None without an align stage).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gradsift.config import SelectionConfig
from gradsift.continual.layout import RunLayout
from gradsift.continual.schema import BUILTIN_ARMS, NAMED_KINDS, STEPPED_KINDS, ArmSpec
from gradsift.report.stages import (
    FORGETTING_KEYS,
    accuracy_matrix,
    collect,
    doc_values,
    forgetting,
    hardware_of,
    length_bin_accuracy,
    stage_metrics,
)
from gradsift.report.stats import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    CONFIDENCE,
    bootstrap_rate,
    paired_difference,
    t_interval,
)

# The kind of a built-in arm name, as `Recipe.arm` fills it in (the rest are `select`); recipe.json dumps the spec as
# written, with ArmSpec's default `kind: select` even for `random: {}` or `random: {steps: full}`.
BUILTIN_KINDS = {kind: kind for kind in NAMED_KINDS}
DEFAULT_RULE = SelectionConfig().rule


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
    setups = {name: {key: arm.get(key) for key in SETUP_KEYS} for name, arm in arms.items()}
    for name, arm in arms.items():
        full = "full" if "full" in arms and name != "full" else None
        arm["references"] = {"vs_random": random_reference(name, setups), "vs_full": full}
    _add_differences(arms)
    return {
        "run_dir": str(run_dir),
        "recipe": recipe_meta,
        "seeds": sorted(seeds),
        "hardware": hardware_of(seeds),
        "statistics": {
            "confidence": CONFIDENCE,
            "over_seeds": "Student t: mean ± t.ppf(0.975, n−1)·s/√n, s with ddof=1; None below two seeds",
            "differences": "vs_random / vs_full: arm − reference paired by seed, same t interval; vs_random's "
            "reference is, for an online arm, the online arm with the random rule, else the random-kind arm sized to "
            "it (`match`) with the same steps setting, else one with the same steps setting, else `random`",
            "over_prompts": {"method": "percentile", "n_resamples": n_resamples, "seed": BOOTSTRAP_SEED},
        },
        "headline": {**headline(arms), "aligned": aligned_row(seeds, tasks, n_resamples)},
        "arms": arms,
    }


def aligned_row(seeds: dict[int, dict[str, Any]], tasks: list[str | None] | None, n_resamples: int) -> Any:
    """The starting point every arm is read against: the align stage's numbers over seeds (cells as in `arms`), its
    ACC the mean accuracy on the domain tasks before any task stage; None without an align stage."""
    per_seed: dict[int, dict[str, Any]] = {}
    docs: dict[str, dict[int, dict]] = {"0": {}}
    for seed, entry in seeds.items():
        record = entry["align"]
        if record is None:
            continue
        metrics = {"name": record["stage"], **stage_metrics(record)}
        domain = tasks or [task for task in record.get("eval", {}) if task.startswith("gradsift_domain_")]
        accuracies = [a for a in accuracy_matrix(record, {}, domain)[0] if a is not None]
        metrics["average_accuracy"] = sum(accuracies) / len(accuracies) if accuracies else None
        per_seed[seed] = {"stages": {"0": metrics}, **{key: None for key in FORGETTING_KEYS}}
        docs["0"][seed] = doc_values(record)
    if not per_seed:
        return None
    cells = _aggregate(per_seed, docs, n_resamples)["stages"]["0"]
    stage = f"00-{cells.pop('name')}"
    return {"stage": stage, **{key: cells.get(key) for key in HEADLINE.values()}, "stage_cells": cells}


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


SETUP_KEYS = ("kind", "steps", "online", "rule", "match")  # `arm_setup`'s keys, what `random_reference` reads


def arm_setup(name: str, recipe: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Return how an arm trained: {"kind": an `ArmSpec.kind`, "steps": "kept" | "full" | None, "online": whether it
    selected inside each batch, "rule": an online arm's selection rule (else None), "match": the arm a random arm's
    `match` names (else None)}.

    `steps` is None where the setting does not apply (online arms and the other kinds train on every row). Read from
    the dumped recipe (recipe.json's `recipe`) when it lists the arm, as the runner decides it; otherwise from the
    arm's stage.json files: `arm_kind` (else the built-in meaning of the name), `full` where one has `max_steps`,
    online where one has `online_rows` (its rule then unknown), and no `match`.
    """
    return {**_trained_as(name, recipe, records), "match": ((recipe.get("arms") or {}).get(name) or {}).get("match")}


def _trained_as(name: str, recipe: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """`arm_setup` but its `match`."""
    spec = (recipe.get("arms") or {}).get(name)
    if spec is not None:
        default = ArmSpec().kind
        kind = spec.get("kind", default)
        if name in BUILTIN_ARMS and kind == default:  # `random: {}` is dumped with `kind: select`
            kind = BUILTIN_KINDS.get(name, default)
        online = kind == "select" and (spec.get("mode") or recipe.get("mode")) == "online"
        stepped = kind in STEPPED_KINDS and not online
        steps = (spec.get("steps") or recipe.get("steps") or "kept") if stepped else None
        rule = (spec.get("selection") or {}).get("rule") or (recipe.get("selection") or {}).get("rule")
        return {"kind": kind, "steps": steps, "online": online, "rule": (rule or DEFAULT_RULE) if online else None}
    kinds = {record["arm_kind"] for record in records if "arm_kind" in record}
    kind = kinds.pop() if len(kinds) == 1 else BUILTIN_KINDS.get(name, "select")
    online = any("online_rows" in record for record in records)
    if any("max_steps" in record for record in records):
        return {"kind": kind, "steps": "full", "online": online, "rule": None}
    return {"kind": kind, "steps": "kept" if kind in STEPPED_KINDS else None, "online": online, "rule": None}


def random_reference(name: str, setups: Mapping[str, Mapping[str, Any]]) -> str | None:
    """Return the arm that `name`'s `vs_random` compares with: for an online arm, the online arm with the `random`
    rule (random rows of every batch, the same steps: the paper's fair baseline for an online method); otherwise the
    random-kind arm with the same `steps` setting (the one sized to it by its `match` first, then `random`, then by
    name); else `random`. None for a random arm (of either kind) or when there is none."""
    if setups[name]["kind"] == "random" or (setups[name].get("online") and setups[name].get("rule") == "random"):
        return None
    if setups[name].get("online"):
        online_random = sorted(
            other for other, setup in setups.items() if setup.get("online") and setup.get("rule") == "random"
        )
        if online_random:
            return online_random[0]
    steps = setups[name]["steps"]
    matched = sorted(
        (setup.get("match") != name, other != "random", other)
        for other, setup in setups.items()
        if other != name and setup["kind"] == "random" and steps is not None and setup["steps"] == steps
    )
    if matched:
        return matched[0][-1]
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
    "benign refusal": "pooled/benign_refusal_rate",
    "ACC": "average_accuracy",
    "BWT": "bwt",
    "kept": "kept_fraction",
    # A contaminated stage's rows by label (`label_column`, the packaged sources' `kind`): harmful rows trained on,
    # and the share of the benign rows kept.
    "harmful kept": "labels/harmful/kept",
    "benign kept": "labels/benign/kept_fraction",
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


def _recipe_meta(run_dir: Path) -> dict[str, Any]:
    path = RunLayout(run_dir).recipe_file
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _guess_tasks(stages: dict[int, dict]) -> list[str | None]:
    """Without recipe.json: each stage's domain task is `gradsift_domain_<stage name>` if it was evaluated."""
    last = stages[max(stages)].get("eval", {})
    return [
        f"gradsift_domain_{stages[k]['stage']}" if f"gradsift_domain_{stages[k]['stage']}" in last else None
        for k in sorted(stages)
    ]
