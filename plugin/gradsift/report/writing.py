"""Writing the report into the run folder: report.json, report.md and the plots (`write_report`).

report.md opens with the headline (the final stage per arm, with the paired differences to the arm's random
reference and to `full`), then refusal per stage of each generated refusal task, every stage metric, forgetting, the
accuracy and interference matrices, accuracy per answer length and the plots. Cells read `mean [low, high]` (the
95 % t interval over seeds): "n/a" where there is no interval or a bound is not finite, "–" where the number was not
measured; a one-seed report prints the mean alone and says once that it has no interval over seeds. The headline
marks with † a difference whose interval excludes 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gradsift.fileio import atomic_path, write_json
from gradsift.report.build import HEADLINE, HEADLINE_DIFFERENCES, HEADLINE_FULL_DIFFERENCES, build_report
from gradsift.report.plots import write_plots
from gradsift.report.stages import (
    ACCURACY_METRICS,
    FORGETTING_KEYS,
    REFUSAL_METRICS,
    is_overrefusal_task,
    is_refusal_task,
    short_key,
    task_metric,
)
from gradsift.report.stats import BOOTSTRAP_RESAMPLES


def write_report(run_dir: Path, plots: bool = True, n_resamples: int = BOOTSTRAP_RESAMPLES) -> dict[str, Path]:
    """Write report.json, report.md and the plots into `run_dir`; return their paths."""
    report = build_report(run_dir, n_resamples)
    paths = {"json": run_dir / "report.json", "md": run_dir / "report.md"}
    write_json(report, paths["json"])  # strict JSON: a mean of nothing is null
    figures = write_plots(run_dir, report) if plots else {}
    with atomic_path(paths["md"]) as tmp:
        Path(tmp).write_text(markdown(report, figures), encoding="utf-8")
    paths.update(figures)
    return paths


def one_seed(report: dict[str, Any]) -> bool:
    """Whether the report has one seed, so no interval over seeds anywhere."""
    return len(report["seeds"]) == 1


def _fmt(cell: Any, bare: bool = False) -> str:
    if cell is None:
        return "–"
    if isinstance(cell, dict):
        return _fmt_interval(cell, bare=bare)
    if isinstance(cell, float):
        return _num(cell)
    return str(cell)


def _num(value: float, signed: bool = False) -> str:
    """Three decimals; small numbers (KL drift per token) in scientific notation so they do not read as 0."""
    sign = "+" if signed else ""
    return f"{value:{sign}.3f}" if value == 0 or abs(value) >= 0.001 else f"{value:{sign}.2e}"


def _fmt_interval(cell: dict[str, Any] | None, signed: bool = False, bare: bool = False) -> str:
    """`mean [low, high]`; "n/a" for a missing interval or a non-finite bound, or with `bare` (a one-seed report,
    which says once that it has no interval over seeds) the mean alone where there is no interval; "–" for a missing
    number; † on a signed difference whose interval excludes 0."""
    if not cell or cell.get("mean") is None:
        return "–"
    mean = _num(cell["mean"], signed)
    ci = cell.get("ci")
    if not ci and bare:
        return mean
    if not ci or None in ci:  # report.json holds a non-finite bound as null
        return f"{mean} [n/a]"
    mark = " †" if signed and (ci[0] > 0 or ci[1] < 0) else ""
    return f"{mean} [{_num(ci[0])}, {_num(ci[1])}]{mark}"


def _table(header: list[str], rows: list[list[Any]], bare: bool = False) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c, bare) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def headline_table(report: dict[str, Any]) -> str:
    """The headline: the aligned model's row first (the align stage, the start of every arm), then one row per arm:
    the final stage's numbers, the paired differences to the arm's random reference (named in a column) and to
    `full`."""
    data = report["headline"]["arms"]
    with_random = any(row["references"]["vs_random"] for row in data.values())
    with_full = any(row["references"]["vs_full"] for row in data.values())
    names = {key: name for name, key in HEADLINE.items()}
    aligned = report["headline"].get("aligned")
    # A column no row measured (over-refusal where no over-refusal task ran) is left out.
    shown = {
        name: key
        for name, key in HEADLINE.items()
        if any((row.get(key) or {}).get("mean") is not None for row in (*data.values(), aligned or {}))
    }
    header = ["arm", "final stage", *shown]
    to_random = [key for key in HEADLINE_DIFFERENCES if key in shown.values()]
    to_full = [key for key in HEADLINE_FULL_DIFFERENCES if key in shown.values()]
    if with_random:
        header += ["random ref.", *[f"Δ {names[key]} vs random ref." for key in to_random]]
    if with_full and to_full:
        header += [f"Δ {names[key]} vs full" for key in to_full]
    rows = []
    bare = one_seed(report)
    if aligned:  # the starting point: every arm's erosion is read against it
        rows.append(
            [
                "aligned model (start)",
                aligned["stage"],
                *[_fmt_interval(aligned[k], bare=bare) for k in shown.values()],
            ]
        )
        rows[0] += ["–"] * (len(header) - len(rows[0]))
    for name, row in data.items():
        cells = [name, row["stage"], *[_fmt_interval(row[key], bare=bare) for key in shown.values()]]
        if with_random:
            cells.append(row["references"]["vs_random"])
            cells += [_fmt_interval(row["vs_random"][key], True, bare) for key in to_random]
        if with_full and to_full:
            cells += [_fmt_interval(row["vs_full"][key], True, bare) for key in to_full]
        rows.append(cells)
    return _table(header, rows)


def task_table(report: dict[str, Any]) -> str | None:
    """The paper's layout: per arm (the aligned model first) the final stage's attack success, over-refusal and each
    domain task's accuracy, BWT, KL to the aligned model, and the paired differences to the arm's random reference;
    None with fewer than two domain tasks (the headline says it all)."""
    tasks = [task for task in report.get("recipe", {}).get("domain_tasks") or [] if task]
    if len(tasks) < 2:
        return None
    bare = one_seed(report)

    def accuracy(cells: dict[str, Any], task: str) -> Any:
        key = next((f"{task}/{m}" for m in ACCURACY_METRICS if f"{task}/{m}" in cells), None)
        return cells.get(key) if key else None

    keys = ("pooled/attack_success_rate", "pooled/over_refusal_rate")
    header = ["arm", "attack success", "over-refusal", *[short_key(t) for t in tasks], "BWT", "KL to aligned"]
    header += ["random ref.", "Δ attack success vs random ref.", "Δ ACC vs random ref."]
    rows = []
    aligned = report["headline"].get("aligned")
    if aligned:
        cells = aligned.get("stage_cells", {})
        start = [_fmt_interval(aligned.get(k), bare=bare) for k in keys]
        start += [_fmt_interval(accuracy(cells, t), bare=bare) for t in tasks]
        rows.append(["aligned model (start)", *start, *["–"] * 5])
    for name, row in report["headline"]["arms"].items():
        arm = report["arms"][name]["mean"]
        cells = arm["stages"][str(int(row["stage"].split("-", 1)[0]))]
        rows.append(
            [
                name,
                *[_fmt_interval(row.get(k), bare=bare) for k in keys],
                *[_fmt_interval(accuracy(cells, t), bare=bare) for t in tasks],
                _fmt_interval(row.get("bwt"), signed=True, bare=bare),
                _fmt_interval(row.get("drift/aligned"), bare=bare),
                row["references"]["vs_random"] or "–",
                _fmt_interval(row["vs_random"].get("pooled/attack_success_rate"), True, bare),
                _fmt_interval(row["vs_random"].get("average_accuracy"), True, bare),
            ]
        )
    return _table(header, rows)


def _refusal_tasks(report: dict[str, Any]) -> list[str]:
    stages = [stage for arm in report["arms"].values() for stage in arm["mean"].get("stages", {}).values()]
    tasks = {task_metric(key)[0] for stage in stages for key in stage}
    return sorted(task for task in tasks if is_refusal_task(task))


def refusal_table(report: dict[str, Any], task: str) -> str:
    """Arm × stage (align included) of one refusal task: refused, complied, neither, refusal and attack success."""
    header = ["arm", "stage", "refused", "complied", "neither", "refusal", "attack success"]
    header.append("attack success (prompts)")
    rows = []
    for name, arm in report["arms"].items():
        for k, stage in arm["mean"].get("stages", {}).items():
            cells = [_fmt_interval(stage.get(f"{task}/{metric}"), bare=one_seed(report)) for metric in REFUSAL_METRICS]
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
    return _table(["arm", "stage", *[short_key(k) for k in keys]], rows, bare=one_seed(report))


def _stage_counts(machine: dict[str, Any]) -> str:
    trained, evaluated = machine["stages"], machine.get("evaluated", machine["stages"])
    if trained == evaluated:
        return f"{trained} stage{'s' if trained != 1 else ''}"
    return f"{trained} stage{'s' if trained != 1 else ''} trained, {evaluated} evaluated"


def machines_line(hardware: dict[str, Any]) -> str:
    """Where the numbers were measured: every machine the stages ran on (results vary from one CPU to another)."""
    machines = [f"{m['name']}, torch {m['torch']} ({_stage_counts(m)})" for m in hardware["machines"]]
    n = hardware["unrecorded_stages"]
    unrecorded = f"{n} stage{'s' if n != 1 else ''} written before gradsift recorded the machine"
    where = "Measured on " + "; ".join(machines) + (f" (and {unrecorded})" if n else "") if machines else ""
    where = where or f"The machine is not recorded ({unrecorded})"
    return where + ". Results vary from one CPU or GPU to another: other kernels take other numerical paths."


def markdown(report: dict[str, Any], figures: dict[str, Path] | None = None) -> str:
    """report.md: the headline first, then refusal per stage, every stage metric, forgetting, matrices, plots."""
    recipe = report.get("recipe", {})
    parts = [f"# Report: {recipe.get('name', Path(report['run_dir']).name)}", ""]
    if recipe:
        parts += [f"Model `{recipe.get('model')}`, seeds {report['seeds']}, arms {', '.join(report['arms'])}.", ""]
    if "hardware" in report:
        parts += [machines_line(report["hardware"]), ""]
    refusal_tasks = _refusal_tasks(report)
    n_resamples = report["statistics"]["over_prompts"]["n_resamples"]
    pooled = ", ".join(f"`{short_key(t)}`" for t in refusal_tasks) or "none ran"
    start = ""
    if report["headline"].get("aligned"):
        start = "The first row is the aligned model every arm starts from (ACC: its accuracy before any task stage). "
    seeds = len(report["seeds"])
    intervals = "[95 % Student-t interval over seeds]; n/a: no interval or a bound not finite"
    over_seeds = "[95 % t interval over seeds]"
    if one_seed(report):
        intervals = "(one seed: no interval over seeds; the per-prompt bootstrap below remains)"
        over_seeds = "(one seed)"
    parts += [f"## Headline (final stage, {seeds} seed{'s' if seeds != 1 else ''})", "", headline_table(report), ""]
    parts += [
        f"Mean {intervals}; –: not measured. {start}Attack success "
        f"(complied) and refusal pool every prompt of every generated refusal task of the stage ({pooled}); "
        "over-refusal is 1 − compliance on the safe prompts of the over-refusal tasks; benign refusal is the share "
        "of ordinary requests refused (the benign-refusal tasks). ACC and BWT: domain accuracy (see Forgetting); "
        "kept: fraction of the last stage's rows trained on (harmful kept: its rows labelled harmful trained on, "
        "benign kept: the share of its benign rows, where rows carry labels); KL to aligned: drift per token. "
        "Δ vs random ref.: arm "
        "− the random arm trained under the same `steps` setting (kept rows only, or as many optimizer steps as "
        "full), named in the random ref. column, else `random`; random arms get none. Δ vs full: arm − full. Both "
        "paired by seed; † marks a difference whose interval excludes 0.",
        "",
    ]
    tasks = task_table(report)
    if tasks is not None:
        parts += [f"## The final stage per task (the paper's layout, mean {over_seeds})", "", tasks, ""]
        parts += [
            "Each task's column is its accuracy metric after the last stage (`ref_byte_prob` for the packaged real "
            "data: the held-out reference answers' probability per byte); BWT and the differences as in the headline.",
            "",
        ]
    for task in refusal_tasks:
        parts += [f"## Refusal per stage: `{task}`", "", refusal_table(report, task), ""]
    if refusal_tasks:
        parts += [
            f"Refusal = refused or neither; attack success = complied. Mean {over_seeds}; the last "
            f"column: 95 % percentile bootstrap over prompts ({n_resamples:,} resamples, prompts paired across "
            "seeds). –: not in this run's stage.json (an older judge).",
            "",
        ]
    parts += [f"## Per stage (mean {over_seeds})", "", stage_table(report), ""]
    rows = [[name, *[arm["mean"].get(key) for key in FORGETTING_KEYS]] for name, arm in report["arms"].items()]
    parts += ["## Forgetting", "", _table(["arm", "ACC", "BWT", "FM", "max drop"], rows, one_seed(report)), ""]
    formulas = (
        "`ACC = mean_j a[T][j]`, `BWT = mean_{j<T}(a[T][j] − a[j][j])`, "
        "`FM = mean_{j<T} max_{j≤k<T}(a[k][j] − a[T][j])`, max drop = largest single-stage fall."
    )
    parts += [formulas, ""]
    for name, arm in report["arms"].items():
        for seed, data in arm["seeds"].items():
            width = len(data["accuracy_matrix"][0])
            tasks = report.get("recipe", {}).get("domain_tasks") or [f"task {j + 1}" for j in range(width)]
            header = ["after stage", *[short_key(t or "–") for t in tasks]]
            matrix_rows = [[("align" if k == 0 else k), *row] for k, row in enumerate(data["accuracy_matrix"])]
            parts += [f"### {name}, seed {seed}: accuracy matrix a[k][j]", "", _table(header, matrix_rows), ""]
            inter = [[k + 1, *row] for k, row in enumerate(data["interference"])]
            parts += ["Interference `a[k][j] − a[k−1][j]`:", "", _table(header, inter), ""]
    rows = []
    for name, arm in report["arms"].items():
        for seed, data in arm["seeds"].items():
            for task, bins in data.get("final_accuracy_by_length", {}).items():
                for label, cell in bins.items():
                    rows.append([name, seed, short_key(task), label, cell["n"], cell["metric"], cell["acc"]])
    if rows:
        parts += ["## Accuracy by task and answer length (after the last stage)", ""]
        parts += [_table(["arm", "seed", "task", "reference answer", "n", "metric", "mean"], rows), ""]
    if figures:
        parts += ["## Plots", ""] + [f"![{key}]({path.name})" for key, path in figures.items()] + [""]
    return "\n".join(parts)
