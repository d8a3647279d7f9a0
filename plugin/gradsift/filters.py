"""The filters every selection rule applies first: `min_anchor_cos` (a gradient that points away from the anchor
set's) and `max_refusal_logprob` (a row whose request the model would likely refuse)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from gradsift.config import SelectionConfig
from gradsift.errors import UserError


def check_anchor_scores(arrays: dict[str, np.ndarray], config: SelectionConfig, scored: np.ndarray) -> None:
    """The anchor rule and filter need the anchor columns, with a value for the scored rows (none scored: fine)."""
    for needed, wanted in (("anchor_dot", config.rule == "anchor"), ("anchor_cos", config.min_anchor_cos is not None)):
        values = arrays.get(needed)
        if wanted and (values is None or (scored.any() and not np.isfinite(values[scored]).any())):
            what = "`selection.rule` 'anchor'" if needed == "anchor_dot" else "`selection.min_anchor_cos`"
            raise UserError(
                f"{what} needs each row's `{needed}`, but the scores have none. Score with an anchor set "
                "(`scoring.anchor_data`, e.g. --anchor-data embedded:refusals), or choose another rule."
            )


def pre_filters(
    arrays: dict[str, np.ndarray], config: SelectionConfig, ok: np.ndarray, require_kept: bool
) -> Iterator[tuple[str, np.ndarray]]:
    """(reason, rows it drops) of each filter the config sets, in order, among the `ok` rows; each filter sees the
    rows the earlier ones left. With `require_kept`, a filter that would drop every row left is an error."""
    ok = ok.copy()
    if config.min_anchor_cos is not None:
        cosines = arrays["anchor_cos"]
        conflict = ok & ~(cosines >= config.min_anchor_cos)
        if require_kept and conflict.any() and conflict.sum() == ok.sum():
            raise UserError(_filtered_out(config, cosines[ok]))
        ok &= ~conflict
        yield "anchor_conflict", conflict
    if config.max_refusal_logprob is not None:
        values = arrays.get("refusal_logprob")
        if values is None or (ok.any() and not np.isfinite(values[ok]).any()):
            raise UserError(
                "`selection.max_refusal_logprob` needs each row's `refusal_logprob`, but the scores have none: score "
                "with the refusal probe (`scoring.refusal_probe: true`: --refusal-probe; on with --anchor-data), on "
                "rows whose loss leaves out their prompt (the request it asks), or unset it."
            )
        likely = ok & (values > config.max_refusal_logprob)  # a row without a value (no prompt) is kept
        if require_kept and likely.any() and likely.sum() == ok.sum():
            finite = values[ok][np.isfinite(values[ok])]
            raise UserError(
                f"`selection.max_refusal_logprob` {config.max_refusal_logprob} drops every one of the "
                f"{int(ok.sum()):,} scored rows (their refusal_logprob from {finite.min():+.3f} to "
                f"{finite.max():+.3f}); raise it above the smallest, or unset it."
            )
        yield "refusal_likely", likely


def _filtered_out(config: SelectionConfig, cosines: np.ndarray) -> str:
    finite = cosines[np.isfinite(cosines)]
    quantiles = np.quantile(finite, [0.5, 0.9, 1.0]) if len(finite) else []
    shown = ", ".join(f"{q:g}: {v:+.3f}" for q, v in zip((0.5, 0.9, 1.0), quantiles))
    return (
        f"`selection.min_anchor_cos` {config.min_anchor_cos} drops every one of the {len(cosines):,} scored rows "
        f"(their anchor_cos quantiles {shown or 'none finite'}). Lower it below the largest, or unset it."
    )
