"""The report of a recipe run: `report.json`, `report.md` and PNG plots, every number computed from `stage.json` files.

With `a[k][j]` the accuracy on task j after stage k (k, j = 1..T; `a[0][j]` after the align stage, when there is
one), for each arm and seed:

- average accuracy `ACC = mean_j a[T][j]`
- backward transfer `BWT = mean_{j<T} (a[T][j] − a[j][j])`
- forgetting `FM = mean_{j<T} max_{j≤k<T} (a[k][j] − a[T][j])`
- max drop: the largest single-stage fall `a[k−1][j] − a[k][j]` of any task
- interference `I[k][j] = a[k][j] − a[k−1][j]`

Stage metrics (refusal, over-refusal, kept fraction, drift) and the forgetting metrics are averaged over seeds with
their standard deviation (population, 0 for one seed).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from gradsift.recipes import STAGE_FILE, iter_stage_files

REFUSAL_PREFIX = "gradsift_refusal_"
OVERREFUSAL_PREFIX = "gradsift_overrefusal_"


def collect(run_dir: Path) -> dict[str, Any]:
    """Every finished stage under `run_dir`: {seed: {"align": record | None, "arms": {arm: [record, ...]}}}."""
    seeds: dict[int, dict[str, Any]] = {}
    for seed, arm, index, record in iter_stage_files(run_dir):
        entry = seeds.setdefault(seed, {"align": None, "arms": {}})
        if arm is None:
            entry["align"] = record
        else:
            entry["arms"].setdefault(arm, {})[index] = record
    if not seeds:
        raise FileNotFoundError(f"{run_dir} holds no finished stage ({STAGE_FILE}); run `gradsift run` first.")
    return seeds


def stage_metrics(record: dict[str, Any]) -> dict[str, float | None]:
    """The headline numbers of one stage: each task's main metric, kept fraction, drift."""
    out: dict[str, float | None] = {}
    for task, metrics in record.get("eval", {}).items():
        if task.startswith(REFUSAL_PREFIX) and "refusal_rate" in metrics:
            out[f"{task}/refusal_rate"] = metrics["refusal_rate"]
        elif task.startswith(OVERREFUSAL_PREFIX):
            out[f"{task}/compliance_rate_safe"] = metrics.get("compliance_rate_safe")
            out[f"{task}/refusal_rate_unsafe"] = metrics.get("refusal_rate_unsafe")
        elif "acc" in metrics:
            out[f"{task}/acc"] = metrics["acc"]
    if "kept" in record and record.get("rows"):
        rows = record.get("online_rows", record["rows"])
        out["kept_fraction"] = record["kept"] / rows if rows else None
    for name, value in record.get("drift", {}).items():
        out[f"drift/{name}"] = value
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


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    if not kept:
        return None, None
    return float(np.mean(kept)), float(np.std(kept))


def build_report(run_dir: Path) -> dict[str, Any]:
    """The report's data: per arm, per stage metrics (mean, std over seeds) and forgetting metrics."""
    seeds = collect(run_dir)
    recipe_meta = _recipe_meta(run_dir)
    tasks = recipe_meta.get("domain_tasks")
    arms: dict[str, Any] = {}
    arm_names = sorted({arm for entry in seeds.values() for arm in entry["arms"]})
    for arm in arm_names:
        per_seed = {}
        for seed, entry in seeds.items():
            stages = entry["arms"].get(arm, {})
            if not stages:
                continue
            stage_tasks = tasks or _guess_tasks(stages)
            records = {0: entry["align"], **stages} if entry["align"] else dict(stages)
            matrix = accuracy_matrix(entry["align"], stages, stage_tasks)
            last = run_dir / f"seed-{seed}" / arm
            final_dir = sorted(p for p in last.iterdir() if (p / STAGE_FILE).is_file())[-1] if last.is_dir() else None
            per_seed[seed] = {
                "stages": {str(k): {"name": r["stage"], **stage_metrics(r)} for k, r in sorted(records.items())},
                "accuracy_matrix": matrix,
                **forgetting(matrix),
                "final_accuracy_by_length": length_bin_accuracy(final_dir) if final_dir else {},
            }
        arms[arm] = {"seeds": per_seed, "mean": _aggregate(per_seed)}
    return {"run_dir": str(run_dir), "recipe": recipe_meta, "seeds": sorted(seeds), "arms": arms}


# Response-length bins (words of the reference answer) for accuracy per length.
LENGTH_BINS = ((1, 2), (3, 8), (9, 20), (21, 10**9))


def _bin_label(low: int, high: int) -> str:
    return f"{low}+ words" if high >= 10**9 else f"{low}–{high} words"


def length_bin_accuracy(stage_dir: Path) -> dict[str, dict[str, dict[str, float]]]:
    """Accuracy per domain task and reference-answer length bin, from a stage's logged lm-eval samples."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for path in sorted((stage_dir / "eval").rglob("samples_gradsift_domain_*.jsonl")):
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


def _aggregate(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    if not per_seed:
        return {}
    out: dict[str, Any] = {"stages": {}}
    any_seed = next(iter(per_seed.values()))
    for k, first in any_seed["stages"].items():
        metrics = {}
        for key in first:
            if key == "name":
                continue
            values = [s["stages"].get(k, {}).get(key) for s in per_seed.values()]
            mean, std = _mean_std(values)
            metrics[key] = {"mean": mean, "std": std}
        out["stages"][k] = {"name": first["name"], **metrics}
    for key in ("average_accuracy", "bwt", "fm", "max_drop"):
        mean, std = _mean_std([s[key] for s in per_seed.values()])
        out[key] = {"mean": mean, "std": std}
    return out


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------


def write_report(run_dir: Path, plots: bool = True) -> dict[str, Path]:
    """Write report.json, report.md and the plots into `run_dir`; return their paths."""
    from gradsift.data import atomic_path
    from gradsift.store import write_json

    report = build_report(run_dir)
    paths = {"json": run_dir / "report.json", "md": run_dir / "report.md"}
    write_json(report, paths["json"])
    figures = _plots(run_dir, report) if plots else {}
    with atomic_path(paths["md"]) as tmp:
        Path(tmp).write_text(markdown(report, figures), encoding="utf-8")
    paths.update(figures)
    return paths


def _fmt(cell: Any) -> str:
    if cell is None:
        return "–"
    if isinstance(cell, dict):
        mean, std = cell.get("mean"), cell.get("std")
        if mean is None:
            return "–"
        return f"{mean:.3f}" if not std else f"{mean:.3f} ± {std:.3f}"
    if isinstance(cell, float):
        return f"{cell:.3f}"
    return str(cell)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def stage_table(report: dict[str, Any]) -> str:
    """Arm × stage, with every headline metric as a column (mean ± std over seeds)."""
    keys: list[str] = []
    for arm in report["arms"].values():
        for stage in arm["mean"].get("stages", {}).values():
            keys += [k for k in stage if k != "name" and k not in keys]
    keys.sort(key=lambda k: (not k.startswith(REFUSAL_PREFIX), not k.startswith(OVERREFUSAL_PREFIX), k))
    rows = []
    for name, arm in report["arms"].items():
        for k, stage in arm["mean"].get("stages", {}).items():
            rows.append([name, f"{int(k):02d}-{stage['name']}", *[stage.get(key) for key in keys]])
    return _table(["arm", "stage", *[_short(k) for k in keys]], rows)


def _short(key: str) -> str:
    return key.replace("gradsift_", "").replace("_offline", "·off")


def markdown(report: dict[str, Any], figures: dict[str, Path] | None = None) -> str:
    recipe = report.get("recipe", {})
    parts = [f"# Report: {recipe.get('name', Path(report['run_dir']).name)}", ""]
    if recipe:
        parts += [f"Model `{recipe.get('model')}`, seeds {report['seeds']}, arms {', '.join(report['arms'])}.", ""]
    parts += ["## Per stage (mean ± std over seeds)", "", stage_table(report), ""]
    rows = [[name, *[arm["mean"].get(key) for key in ("average_accuracy", "bwt", "fm", "max_drop")]]
            for name, arm in report["arms"].items()]  # fmt: skip
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


def _plots(run_dir: Path, report: dict[str, Any]) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, Path] = {}
    metric_groups = {
        "refusal": lambda k: k.startswith(REFUSAL_PREFIX) and k.endswith("refusal_rate") and "_mc" not in k,
        "overrefusal": lambda k: k.startswith(OVERREFUSAL_PREFIX),
        "kept_fraction": lambda k: k == "kept_fraction",
        "drift": lambda k: k.startswith("drift/"),
    }
    for group, wanted in metric_groups.items():
        fig, ax = plt.subplots(figsize=(6.4, 3.8))
        drawn = False
        for name, arm in report["arms"].items():
            stages = arm["mean"].get("stages", {})
            keys = sorted({k for s in stages.values() for k in s if wanted(k)})
            for key in keys:
                xs = [int(k) for k, s in stages.items() if (s.get(key) or {}).get("mean") is not None]
                ys = [stages[str(x)][key]["mean"] for x in xs]
                es = [stages[str(x)][key]["std"] or 0.0 for x in xs]
                if xs:
                    ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=f"{name}: {_short(key)}")
                    drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xlabel("stage (0 = after align)")
        ax.set_ylabel(group.replace("_", " "))
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
    hist = _norm_histograms(run_dir, plt)
    if hist is not None:
        out["grad_norms"] = hist
    return out


def _norm_histograms(run_dir: Path, plt: Any) -> Path | None:
    """Gradient-norm histogram of every scored stage (first seed), with the kept range as cut lines."""
    from gradsift.store import TABLE, read_table

    panels = []
    for seed_dir in sorted(run_dir.glob("seed-*"))[:1]:
        for table_path in sorted(seed_dir.glob(f"*/*/scores/{TABLE}")):
            stage_dir = table_path.parent.parent
            record = json.loads((stage_dir / STAGE_FILE).read_text()) if (stage_dir / STAGE_FILE).is_file() else {}
            panels.append((f"{stage_dir.parent.name}/{stage_dir.name}", read_table(table_path), record))
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(6.4, 1.9 * len(panels)), squeeze=False)
    for ax, (title, table, record) in zip(axes[:, 0], panels):
        norms = table.grad_norm[np.isfinite(table.grad_norm)]
        ax.hist(norms, bins=30, color="#4c72b0")
        cut = (record.get("selection") or {}).get("kept_norm_range")
        for x in cut or []:
            ax.axvline(x, color="#c44e52", linestyle="--")
        ax.set_title(title, fontsize=8)
    axes[-1, 0].set_xlabel("per-sample gradient norm (dashed: kept range)")
    fig.tight_layout()
    path = run_dir / "grad_norms.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
