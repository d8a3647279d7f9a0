"""Selection rules on small hand-made arrays; every expected index list is worked out by hand in the comments."""

from __future__ import annotations

import itertools
import logging
import math
import statistics
from fractions import Fraction

import numpy as np
import pytest
from pydantic import ValidationError

from gradsift.config import SelectionConfig, load_config
from gradsift.errors import UserError
from gradsift.selection import REASONS, Selection, length_bins, moderate_keep, select_rows


def kept(selection: Selection) -> list[int]:
    return np.flatnonzero(selection.keep).tolist()


def ok(n: int) -> list[str]:
    return ["ok"] * n


def select(norms, config, losses=None, status=None, **kwargs) -> Selection:
    losses = [1.0] * len(norms) if losses is None else losses
    return select_rows(losses, norms, ok(len(norms)) if status is None else status, config, **kwargs)


# --- moderate -------------------------------------------------------------------------------------------------------


def test_moderate_keeps_rows_nearest_the_median_norm():
    # Equal losses all pass the filter. k = floor(0.5 * 6) = 3; median of [1, 2.5, 3, 4, 10, 100] is 3.5;
    # distances [6.5, 0.5, 2.5, 0.5, 1.0, 96.5] -> rows 1, 3, 4.
    selection = select([10, 3, 1, 4, 2.5, 100], SelectionConfig(keep_fraction=0.5))
    assert kept(selection) == [1, 3, 4]
    assert selection.reasons.tolist() == ["far_from_median", "", "far_from_median", "", "", "far_from_median"]


def test_moderate_breaks_distance_ties_by_lower_index():
    # k = floor(0.7 * 3) = 2; median 3; distances [1, 1, 0]: row 2, then row 0 (not row 1, the smaller norm).
    assert kept(select([4, 2, 3], SelectionConfig(keep_fraction=0.7, loss_sigma=None))) == [0, 2]


def test_moderate_k_is_a_fraction_of_the_group_not_of_the_survivors():
    # Losses: mean 10, population std 30, so only row 9 (|100 - 10| = 90) is an outlier. k = floor(0.5 * 10) = 5
    # (not floor(0.5 * 9) = 4). Survivor norms 1..9, median 5 -> rows 4; 3, 5; 2, 6.
    selection = select([1, 2, 3, 4, 5, 6, 7, 8, 9, 0], SelectionConfig(keep_fraction=0.5), losses=[0] * 9 + [100])
    assert kept(selection) == [2, 3, 4, 5, 6]
    assert selection.reasons[9] == "loss_outlier"


def test_moderate_loss_filter_uses_population_std():
    # Losses [0, 0, 0, 4]: mean 1, row 3 deviates by 3. ddof 0: std sqrt(3), bound 1.6 * 1.732 = 2.77 -> row 3 out;
    # (ddof 1: std 2, bound 3.2 -> row 3 in, and rows 1, 3 would be kept). k = 2; survivor norms [1, 2, 9],
    # median 2, distances [1, 0, 7] -> rows 0, 1.
    selection = select([1, 2, 9, 2.5], SelectionConfig(keep_fraction=0.5, loss_sigma=1.6), losses=[0, 0, 0, 4])
    assert kept(selection) == [0, 1]
    assert selection.reasons.tolist() == ["", "", "far_from_median", "loss_outlier"]


def test_moderate_loss_filter_bounds_are_inclusive():
    # Losses [0, 2, 0, 2]: mean 1, population std 1, every row exactly on the bound; k = 4.
    assert kept(select([1, 5, 2, 3], SelectionConfig(keep_fraction=1.0), losses=[0, 2, 0, 2])) == [0, 1, 2, 3]


def test_moderate_keeps_all_survivors_when_fewer_than_k_and_logs_it(caplog):
    # Losses [0, 0, 10, 10, 5]: mean 5, std sqrt(20) = 4.47 -> only row 4 survives; k = floor(0.6 * 5) = 3.
    caplog.set_level(logging.INFO, logger="gradsift.selection")
    selection = select([1, 2, 3, 4, 5], SelectionConfig(keep_fraction=0.6), losses=[0, 0, 10, 10, 5])
    assert kept(selection) == [4]
    assert selection.counts() == {"loss_outlier": 4}
    assert "only 1 of 5 rows pass the loss filter, fewer than k=3" in caplog.text


def test_moderate_without_loss_filter_can_keep_a_loss_outlier():
    # k = 2. No filter: median of [1, 2, 10, 20, 3] is 3, distances [2, 1, 7, 17, 0] -> rows 1, 4.
    # (With the filter row 4 would be a loss_outlier and rows 1, 2 kept.)
    config = SelectionConfig(keep_fraction=0.4, loss_sigma=None)
    selection = select([1, 2, 10, 20, 3], config, losses=[0, 0, 0, 0, 100])
    assert kept(selection) == [1, 4]
    assert "loss_outlier" not in selection.counts()


def test_moderate_keep_applies_the_rule_to_one_group():
    keep, reasons = moderate_keep(np.array([0.0, 0, 10, 10, 5]), np.array([1.0, 2, 3, 4, 5]), 1, 1.0)
    assert keep.tolist() == [False, False, False, False, True]
    assert reasons.tolist() == ["loss_outlier"] * 4 + [""]


def test_moderate_keep_rejects_nonfinite_values():
    with pytest.raises(ValueError, match="finite"):
        moderate_keep(np.array([0.0, np.nan]), np.array([1.0, 2.0]), 1, 1.0)


# --- window ---------------------------------------------------------------------------------------------------------


def test_window_applies_moderate_inside_each_shuffled_block():
    # The contract's shuffle: seed 0 permutes 6 rows to [3, 2, 5, 4, 0, 1] -> blocks {2, 3, 5} and {0, 1, 4}.
    assert np.random.default_rng(0).permutation(6).tolist() == [3, 2, 5, 4, 0, 1]
    # k = floor(0.7 * 3) = 2 per block. Block {2, 3, 5}: norms [10, 11, 30], median 11 -> rows 3, 2.
    # Block {0, 1, 4}: norms [1, 2, 5], median 2 -> rows 1, 0. (Whole dataset, k = 4: rows 1, 2, 3, 4.)
    config = SelectionConfig(keep_fraction=0.7, loss_sigma=None, window=3, seed=0)
    norms = [1, 2, 10, 11, 5, 30]
    assert kept(select(norms, config)) == [0, 1, 2, 3]
    assert kept(select(norms, config.model_copy(update={"window": None}))) == [1, 2, 3, 4]


def slow_moderate(losses, norms, rows, k, loss_sigma):
    survivors = rows
    if loss_sigma is not None:
        mean = sum(losses[r] for r in rows) / len(rows)
        std = math.sqrt(sum((losses[r] - mean) ** 2 for r in rows) / len(rows))
        survivors = [r for r in rows if abs(losses[r] - mean) <= loss_sigma * std]
    if not survivors:
        return []
    median = statistics.median(norms[r] for r in survivors)
    return sorted(survivors, key=lambda r: (abs(norms[r] - median), r))[:k]


def slow_length_bins(lengths, k):
    """Try every split of the sorted distinct lengths into min(k, m) runs; keep the least sum of (count - n/k)**2,
    ties to the split whose boundaries, read from the top bin down, are lowest. Returns {length: bin}."""
    values = sorted(set(lengths))
    counts = [sum(length == value for length in lengths) for value in values]
    parts = min(k, len(values))
    target = Fraction(len(lengths), parts) if parts else 0

    def key(cuts):
        edges = (0, *cuts, len(values))
        return sum((sum(counts[a:b]) - target) ** 2 for a, b in zip(edges, edges[1:])), cuts[::-1]

    cuts = min(itertools.combinations(range(1, len(values)), parts - 1), key=key) if parts else ()
    return {value: sum(cut <= i for cut in cuts) for i, value in enumerate(values)}


def slow_windowed_moderate(losses, norms, status, lengths, config):
    n = len(losses)
    good = [s == "ok" for s in status]
    bin_of = slow_length_bins([lengths[r] for r in range(n) if good[r]], config.length_strata or 1)
    order = np.random.default_rng(config.seed).permutation(n).tolist()
    result = []
    for start in range(0, n, config.window):
        block = sorted(r for r in order[start : start + config.window] if good[r])
        for b in range(config.length_strata or 1):
            group = [r for r in block if bin_of[lengths[r]] == b]
            if group:
                k = math.floor(config.keep_fraction * len(group))
                result += slow_moderate(losses, norms, group, k, config.loss_sigma)
    return sorted(result)


@pytest.mark.parametrize("window", [1, 7, 16, 103, 500])
@pytest.mark.parametrize("length_strata", [None, 3])
@pytest.mark.parametrize("loss_sigma", [None, 1.0])
def test_window_matches_slow_reference(window, length_strata, loss_sigma):
    rng = np.random.default_rng(window)
    n = 103
    losses, norms = rng.normal(2, 1, n), rng.lognormal(0, 1, n)
    status = np.where(rng.random(n) < 0.1, "no_response_tokens", "ok")
    lengths = rng.integers(1, 40, n)
    config = SelectionConfig(
        keep_fraction=0.25, loss_sigma=loss_sigma, window=window, length_strata=length_strata, seed=5
    )
    selection = select_rows(losses, norms, status, config, num_response_tokens=lengths)
    assert kept(selection) == slow_windowed_moderate(losses.tolist(), norms.tolist(), status.tolist(), lengths, config)


# --- length_strata --------------------------------------------------------------------------------------------------


def test_length_strata_keep_short_rows_the_paper_rule_drops():
    # Rows 0-3 are short (10 tokens, norms 1-4), rows 4-9 long (100 tokens, norms 10-15): bins of 4 and 6 rows.
    norms, lengths = [1, 2, 3, 4, 10, 11, 12, 13, 14, 15], [10] * 4 + [100] * 6
    config = SelectionConfig(keep_fraction=0.5, loss_sigma=None)
    # Whole dataset: k = 5, median 10.5 -> norms 10, 11, 12, 13, 14 = rows 4-8, no short row.
    assert kept(select(norms, config, num_response_tokens=lengths)) == [4, 5, 6, 7, 8]
    # Short bin: k = 2, median 2.5 -> rows 1, 2. Long bin: k = 3, median 12.5 -> rows 6, 7 (0.5), then the tie
    # between row 5 (11) and row 8 (14) at 1.5 goes to the lower index, row 5.
    stratified = config.model_copy(update={"length_strata": 2})
    assert kept(select(norms, stratified, num_response_tokens=lengths)) == [1, 2, 5, 6, 7]


def test_length_strata_give_a_balance_tie_to_the_longer_bin():
    # Lengths [1, 2, 2, 3], K = 2: bins of 1 + 3 and 3 + 1 rows are equally balanced; the tie puts the boundary low,
    # bins [0, 1, 1, 1]. `high`, k = floor(0.5 * n_bin): bin 0 keeps nothing, bin 1 keeps row 3 (norm 5).
    # (Bins [0, 0, 0, 1] would keep row 2.)
    config = SelectionConfig(rule="high", keep_fraction=0.5, length_strata=2)
    assert kept(select([1, 2, 3, 5], config, num_response_tokens=[1, 2, 2, 3])) == [3]


@pytest.mark.parametrize(
    "config",
    [
        SelectionConfig(keep_fraction=0.4),
        SelectionConfig(rule="drop_top", drop_fraction=0.3),
        SelectionConfig(rule="band", lower_quantile=0.2, upper_quantile=0.7),
        SelectionConfig(rule="threshold", max_grad_norm=1.5, min_grad_norm=0.5),
        SelectionConfig(rule="high", keep_fraction=0.3),
        SelectionConfig(rule="low", keep_fraction=0.3),
    ],
    ids=lambda config: config.rule,
)
def test_length_strata_apply_the_rule_to_each_bin_independently(config):
    rng = np.random.default_rng(0)
    n = 60
    losses, norms, lengths = rng.normal(2, 1, n), rng.lognormal(0, 1, n), rng.integers(1, 30, n)
    bin_of = slow_length_bins(lengths.tolist(), 3)
    expected = []
    for b in range(3):
        rows = [r for r in range(n) if bin_of[lengths[r]] == b]
        part = select_rows(losses[rows], norms[rows], ok(len(rows)), config)
        expected += [rows[i] for i in kept(part)]
    stratified = config.model_copy(update={"length_strata": 3})
    assert kept(select_rows(losses, norms, ok(n), stratified, num_response_tokens=lengths)) == sorted(expected)


def test_moderate_with_length_strata_matches_slow_reference_on_terse_heavy_data():
    # 60% of rows at 2 tokens: quantile edges would leave the lower bins empty and send these rows to one bin.
    rng = np.random.default_rng(7)
    n = 150
    lengths = rng.choice([2, 5, 12, 40, 300], n, p=[0.6, 0.1, 0.1, 0.15, 0.05])
    losses, norms = rng.normal(2, 1, n), rng.lognormal(0, 1, n)
    status = np.where(rng.random(n) < 0.1, "nonfinite", "ok")
    config = SelectionConfig(keep_fraction=0.25, length_strata=3)
    good = [r for r in range(n) if status[r] == "ok"]
    bin_of = slow_length_bins([int(lengths[r]) for r in good], 3)
    expected = []
    for b in range(3):
        group = [r for r in good if bin_of[lengths[r]] == b]
        expected += slow_moderate(losses, norms, group, math.floor(0.25 * len(group)), config.loss_sigma)
    assert kept(select_rows(losses, norms, status, config, num_response_tokens=lengths)) == sorted(expected)


def test_length_strata_without_num_response_tokens_is_an_error():
    with pytest.raises(ValueError, match=r"`selection\.length_strata`"):
        select([1, 2, 3], SelectionConfig(length_strata=2))


# --- length bins ----------------------------------------------------------------------------------------------------


def test_length_bins_keep_six_terse_and_four_long_rows_in_bins_of_six_and_four():
    lengths = np.array([2, 40, 2, 2, 40, 2, 2, 40, 2, 40])
    assert length_bins(lengths, 2).tolist() == (lengths == 40).astype(int).tolist()


def test_length_bins_split_counts_four_three_three_into_three_bins():
    lengths = np.array([10, 2, 40, 2, 10, 40, 2, 40, 10, 2])
    assert length_bins(lengths, 3).tolist() == [1, 0, 2, 0, 1, 2, 0, 2, 1, 0]


def tied_lengths(seed):
    """A few distinct lengths with skewed, heavily tied counts, and a bin count K."""
    rng = np.random.default_rng(seed)
    distinct = rng.choice(np.arange(1, 500), rng.integers(1, 9), replace=False)
    lengths = rng.choice(distinct, rng.integers(1, 40), p=rng.dirichlet(np.full(len(distinct), 0.3)))
    return lengths, int(rng.integers(1, 7))


@pytest.mark.parametrize("seed", range(300))
def test_length_bins_are_all_non_empty_with_at_least_k_distinct_lengths(seed):
    lengths, k = tied_lengths(seed)
    assert np.bincount(length_bins(lengths, k)).tolist().count(0) == 0
    assert length_bins(lengths, k).max() + 1 == min(k, len(set(lengths.tolist())))


@pytest.mark.parametrize("seed", range(300))
def test_length_bins_are_contiguous_in_length_with_equal_lengths_together(seed):
    lengths, k = tied_lengths(seed)
    bins = length_bins(lengths, k)
    order = np.argsort(lengths, kind="stable")
    assert (np.diff(bins[order]) >= 0).all()
    assert len({(length, b) for length, b in zip(lengths.tolist(), bins.tolist())}) == len(set(lengths.tolist()))


@pytest.mark.parametrize("seed", range(300))
def test_length_bins_match_brute_force_optimum_and_tie_break(seed):
    lengths, k = tied_lengths(seed)
    bin_of = slow_length_bins(lengths.tolist(), k)
    assert length_bins(lengths, k).tolist() == [bin_of[length] for length in lengths.tolist()]


def slow_dp_length_bins(lengths, k):
    """The same optimum by the plain O(k m^2) dynamic programme, lowest last-bin start on ties."""
    values, counts = np.unique(lengths, return_counts=True)
    prefix = [0, *itertools.accumulate(counts.tolist())]
    m, parts = len(values), min(k, len(values))
    best = [p * p for p in prefix]
    starts = []
    for j in range(2, parts + 1):
        new_best, new_start = [None] * (m + 1), [None] * (m + 1)
        for i in range(j, m + 1):
            for t in range(j - 1, i):
                cost = best[t] + (prefix[i] - prefix[t]) ** 2
                if new_best[i] is None or cost < new_best[i]:
                    new_best[i], new_start[i] = cost, t
        best = new_best
        starts.append(new_start)
    cuts, end = [], m
    for start in reversed(starts):
        end = start[end]
        cuts.append(end)
    return np.searchsorted(sorted(cuts), np.searchsorted(values, lengths), side="right").tolist()


@pytest.mark.parametrize("seed", range(4))
def test_length_bins_match_quadratic_dynamic_programme_on_many_distinct_lengths(seed):
    rng = np.random.default_rng(seed)
    lengths = np.minimum(rng.geometric(0.01, 3000), 2000)  # a long tail: a few hundred distinct lengths
    k = [2, 5, 8, 13][seed]
    assert length_bins(lengths, k).tolist() == slow_dp_length_bins(lengths, k)


def test_length_bins_with_fewer_distinct_lengths_than_k_give_one_bin_per_length_and_log_it(caplog):
    caplog.set_level(logging.INFO, logger="gradsift.selection")
    assert length_bins([7, 3, 7, 3, 3], 4).tolist() == [1, 0, 1, 0, 0]
    assert "only 2 distinct response lengths for 4 bins" in caplog.text


def test_length_bins_of_no_rows_are_empty():
    assert length_bins(np.array([], dtype=int), 3).shape == (0,)


def test_length_bins_reject_fewer_than_one_bin():
    with pytest.raises(ValueError, match="must be >= 1; got 0"):
        length_bins([1, 2], 0)


# --- other rules ----------------------------------------------------------------------------------------------------


def test_drop_top_drops_highest_norms_lower_index_first_among_ties():
    # floor(0.5 * 5) = 2 rows dropped; ranked by (-norm, index): rows 1, 2, 4 (norm 9) -> rows 1, 2 dropped.
    selection = select([5, 9, 9, 1, 9], SelectionConfig(rule="drop_top", drop_fraction=0.5))
    assert kept(selection) == [0, 3, 4]
    assert selection.counts() == {"grad_norm_top_fraction": 2}


def test_band_keeps_norms_between_quantiles_inclusive():
    # Quantiles 0.25 and 0.75 of [1..5] are exactly 2 and 4, both kept.
    selection = select([5, 2, 4, 1, 3], SelectionConfig(rule="band", lower_quantile=0.25, upper_quantile=0.75))
    assert kept(selection) == [1, 2, 4]
    assert selection.reasons.tolist() == ["grad_norm_above_band", "", "", "grad_norm_below_band", ""]


def test_threshold_keeps_norms_within_inclusive_bounds():
    selection = select([1, 2, 3, 4], SelectionConfig(rule="threshold", max_grad_norm=3, min_grad_norm=2))
    assert selection.reasons.tolist() == ["grad_norm_below_min", "", "", "grad_norm_above_max"]


def test_threshold_without_min_keeps_small_norms():
    assert kept(select([0, 2, 3, 4], SelectionConfig(rule="threshold", max_grad_norm=3))) == [0, 1, 2]


def test_high_keeps_highest_norms_lower_index_first_among_ties():
    # k = floor(0.4 * 5) = 2 of the three 7s: rows 1, 2.
    selection = select([3, 7, 7, 1, 7], SelectionConfig(rule="high", keep_fraction=0.4))
    assert kept(selection) == [1, 2]
    assert selection.counts() == {"not_in_top_fraction": 3}


def test_low_keeps_lowest_norms_lower_index_first_among_ties():
    selection = select([3, 1, 5, 1, 1], SelectionConfig(rule="low", keep_fraction=0.4))
    assert kept(selection) == [1, 3]
    assert selection.counts() == {"not_in_bottom_fraction": 3}


def test_keep_fraction_count_ignores_float_noise():
    # 0.29 * 100 is 28.999999999999996 in floats; 29 rows are meant.
    assert select(np.arange(100.0), SelectionConfig(rule="low", keep_fraction=0.29)).num_kept == 29


def test_random_keeps_the_seeded_choice_of_ok_rows():
    status = ["ok", "nonfinite", "ok", "ok", "no_response_tokens", "ok", "ok", "ok"]
    selection = select([1.0] * 8, SelectionConfig(rule="random", keep_fraction=0.5, seed=3), status=status)
    # k = floor(0.5 * 6 ok rows) = 3, drawn exactly as the contract says.
    expected = np.random.default_rng(3).choice([0, 2, 3, 5, 6, 7], 3, replace=False)
    assert kept(selection) == sorted(expected.tolist())
    assert selection.counts() == {"random_not_sampled": 3, "no_response_tokens": 1, "nonfinite": 1}


def test_random_keep_count_overrides_keep_fraction():
    selection = select([1.0] * 8, SelectionConfig(rule="random", keep_fraction=0.2), keep_count=5)
    assert selection.num_kept == 5


def test_random_keep_count_is_split_over_length_bins_by_largest_remainder():
    # Bins of 1 and 2 rows, keep_count 2: quotas 2/3 and 4/3 -> floors [0, 1], the extra row to bin 0.
    config = SelectionConfig(rule="random", length_strata=2)
    selection = select([1.0] * 3, config, num_response_tokens=[1, 9, 9], keep_count=2)
    assert selection.keep[0] and selection.num_kept == 2


def test_random_keep_count_above_ok_rows_is_an_error():
    with pytest.raises(ValueError, match="between 0 and the 2 ok rows; got 3"):
        select([1.0] * 3, SelectionConfig(rule="random"), status=["ok", "nonfinite", "ok"], keep_count=3)


def test_keep_count_with_another_rule_is_an_error():
    with pytest.raises(ValueError, match="`keep_count` only applies"):
        select([1.0] * 3, SelectionConfig(), keep_count=1)


# --- a keep_fraction that keeps no row -------------------------------------------------------------------------------


def test_keep_fraction_that_keeps_no_row_is_refused_with_the_smallest_that_keeps_one():
    with pytest.raises(UserError) as error:
        select([1.0] * 5, SelectionConfig(keep_fraction=0.01), require_kept=True)
    assert str(error.value) == (
        "`selection.keep_fraction` 0.01 keeps no row: 5 rows are eligible (status ok, finite loss and gradient norm), "
        "and 0.01 × 5 rounds down to 0. Set `selection.keep_fraction` (--keep-fraction) to at least 0.2 to keep a row."
    )


def test_keep_fraction_that_keeps_no_row_is_allowed_unless_required():
    # The online mode selects in windows: one with few ok rows keeps none and the step is skipped.
    assert select([1.0] * 5, SelectionConfig(keep_fraction=0.01)).num_kept == 0


def test_keep_fraction_that_keeps_no_row_counts_only_eligible_rows():
    # 10 rows but 3 eligible: 0.3 × 3 rounds down to 0 (0.3 × 10 would keep 3).
    status = ["ok"] * 3 + ["no_response_tokens"] * 7
    with pytest.raises(UserError, match="3 rows are eligible .* at least 0.334 to keep a row"):
        select([1.0] * 10, SelectionConfig(rule="high", keep_fraction=0.3), status=status, require_kept=True)


def test_keep_fraction_that_keeps_no_row_of_any_window_names_the_window():
    with pytest.raises(UserError, match=r"in groups of at most 3 rows \(`selection.window` 3\), and 0.25 × 3 rounds"):
        select([1.0] * 9, SelectionConfig(keep_fraction=0.25, window=3), require_kept=True)


def test_keep_fraction_that_keeps_no_row_of_some_windows_is_accepted():
    # Windows of 4, 4 and 1 rows keep 1, 1 and 0 rows: only a fraction that keeps no row at all is refused.
    selection = select([1.0] * 9, SelectionConfig(keep_fraction=0.25, window=4), require_kept=True)
    assert selection.num_kept == 2


@pytest.mark.parametrize("rows", [1, 2, 3, 6, 7, 9, 11, 13, 99, 101, 997, 1001, 30011])
def test_the_suggested_keep_fraction_keeps_exactly_one_row(rows):
    with pytest.raises(UserError) as error:
        select(np.arange(rows, dtype=float), SelectionConfig(rule="low", keep_fraction=0.9 / rows), require_kept=True)
    suggested = float(str(error.value).split("at least ")[1].split(" to keep")[0])
    assert 1 / rows <= suggested <= min(1.0, 1.01 / rows)  # 1/rows rounded up to 3 significant digits
    assert select(np.arange(rows, dtype=float), SelectionConfig(rule="low", keep_fraction=suggested)).num_kept == 1


@pytest.mark.parametrize(
    "config, kwargs",
    [
        (SelectionConfig(rule="threshold", max_grad_norm=0.5), {}),
        (SelectionConfig(rule="random", keep_fraction=0.01), {"keep_count": 0}),
        (SelectionConfig(keep_fraction=0.01), {"status": ["nonfinite"] * 5}),
    ],
    ids=["threshold", "keep_count", "no_eligible_rows"],
)
def test_keeping_no_row_for_another_reason_is_not_a_keep_fraction_error(config, kwargs):
    assert select([1.0] * 5, config, require_kept=True, **kwargs).num_kept == 0


# --- rows that are not ok -------------------------------------------------------------------------------------------

KEEP_ALL_OK = [
    SelectionConfig(keep_fraction=1.0),
    SelectionConfig(rule="drop_top", drop_fraction=0.1),
    SelectionConfig(rule="band", lower_quantile=0.0, upper_quantile=1.0),
    SelectionConfig(rule="threshold", max_grad_norm=1e9),
    SelectionConfig(rule="random", keep_fraction=1.0),
    SelectionConfig(rule="high", keep_fraction=1.0),
    SelectionConfig(rule="low", keep_fraction=1.0),
]


@pytest.mark.parametrize("config", KEEP_ALL_OK, ids=lambda config: config.rule)
def test_rows_not_ok_or_nonfinite_are_never_kept_and_carry_their_reason(config):
    status = ["ok", "no_response_tokens", "nonfinite", "ok", "ok", "ok"]
    losses = [1.0, 1.0, 1.0, np.nan, 1.0, 1.0]
    norms = [2.0, 2.0, 2.0, 2.0, np.inf, 2.0]
    selection = select_rows(losses, norms, status, config)
    assert selection.reasons.tolist() == ["", "no_response_tokens", "nonfinite", "nonfinite", "nonfinite", ""]
    assert all(type(reason) is str for reason in selection.reasons)


def test_nonfinite_rows_do_not_count_towards_k():
    # 2 finite ok rows -> k = 1 (4 rows would give k = 2); median 1.5, tie between rows 0 and 1 -> row 0.
    assert kept(select([1, 2, np.nan, np.nan], SelectionConfig(keep_fraction=0.5))) == [0]


# --- Selection and inputs -------------------------------------------------------------------------------------------


def test_summary_formats_counts_with_thousands_separators():
    reasons = np.array([""] * 2000 + ["far_from_median"] * 6792 + ["loss_outlier"] * 1208, dtype=object)
    selection = Selection(keep=reasons == "", reasons=reasons)
    assert selection.summary() == "kept 2,000/10,000 (20.0%); dropped 6,792 far_from_median, 1,208 loss_outlier"


def test_summary_says_dropped_none_when_everything_is_kept():
    selection = select([1, 2, 3], SelectionConfig(rule="threshold", max_grad_norm=10))
    assert selection.summary() == "kept 3/3 (100.0%); dropped none"


def test_counts_orders_by_descending_count_then_name():
    reasons = np.array(["b", "c", "", "a", "c", "b", "a", "c"], dtype=object)
    counts = Selection(keep=reasons == "", reasons=reasons).counts()
    assert list(counts.items()) == [("c", 3), ("a", 2), ("b", 2)]


@pytest.mark.parametrize("config", [SelectionConfig(), SelectionConfig(window=4, length_strata=2)])
def test_empty_input_gives_an_empty_selection(config):
    selection = select_rows([], [], [], config, num_response_tokens=[])
    assert selection.keep.shape == (0,) and selection.reasons.shape == (0,)
    assert selection.summary() == "kept 0/0 (0.0%); dropped none"


def test_inputs_of_different_lengths_are_an_error():
    with pytest.raises(ValueError, match="`losses` 3, `grad_norms` 3, `status` 2"):
        select_rows([1, 2, 3], [1, 2, 3], ["ok", "ok"], SelectionConfig())


def test_window_with_a_rule_other_than_moderate_is_an_error():
    with pytest.raises(ValueError, match=r"`selection\.window`"):
        select([1, 2, 3], SelectionConfig(rule="low", window=2))


def test_reasons_documents_every_reason_string():
    assert set(REASONS) == {
        "no_response_tokens", "nonfinite", "loss_outlier", "far_from_median", "grad_norm_top_fraction",
        "grad_norm_below_band", "grad_norm_above_band", "grad_norm_above_max", "grad_norm_below_min",
        "random_not_sampled", "not_in_top_fraction", "not_in_bottom_fraction", "not_in_top_anchor_fraction",
        "anchor_conflict", "refusal_likely",
    }  # fmt: skip


# --- SelectionConfig ------------------------------------------------------------------------------------------------


def test_config_drop_top_needs_drop_fraction():
    with pytest.raises(ValidationError, match=r"`selection\.drop_fraction`"):
        SelectionConfig(rule="drop_top")


def test_config_rejects_keep_fraction_above_one():
    with pytest.raises(ValidationError, match="keep_fraction"):
        SelectionConfig(keep_fraction=5)


def test_load_config_reports_every_bad_key_as_one_user_error():
    with pytest.raises(UserError) as error:
        load_config({"selection": {"keep_fraction": 5, "rule": "drop_top"}, "data": {"formt": "auto"}})
    message = str(error.value)
    assert "`selection.keep_fraction`" in message and "got 5" in message
    assert "`data.formt` is not a gradsift option" in message


def test_min_kept_keeps_one_row_of_the_largest_group_when_the_fraction_keeps_none():
    # Length strata of 3 short and 2 long rows: 0.2 of either rounds down to none; min_kept=1 takes the short
    # group's row nearest its median norm, as k=1 there would.
    lengths = np.array([2, 2, 2, 40, 40])
    norms = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    config = SelectionConfig(rule="moderate", keep_fraction=0.2, loss_sigma=None, length_strata=2)
    args = (np.ones(5), norms, np.array(["ok"] * 5, dtype=object), config)
    assert not select_rows(*args, num_response_tokens=lengths).keep.any()
    kept = select_rows(*args, num_response_tokens=lengths, min_kept=1).keep
    assert kept.tolist() == [False, True, False, False, False]
    # Nothing scoreable: nothing kept, and no error.
    none = select_rows(np.ones(2), np.ones(2), np.array(["nonfinite"] * 2, dtype=object), config,
                       num_response_tokens=np.array([2, 2]), min_kept=1)  # fmt: skip
    assert not none.keep.any()
