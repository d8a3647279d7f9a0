"""The report's statistics (95 %): intervals over seeds, paired differences, the bootstrap over prompts.

Seeds are the replicates; the eval prompts are the same for every seed and arm.

- Over seeds, for every arm, stage and metric: the mean with a Student-t interval
  `mean ± t_{0.975, n−1} · s / √n`, `s` the sample standard deviation (ddof = 1), n the number of seeds
  (`t_interval`), not clipped to [0, 1]. With one seed there is no interval (None, shown "n/a").
- Paired differences between two arms: `d_s = arm_s − reference_s` for every seed s that both arms finished, with
  the same t interval over the `d_s` (`paired_difference`).
- Over prompts: a percentile bootstrap of each per-prompt rate (`bootstrap_rate`). Rows are seeds (ascending),
  columns prompts (`(task, doc_id)` ascending); each resample draws the columns with replacement, the same draw for
  every seed, and its statistic is the mean over seeds of each seed's mean over the drawn prompts
  (`scipy.stats.bootstrap`, method="percentile", paired=True, 2,000 resamples, a fixed seed: reproducible). With one
  seed it is the only interval there is.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
# `rng` replaced `random_state` in SciPy 1.15; given the same Generator both draw the same numbers.
_RNG_KEYWORD = "rng" if "rng" in inspect.signature(stats.bootstrap).parameters else "random_state"


def t_interval(values: Iterable[float | None], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Return the mean of per-seed values and its Student-t interval `mean ± t_{(1+c)/2, n−1} · s / √n`.

    `s` is the sample standard deviation (ddof=1); None and NaN values are left out. Returns {"mean", "std", "ci":
    [low, high], "n"}; with one value `std` and `ci` are None, with none `mean` is None too.
    """
    kept = finite(values)
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
    seeds = sorted(s for s in arm if s in reference and finite([arm[s]]) and finite([reference[s]]))
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


def finite(values: Iterable[float | None]) -> list[float]:
    """The values that are numbers: None and NaN left out."""
    return [float(v) for v in values if v is not None and not math.isnan(v)]
