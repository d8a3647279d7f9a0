"""Selection rules: turn per-row losses and gradient norms into a keep mask and a reason for every dropped row.

Pure numpy and I/O-free, so the offline CLI, the online per-batch mode and the tests share one implementation.
Ties are always broken by the lower original row index: it is kept first by `moderate`, `high` and `low`, and
dropped first by `drop_top` (which ranks rows by descending norm, then index). `length_bin_summary` is what
`gradsift inspect` shows per response-length bin: the rows, median scores and kept count of each `length_bins` bin.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from gradsift.config import SelectionConfig
from gradsift.errors import UserError
from gradsift.filters import check_anchor_scores, pre_filters

if TYPE_CHECKING:
    from gradsift.config import GradSiftConfig
    from gradsift.table import ScoreTable

logger = logging.getLogger(__name__)

# Rules whose number of kept rows is `keep_fraction` of a group.
FRACTION_RULES = ("moderate", "random", "high", "low", "anchor")
REASONS: dict[str, str] = {
    "no_response_tokens": "The row has no response tokens, so there is nothing to score or train on.",
    "nonfinite": "The row's loss or gradient norm is NaN or infinite.",
    "loss_outlier": "`moderate`: the loss is more than `loss_sigma` population stds away from the group's mean loss.",
    "far_from_median": "`moderate`: passed the loss filter but is not among the k rows nearest the median norm.",
    "grad_norm_top_fraction": "`drop_top`: among the `drop_fraction` highest gradient norms.",
    "grad_norm_below_band": "`band`: gradient norm below the `lower_quantile` quantile.",
    "grad_norm_above_band": "`band`: gradient norm above the `upper_quantile` quantile.",
    "grad_norm_above_max": "`threshold`: gradient norm above `max_grad_norm`.",
    "grad_norm_below_min": "`threshold`: gradient norm below `min_grad_norm`.",
    "random_not_sampled": "`random`: not drawn into the seeded random subset.",
    "not_in_top_fraction": "`high`: not among the `keep_fraction` highest gradient norms.",
    "not_in_bottom_fraction": "`low`: not among the `keep_fraction` lowest gradient norms.",
    "not_in_top_anchor_fraction": "`anchor`: not among the `keep_fraction` highest `anchor_dot` (a step on it lowers "
    "the anchor set's loss less than a kept row's, or raises it).",
    "anchor_conflict": "`min_anchor_cos`: its gradient's cosine with the anchor set's mean gradient is too low.",
    "refusal_likely": "`max_refusal_logprob`: the model would likely open its answer to the row's request with a "
    "refusal (`refusal_logprob` above the bound).",
}


@dataclass(frozen=True)
class Selection:
    """The outcome of a rule: which rows are kept and why each other row was dropped.

    Attributes:
        keep: Boolean mask, one entry per row.
        reasons: Object array of `str`, one per row: `""` for kept rows, otherwise a key of `REASONS` (or the row's
            status, for rows whose status is not `ok`).
    """

    keep: np.ndarray
    reasons: np.ndarray

    @property
    def num_kept(self) -> int:
        """Return the number of kept rows."""
        return int(np.count_nonzero(self.keep))

    def counts(self) -> dict[str, int]:
        """Return the number of dropped rows per reason, the most frequent first, ties by name."""
        counter = Counter(reason for reason in self.reasons.tolist() if reason)
        return dict(sorted(counter.items(), key=lambda item: (-item[1], item[0])))

    def summary(self) -> str:
        """Return one line like `kept 2,000/10,000 (20.0%); dropped 6,792 far_from_median, 1,208 loss_outlier`."""
        total = len(self.keep)
        percent = 100 * self.num_kept / total if total else 0.0
        dropped = ", ".join(f"{count:,} {reason}" for reason, count in self.counts().items()) or "none"
        return f"kept {self.num_kept:,}/{total:,} ({percent:.1f}%); dropped {dropped}"


def moderate_keep(
    losses: np.ndarray, grad_norms: np.ndarray, k: int, loss_sigma: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """Apply the paper's rule to one group of `ok` rows (a window, a length bin, a batch or the whole dataset).

    Rows with `|loss - mean| <= loss_sigma * std` survive (population std, bounds inclusive); of the survivors, the
    `k` with the smallest `|norm - median(survivor norms)|` are kept, ties broken by lower position. If fewer than
    `k` rows survive, all survivors are kept and this is logged.

    Args:
        losses: Finite per-row losses of the group.
        grad_norms: Finite per-row gradient norms of the group, same length.
        k: Rows to keep; the caller computes it from the group size, not from the survivors.
        loss_sigma: Width of the loss filter in stds; `None` disables the filter.

    Returns:
        The keep mask and the reasons (`""`, `loss_outlier` or `far_from_median`) for the group's rows.
    """
    losses, grad_norms = np.asarray(losses, dtype=float), np.asarray(grad_norms, dtype=float)
    if losses.shape != grad_norms.shape or losses.ndim != 1:
        raise ValueError(
            f"`losses` and `grad_norms` must be 1-D of one length; got shapes {losses.shape} and {grad_norms.shape}."
        )
    if k < 0:
        raise ValueError(f"`k` must be >= 0; got {k}.")
    if not (np.isfinite(losses).all() and np.isfinite(grad_norms).all()):
        raise ValueError("`moderate_keep` needs finite losses and gradient norms; drop the nonfinite rows first.")
    survives = np.ones(len(losses), dtype=bool)
    if loss_sigma is not None and len(losses):
        survives = np.abs(losses - losses.mean()) <= loss_sigma * losses.std()
    reasons = np.where(survives, "far_from_median", "loss_outlier").astype(object)
    survivors = np.flatnonzero(survives)
    if len(survivors) < k:
        logger.info(
            "moderate: only %d of %d rows pass the loss filter, fewer than k=%d; keeping all survivors",
            len(survivors),
            len(losses),
            k,
        )
    if len(survivors):
        distance = np.abs(grad_norms[survivors] - np.median(grad_norms[survivors]))
        reasons[survivors[np.argsort(distance, kind="stable")[:k]]] = ""
    return reasons == "", reasons


def fraction_count(fraction: float, n: int) -> int:
    """The rows `fraction` of `n` keeps: the floor of the product, float noise rounded away first (0.29 × 100 is
    28.999999999999996, and 29% of 100 rows means 29)."""
    return math.floor(round(fraction * n, 6))


def _keep_first(order: np.ndarray, k: int, reason: str) -> np.ndarray:
    reasons = np.full(len(order), reason, dtype=object)
    reasons[order[:k]] = ""
    return reasons


def _mark(n: int, *drops: tuple[np.ndarray, str]) -> np.ndarray:
    reasons = np.full(n, "", dtype=object)
    for mask, reason in drops:
        reasons[mask] = reason
    return reasons


# Each rule sees one group: its losses, norms, original row indices (ascending, so a stable sort breaks ties by
# lower index), the group's k, the config and the shared generator; it returns the group's reasons.
_Rule = Callable[[np.ndarray, np.ndarray, np.ndarray, int, SelectionConfig, np.random.Generator], np.ndarray]


def _moderate(losses, norms, index, k, config, rng) -> np.ndarray:
    return moderate_keep(losses, norms, k, config.loss_sigma)[1]


def _drop_top(losses, norms, index, k, config, rng) -> np.ndarray:
    top = np.argsort(-norms, kind="stable")[: fraction_count(config.drop_fraction, len(norms))]
    return _mark(len(norms), (top, "grad_norm_top_fraction"))


def _band(losses, norms, index, k, config, rng) -> np.ndarray:
    low, high = np.quantile(norms, [config.lower_quantile, config.upper_quantile])
    return _mark(len(norms), (norms < low, "grad_norm_below_band"), (norms > high, "grad_norm_above_band"))


def _threshold(losses, norms, index, k, config, rng) -> np.ndarray:
    too_low = norms < config.min_grad_norm if config.min_grad_norm is not None else np.zeros(len(norms), dtype=bool)
    return _mark(len(norms), (norms > config.max_grad_norm, "grad_norm_above_max"), (too_low, "grad_norm_below_min"))


def _all(losses, norms, index, k, config, rng) -> np.ndarray:
    return _mark(len(norms))  # every row the filters (`min_anchor_cos`, `max_refusal_logprob`) leave


def _random(losses, norms, index, k, config, rng) -> np.ndarray:
    chosen = rng.choice(index, k, replace=False)
    return _mark(len(norms), (~np.isin(index, chosen), "random_not_sampled"))


def _high(losses, norms, index, k, config, rng) -> np.ndarray:
    return _keep_first(np.argsort(-norms, kind="stable"), k, "not_in_top_fraction")


def _low(losses, norms, index, k, config, rng) -> np.ndarray:
    return _keep_first(np.argsort(norms, kind="stable"), k, "not_in_bottom_fraction")


def _anchor(losses, dots, index, k, config, rng) -> np.ndarray:
    # `select_rows` hands this rule the rows' anchor_dot in place of their norms.
    return _keep_first(np.argsort(-dots, kind="stable"), k, "not_in_top_anchor_fraction")


_RULES: dict[str, _Rule] = {
    "moderate": _moderate,
    "drop_top": _drop_top,
    "band": _band,
    "threshold": _threshold,
    "random": _random,
    "high": _high,
    "low": _low,
    "anchor": _anchor,
    "all": _all,
}


def length_bins(lengths: Sequence[float] | np.ndarray, num_bins: int) -> np.ndarray:
    """Split rows into contiguous response-length bins whose row counts are as equal as the ties allow.

    Rows of equal length always share a bin and a bin is a run of consecutive distinct lengths. With m distinct
    lengths and K = min(`num_bins`, m), the bins are the partition of the sorted distinct lengths into K runs that
    minimises the sum of squared deviations of the bin counts from n/K (the counts add up to n, so this is the
    smallest sum of squared counts). Splitting a bin always lowers that sum, so with at least `num_bins` distinct
    lengths all `num_bins` bins are non-empty; with fewer, each distinct length is its own bin and this is logged.
    Among equally balanced partitions the longer bins take the extra rows: the boundaries are fixed from the top bin
    down, each as low as the optimum allows (so lengths [1, 2, 2, 3] in 2 bins give bins [0, 1, 1, 1]).

    The optimum is exact, found by dynamic programming over the distinct lengths in exact integer arithmetic. A bin's
    cost is convex in its count, so the lowest best start of the last bin never decreases as the covered prefix
    grows; each of the K layers is then solved by divide and conquer over that start, vectorised one recursion level
    at a time: O(K m log m) numpy work after the O(n log n) `np.unique`.

    Args:
        lengths: Per-row response length (any sortable numbers), 1-D.
        num_bins: The wanted number of bins, at least 1.

    Returns:
        Per-row bin id: 0 for the shortest bin, up to min(`num_bins`, distinct lengths) - 1 for the longest.

    Raises:
        ValueError: If `num_bins` is below 1 or `lengths` is not 1-D.
    """
    lengths = np.asarray(lengths)
    if num_bins < 1:
        raise ValueError(f"The number of length bins must be >= 1; got {num_bins}.")
    if lengths.ndim != 1:
        raise ValueError(f"`lengths` must be 1-D, one entry per row; got shape {lengths.shape}.")
    values, inverse, counts = np.unique(lengths, return_inverse=True, return_counts=True)
    if len(values) < num_bins and len(values):
        logger.info(
            "length bins: only %d distinct response lengths for %d bins; one bin per distinct length",
            len(values),
            num_bins,
        )
    prefix = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    best, last_starts = prefix**2, []  # best[i]: least sum of squared counts of j bins over the first i lengths
    for j in range(2, min(num_bins, len(values)) + 1):
        best, start = _best_last_bins(best, prefix, j)
        last_starts.append(start)
    boundaries, end = [], len(values)
    for start in reversed(last_starts):
        end = int(start[end])
        boundaries.append(end)
    bin_of_value = np.searchsorted(np.array(boundaries[::-1], dtype=np.int64), np.arange(len(values)), side="right")
    return bin_of_value[inverse.reshape(-1)]


def _best_last_bins(best: np.ndarray, prefix: np.ndarray, j: int) -> tuple[np.ndarray, np.ndarray]:
    """Add the j-th bin: for every prefix i >= j of the distinct lengths, the least cost and the last bin's start.

    `best[t]` is the least cost of j - 1 bins over the first t distinct lengths. The last bin of prefix i starts at
    the lowest t in [j - 1, i - 1] minimising `best[t] + (prefix[i] - prefix[t])**2`; that start is monotone in i, so
    a task (rows lo..hi, starts within start_lo..start_hi) solves its middle row and hands each half a narrower range.
    """
    m = len(prefix) - 1
    new_best, new_start = np.zeros(m + 1, dtype=np.int64), np.zeros(m + 1, dtype=np.int64)  # entries i < j unused
    lo, hi, start_lo, start_hi = (np.array([value]) for value in (j, m, j - 1, m - 1))
    while len(lo):
        mid = (lo + hi) // 2
        width = np.minimum(start_hi, mid - 1) - start_lo + 1  # >= 1: start_lo <= lo - 1 holds for every task
        offsets = np.cumsum(width) - width
        task = np.repeat(np.arange(len(mid)), width)
        t = np.arange(int(width.sum())) - offsets[task] + start_lo[task]
        cost = best[t] + (prefix[mid[task]] - prefix[t]) ** 2
        least = np.minimum.reduceat(cost, offsets)
        hits = np.flatnonzero(cost == least[task])
        start = t[hits[np.searchsorted(task[hits], np.arange(len(mid)))]]  # the lowest optimal start per task
        new_best[mid], new_start[mid] = least, start
        left, right = lo < mid, mid < hi
        lo, hi = np.concatenate([lo[left], mid[right] + 1]), np.concatenate([mid[left] - 1, hi[right]])
        start_lo = np.concatenate([start_lo[left], start[right]])
        start_hi = np.concatenate([start[left], start_hi[right]])
    return new_best, new_start


def _groups(ok: np.ndarray, lengths: np.ndarray | None, config: SelectionConfig) -> list[np.ndarray]:
    """Split the ok rows into the groups a rule runs on: windows, then length bins inside each window."""
    n = len(ok)
    if config.window is None:
        blocks = [np.arange(n)]
    else:
        order = np.random.default_rng(config.seed).permutation(n)
        blocks = [order[start : start + config.window] for start in range(0, n, config.window)]
    blocks = [np.sort(block[ok[block]]) for block in blocks]
    if config.length_strata is None or not ok.any():
        return blocks
    # Bins come from the whole dataset, so a row's bin does not depend on which window it landed in.
    bins = np.full(n, -1)
    bins[ok] = length_bins(lengths[ok], config.length_strata)
    return [block[bins[block] == b] for block in blocks for b in range(config.length_strata)]


def _group_ks(sizes: np.ndarray, config: SelectionConfig, keep_count: int | None) -> list[int]:
    if keep_count is None:
        return [fraction_count(config.keep_fraction, int(size)) for size in sizes]
    # Split keep_count over the groups by largest remainder, in integers so that the total is exact.
    base, remainder = np.divmod(keep_count * sizes, max(int(sizes.sum()), 1))
    base[np.argsort(-remainder, kind="stable")[: keep_count - int(base.sum())]] += 1
    return base.tolist()


def _at_least(ks: list[int], sizes: np.ndarray, minimum: int) -> list[int]:
    """Raise the groups' ks to `minimum` rows in total (as far as they have rows), one more row per group at a time,
    largest group first."""
    ks = list(ks)
    order = np.argsort(-sizes, kind="stable")
    while sum(ks) < min(minimum, int(sizes.sum())):
        for g in order:
            if sum(ks) < minimum and ks[g] < sizes[g]:
                ks[g] += 1
    return ks


def _keeps_no_row(config: SelectionConfig, eligible: int, largest: int) -> str:
    fraction = config.keep_fraction
    groups = {"window": config.window, "length_strata": config.length_strata}
    grouped = ", ".join(f"`selection.{key}` {value}" for key, value in groups.items() if value is not None)
    where = f", in groups of at most {largest:,} rows ({grouped})" if grouped else ""
    # Round 1/largest up to 3 significant digits: 0.333 of 3 rows still rounds down to none, 0.334 keeps one.
    scale = 10.0 ** (2 - np.floor(np.log10(1 / largest)))
    smallest = float(np.ceil(round(scale / largest, 6)) / scale)
    return (
        f"`selection.keep_fraction` {fraction} keeps no row: {eligible:,} rows are eligible (status ok, finite loss "
        f"and gradient norm){where}, and {fraction} × {largest:,} rounds down to 0. Set `selection.keep_fraction` "
        f"(--keep-fraction) to at least {smallest:g} to keep a row."
    )


def _check_inputs(arrays: dict[str, np.ndarray], config: SelectionConfig, keep_count: int | None) -> None:
    if any(array.ndim != 1 for array in arrays.values()):
        shapes = ", ".join(f"`{name}` {array.shape}" for name, array in arrays.items())
        raise ValueError(f"selection inputs must be 1-D arrays, one entry per row; got {shapes}.")
    if len({len(array) for array in arrays.values()}) > 1:
        lengths = ", ".join(f"`{name}` {len(array)}" for name, array in arrays.items())
        raise ValueError(f"selection inputs must have one entry per row; got lengths {lengths}.")
    if config.length_strata is not None and "num_response_tokens" not in arrays:
        raise ValueError(
            f"`selection.length_strata` is {config.length_strata} but no `num_response_tokens` were given. Pass them, "
            "or unset `selection.length_strata`."
        )
    if keep_count is not None and config.rule != "random":
        raise ValueError(f"`keep_count` only applies to `selection.rule` 'random'; got rule {config.rule!r}.")


def select_rows(
    losses: Sequence[float] | np.ndarray,
    grad_norms: Sequence[float] | np.ndarray,
    status: Sequence[str] | np.ndarray,
    config: SelectionConfig,
    *,
    num_response_tokens: Sequence[int] | np.ndarray | None = None,
    keep_count: int | None = None,
    require_kept: bool = False,
    min_kept: int = 0,
    anchor_dot: Sequence[float] | np.ndarray | None = None,
    anchor_cos: Sequence[float] | np.ndarray | None = None,
    refusal_logprob: Sequence[float] | np.ndarray | None = None,
) -> Selection:
    """Apply `config.rule` to scored rows and return which are kept, with a reason for each dropped row.

    Rows whose status is not `ok` are never kept and carry their status as the reason; `ok` rows with a NaN or
    infinite loss or norm are dropped as `nonfinite`. Counts such as k are fractions of the remaining `ok` rows of
    each group (the whole dataset, a `window`, or a `length_strata` bin inside it).

    Args:
        losses: Per-row mean token loss.
        grad_norms: Per-row gradient norm.
        status: Per-row status: `ok`, `no_response_tokens` or `nonfinite`.
        config: The selection options.
        num_response_tokens: Per-row response length; required with `selection.length_strata`.
        keep_count: For `random` only: keep exactly this many rows instead of `keep_fraction` of them, to match
            another arm's size (split over length bins by largest remainder).
        require_kept: Refuse a `keep_fraction` that keeps no row of any group although rows are eligible. Pass it
            for a whole dataset; the online mode selects in small windows, where keeping none of a window with few
            `ok` rows just skips the step.
        min_kept: Keep at least this many rows when that many are eligible, adding one row to the largest groups
            first (the online mode keeps at least one row of a window whenever one scores).
        anchor_dot: Per-row ⟨g_i, ḡ_A⟩; required by the `anchor` rule.
        anchor_cos: Per-row cosine of g_i with ḡ_A; required by `min_anchor_cos`.
        refusal_logprob: Per-row `refusal_logprob` (`gradsift.refusal_probe`); required by `max_refusal_logprob`.

    Returns:
        The keep mask and the per-row reasons.

    Raises:
        UserError: With `require_kept`, if `keep_fraction` rounds down to no row in every group.
        ValueError: If the inputs differ in length, or an option does not fit the rule.
    """
    arrays = {
        "losses": np.asarray(losses, dtype=float),
        "grad_norms": np.asarray(grad_norms, dtype=float),
        "status": np.asarray(status).astype(str).astype(object),
    }
    if num_response_tokens is not None:
        arrays["num_response_tokens"] = np.asarray(num_response_tokens)
    for name, values in (("anchor_dot", anchor_dot), ("anchor_cos", anchor_cos), ("refusal_logprob", refusal_logprob)):
        if values is not None:
            arrays[name] = np.asarray(values, dtype=float)
    _check_inputs(arrays, config, keep_count)
    losses, norms, reasons = arrays["losses"], arrays["grad_norms"], arrays["status"].copy()
    ok = (reasons == "ok") & np.isfinite(losses) & np.isfinite(norms)
    if config.rule == "anchor":
        norms = arrays["anchor_dot"]  # the rule ranks by anchor_dot; the norm's only role here was `ok`
        ok &= np.isfinite(norms)
    if keep_count is not None and not 0 <= keep_count <= np.count_nonzero(ok):
        raise ValueError(
            f"`keep_count` must be between 0 and the {np.count_nonzero(ok):,} ok rows; got {keep_count:,}."
        )
    check_anchor_scores(arrays, config, (arrays["status"] == "ok") & np.isfinite(losses))
    reasons[(reasons == "ok") & ~ok] = "nonfinite"
    reasons[ok] = ""
    for reason, dropped in pre_filters(arrays, config, ok, require_kept):
        reasons[dropped] = reason
        ok &= ~dropped

    groups = _groups(ok, arrays.get("num_response_tokens"), config)
    sizes = np.array([len(group) for group in groups], dtype=np.int64)
    ks = _group_ks(sizes, config, keep_count)
    if require_kept and keep_count is None and config.rule in FRACTION_RULES and sizes.sum() and not sum(ks):
        raise UserError(_keeps_no_row(config, int(sizes.sum()), int(sizes.max())))
    if min_kept and keep_count is None and config.rule in FRACTION_RULES:
        ks = _at_least(ks, sizes, min_kept)
    rng = np.random.default_rng(config.seed)
    rule = _RULES[config.rule]
    for index, k in zip(groups, ks):
        if len(index):
            reasons[index] = rule(losses[index], norms[index], index, k, config, rng)
    return Selection(keep=np.asarray(reasons == "", dtype=bool), reasons=reasons)


def apply_selection(table: ScoreTable, config: GradSiftConfig, keep_count: int | None = None) -> Selection:
    """Apply `config.selection` to a score table (every row scored; a rule that keeps no row is an error)."""
    return select_rows(
        table.loss,
        table.grad_norm,
        table.status,
        config.selection,
        num_response_tokens=table.num_response_tokens,
        keep_count=keep_count,
        require_kept=True,
        anchor_dot=table.anchor_dot,
        anchor_cos=table.anchor_cos,
        refusal_logprob=table.refusal_logprob,
    )


def kept_indices(selection: Selection, table: ScoreTable) -> np.ndarray:
    """Return the dataset positions of the kept rows, in dataset order."""
    return np.sort(table.index[selection.keep])


def length_bin_summary(table: ScoreTable, selection: Selection, ok: np.ndarray, bins: int) -> list[dict[str, Any]]:
    """Per response-length bin of the `ok` rows with finite scores: its length range, rows, median loss and gradient
    norm, and how many rows `selection` keeps (`bins` at least 1)."""
    # The rows and bins of `selection.length_strata`, so with `bins` K a bin here is a group that rule runs on.
    rows = np.flatnonzero(ok & np.isfinite(table.loss) & np.isfinite(table.grad_norm))
    if not len(rows):
        return []
    lengths = table.num_response_tokens[rows]
    ids = length_bins(lengths, bins)
    result = []
    for b in range(int(ids.max()) + 1):
        member = rows[ids == b]
        kept = int(selection.keep[member].sum())
        result.append(
            {
                "range": f"{int(lengths[ids == b].min())}-{int(lengths[ids == b].max())}",
                "rows": len(member),
                "median_loss": float(np.median(table.loss[member])),
                "median_grad_norm": float(np.median(table.grad_norm[member])),
                "kept": kept,
                "kept_fraction": kept / len(member),
            }
        )
    return result
