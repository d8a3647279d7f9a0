"""The score table: one row per sample with its loss, gradient norm and status, and the rule that sets the status;
and the statistics of its columns that `gradsift inspect` shows (quantiles, anchor correlations, how well each column
tells labelled rows apart).

No torch here: `gradsift select`, `inspect` and `report` read and write score tables without importing it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from gradsift.tokenization import TokenizedRow

STATUS_OK = "ok"
STATUS_NO_RESPONSE = "no_response_tokens"
STATUS_NONFINITE = "nonfinite"
# The quantiles `gradsift inspect` shows of each score column.
QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
# The columns whose power to tell one label's rows from the others `gradsift inspect --label-column` measures.
LABEL_SCORE_COLUMNS = (
    "grad_norm", "loss", "anchor_dot", "anchor_cos", "refusal_logprob", "num_response_tokens"
)  # fmt: skip


@dataclass
class ScoreTable:
    """One row per sample: its position in the dataset, id, loss, gradient norm, token counts and status."""

    index: np.ndarray
    sample_id: np.ndarray
    loss: np.ndarray
    grad_norm: np.ndarray
    num_tokens: np.ndarray
    num_response_tokens: np.ndarray
    truncated: np.ndarray
    status: np.ndarray
    # ⟨g_i, ḡ_A⟩ with the mean gradient of an anchor set, and its cosine; NaN when scored without an anchor.
    anchor_dot: np.ndarray
    anchor_cos: np.ndarray
    # The log-probability that the model opens its answer to the row's request with a refusal
    # (`gradsift.refusal_probe`); NaN when not asked (None on construction: all NaN).
    refusal_logprob: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.refusal_logprob is None:
            self.refusal_logprob = np.full(len(self.index), np.nan)

    def __len__(self) -> int:
        return len(self.index)

    @classmethod
    def empty(cls, rows: Sequence[TokenizedRow], index: Sequence[int]) -> ScoreTable:
        """Return a table for `rows` with NaN scores and statuses still to fill in."""
        n = len(rows)
        return cls(
            index=np.asarray(index, dtype=np.int64),
            sample_id=np.array([row.sample_id for row in rows], dtype=object),
            loss=np.full(n, np.nan),
            grad_norm=np.full(n, np.nan),
            num_tokens=np.array([len(row.input_ids) for row in rows], dtype=np.int64),
            num_response_tokens=np.array([row.num_response_tokens for row in rows], dtype=np.int64),
            truncated=np.array([row.truncated for row in rows], dtype=bool),
            status=np.array([STATUS_OK] * n, dtype=object),
            anchor_dot=np.full(n, np.nan),
            anchor_cos=np.full(n, np.nan),
            refusal_logprob=np.full(n, np.nan),
        )

    def columns(self) -> dict[str, np.ndarray]:
        """Return the columns by name, in table order."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def concat(cls, tables: Sequence[ScoreTable]) -> ScoreTable:
        """Join tables and sort the result by `index`."""
        merged = cls(**{f.name: np.concatenate([getattr(t, f.name) for t in tables]) for f in fields(cls)})
        order = np.argsort(merged.index, kind="stable")
        return cls(**{name: column[order] for name, column in merged.columns().items()})


def row_status(num_response_tokens: np.ndarray, losses: np.ndarray, grad_norms: np.ndarray) -> np.ndarray:
    """Each row's status: `no_response_tokens` (nothing to score), else `nonfinite` when its loss or gradient norm is
    NaN or infinite, else `ok`. Only `ok` rows have scores a rule may read."""
    counts = np.asarray(num_response_tokens)
    finite = np.isfinite(np.asarray(losses, dtype=float)) & np.isfinite(np.asarray(grad_norms, dtype=float))
    status = np.where(counts == 0, STATUS_NO_RESPONSE, np.where(finite, STATUS_OK, STATUS_NONFINITE))
    return status.astype(object)


def column_quantiles(values: np.ndarray) -> dict[str, float]:
    """The `QUANTILES` of a column's values, keyed by the quantile as text (`"0.5"`)."""
    return {str(q): float(np.quantile(values, q)) for q in QUANTILES}


def anchor_correlations(table: ScoreTable, rows: np.ndarray) -> dict[str, float | None]:
    """Spearman's rank correlation of `anchor_cos` with the gradient norm and with the response length."""
    from scipy.stats import spearmanr

    result: dict[str, float | None] = {}
    for name in ("grad_norm", "num_response_tokens"):
        other = getattr(table, name)[rows]
        if rows.sum() < 3 or np.ptp(other) == 0 or np.ptp(table.anchor_cos[rows]) == 0:
            result[name] = None  # undefined on fewer than 3 rows or a constant column
        else:
            result[name] = float(spearmanr(table.anchor_cos[rows], other).statistic)
    return result


def label_aurocs(table: ScoreTable, labels: np.ndarray, rows: np.ndarray) -> dict[str, dict[str, float | None]]:
    """For each score column with a finite value among `rows`, and each label value there: the column's AUROC for
    telling that value's rows from the other rows, i.e. the Mann–Whitney U of the two groups over the product of
    their sizes (ties count half). 1: the column's high values pick the label out; 0.5: chance; 0: its low values
    do. None where the label has no row among `rows`, or every row has it."""
    result: dict[str, dict[str, float | None]] = {}
    values = sorted(set(labels.tolist()))  # every label, None where none of its rows has a score
    for name in LABEL_SCORE_COLUMNS:
        column = np.asarray(getattr(table, name), dtype=float)
        usable = rows & np.isfinite(column)
        if not usable.any():
            continue
        result[name] = {}
        for value in values:
            inside, outside = usable & (labels == value), usable & (labels != value)
            if not inside.any() or not outside.any():
                result[name][value] = None
                continue
            result[name][value] = auroc(column[inside], column[outside])
    return result


def auroc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """The AUROC of a score for telling `positives` from `negatives` (both non-empty): the Mann–Whitney U of the two
    groups over the product of their sizes, ties counting half."""
    from scipy.stats import mannwhitneyu

    u = mannwhitneyu(positives, negatives, alternative="two-sided").statistic
    return float(u) / (len(positives) * len(negatives))
