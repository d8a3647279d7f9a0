"""The report's PNG plots: per-stage curves with their 95 % bands, accuracy matrices and score histograms.

matplotlib (Agg) and pyarrow are imported only when plots are drawn. A band is the t interval over seeds, else (one
seed) the bootstrap over prompts.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gradsift.continual.layout import RunLayout
from gradsift.report.stages import is_overrefusal_task, is_refusal_task, short_key, task_metric
from gradsift.store import TABLE as SCORE_TABLE

# Plot -> which stage keys it draws.
PLOT_GROUPS: dict[str, Callable[[str], bool]] = {
    "attack_success": lambda k: is_refusal_task(task_metric(k)[0]) and task_metric(k)[1] == "attack_success_rate",
    "refusal": lambda k: is_refusal_task(task_metric(k)[0]) and task_metric(k)[1] == "refusal_rate",
    "overrefusal": lambda k: is_overrefusal_task(k),
    "kept_fraction": lambda k: k == "kept_fraction",
    "drift": lambda k: k.startswith("drift/"),
}


def _band(cell: dict[str, Any]) -> list[float]:
    """The t interval over seeds, else (one seed) the bootstrap over prompts, else the mean itself."""
    return cell.get("ci") or (cell.get("bootstrap") or {}).get("ci") or [cell["mean"], cell["mean"]]


def write_plots(run_dir: Path, report: dict[str, Any]) -> dict[str, Path]:
    """Draw every plot the report has data for into `run_dir`; return {plot key: PNG path} (report.md links them)."""
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
                (line,) = ax.plot(xs, [c["mean"] for _, c in cells], marker="o", label=f"{name}: {short_key(key)}")
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
    stages = list(
        layout.finished_stages(links=True)
    )  # not the seed's shared stage-1 cache: each arm keeps its own copy
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
