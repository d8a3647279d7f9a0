"""The report of a recipe run: `report.json`, `report.md` and PNG plots, every number computed from `stage.json` files.

stages.py    reading a run's stages: each stage's numbers, per-prompt values, the accuracy matrix, forgetting
stats.py     t intervals over seeds, paired differences, the percentile bootstrap over prompts (scipy.stats)
build.py     `build_report`: report.json's data, per arm and seed, aggregated, compared, and the headline
writing.py   `write_report`: report.json, report.md's tables and the plots into the run folder
plots.py     the PNG plots (matplotlib, imported only when plots are drawn)

`gradsift report` must not import torch: none of these modules imports gradsift.scoring, gradsift.models or
gradsift.continual.runner.
"""

from gradsift.report.build import (
    BUILTIN_KINDS,
    HEADLINE,
    HEADLINE_DIFFERENCES,
    HEADLINE_FULL_DIFFERENCES,
    STEPPED_KINDS,
    arm_setup,
    build_report,
    headline,
    random_reference,
)
from gradsift.report.plots import HISTOGRAMS, PLOT_GROUPS, SCORE_TABLE, write_plots
from gradsift.report.stages import (
    ACCURACY_METRICS,
    FORGETTING_KEYS,
    LENGTH_BINS,
    OVERREFUSAL_METRICS,
    POOLED,
    REFUSAL_METRICS,
    accuracy_matrix,
    collect,
    doc_values,
    forgetting,
    is_overrefusal_task,
    is_refusal_task,
    length_bin_accuracy,
    stage_metrics,
)
from gradsift.report.stats import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    CONFIDENCE,
    bootstrap_rate,
    paired_difference,
    seed_average,
    t_interval,
)
from gradsift.report.writing import headline_table, markdown, refusal_table, stage_table, write_report

__all__ = [
    "ACCURACY_METRICS",
    "BOOTSTRAP_RESAMPLES",
    "BOOTSTRAP_SEED",
    "BUILTIN_KINDS",
    "CONFIDENCE",
    "FORGETTING_KEYS",
    "HEADLINE",
    "HEADLINE_DIFFERENCES",
    "HEADLINE_FULL_DIFFERENCES",
    "HISTOGRAMS",
    "LENGTH_BINS",
    "OVERREFUSAL_METRICS",
    "PLOT_GROUPS",
    "POOLED",
    "REFUSAL_METRICS",
    "SCORE_TABLE",
    "STEPPED_KINDS",
    "accuracy_matrix",
    "arm_setup",
    "bootstrap_rate",
    "build_report",
    "collect",
    "doc_values",
    "forgetting",
    "headline",
    "headline_table",
    "is_overrefusal_task",
    "is_refusal_task",
    "length_bin_accuracy",
    "markdown",
    "paired_difference",
    "random_reference",
    "refusal_table",
    "seed_average",
    "stage_metrics",
    "stage_table",
    "t_interval",
    "write_plots",
    "write_report",
]
