"""Per-sample loss and gradient L2 norm of every row, batched, from hooks on the trainable linear layers.

Rows are sorted by length into token-budgeted batches. Each batch takes one forward and one backward of its summed
per-sample losses, from which `GradNormHooks` (`gradsift.hooks`, where the maths is) reads every row's norm;
`gradsift.frozen_head` computes the losses, and `gradsift.model_mode` sets how the model runs. The batch-size-1
`loop` is the reference.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from gradsift.config import ScoringConfig
from gradsift.data import IGNORE_INDEX
from gradsift.errors import UserError
from gradsift.frozen_head import find_frozen_head, forward_logits, frozen_head_losses, loss_at
from gradsift.hooks import GradNormHooks
from gradsift.model_mode import compute_autocast, scoring_mode
from gradsift.table import STATUS_NONFINITE, STATUS_OK, ScoreTable, row_status
from gradsift.tokenization import TokenizedRow, collate, make_batches

logger = logging.getLogger(__name__)


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return each row's mean cross-entropy over its response tokens, and its response-token count.

    `logits` cover every position; only response positions are cast to float32, so no full-vocabulary copy of the
    batch is made.
    """
    return loss_at(logits[:, :-1], labels[:, 1:])


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def score_batch(
    model: nn.Module, hooks: GradNormHooks, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return per-sample losses and gradient norms of one padded batch, with one forward and one backward.

    The LM head is applied only where a row has a response token to predict. When it is frozen (LoRA), the decoder's
    hidden states at exactly those tokens go through a fused head-and-cross-entropy in chunks (`FrozenHeadLoss`): no
    full-vocabulary logits are kept, and the head costs two matmuls over response tokens, as TRL's `chunked_nll`.
    Otherwise the model is asked for logits at the union of response positions (`logits_to_keep`).
    """
    losses, total, finite = batch_losses(model, batch, hooks)
    if total.requires_grad and bool(finite.any()):
        torch.autograd.grad(total, hooks.params, allow_unused=True)
    norms = hooks.finish()
    if not hooks.masked and bool((finite & ~torch.isfinite(norms)).any()):
        # A finite loss with a non-finite norm: a NaN or inf sits in some row's padding. Redo with padding masked.
        hooks.masked = True
        try:
            return score_batch(model, hooks, batch)
        finally:
            hooks.masked = False
    return losses.detach(), norms


def batch_losses(
    model: nn.Module, batch: dict[str, torch.Tensor], hooks: GradNormHooks | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward: per-row mean response-token losses, their sum over the finite rows (what the backward takes) and
    the mask of those rows. With `hooks`, they record the forward."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    head = find_frozen_head(model, batch)
    positions = None if head is not None else (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    if hooks is not None:
        hooks.start(batch["attention_mask"], logit_positions=positions)
    try:
        if head is not None:
            losses, counts = frozen_head_losses(head, batch, targets)
        else:
            logits = forward_logits(model, batch, positions)
    finally:
        if hooks is not None:
            hooks.stop_recording()
    if head is None:
        if logits.shape[1] == positions.numel():
            losses, counts = loss_at(logits, targets[:, positions])
        else:  # the model ignored logits_to_keep and returned every position
            losses, counts = per_sample_loss(logits, labels)
    finite = torch.isfinite(losses) & (counts > 0)
    # Non-finite rows are left out of the sum, so their NaN cannot reach the other rows' gradients.
    total = torch.where(finite, losses, torch.zeros_like(losses)).sum()
    return losses, total, finite


def anchor_gradient(
    model: nn.Module, rows: Sequence[TokenizedRow], config: ScoringConfig, pad_token_id: int, *, progress: bool = False
) -> dict[int, torch.Tensor]:
    """ḡ_A: the mean over the anchor rows of each row's gradient g_a (of its mean response-token loss), per trainable
    parameter (float32, keyed by `id(param)`), computed the way the rows are scored (`batched` or `loop`).

    Rows without response tokens, or whose loss or gradient is not finite, are left out of the mean. A batch whose
    summed gradient is not finite (a NaN or inf from padding, or from one row) is taken again row by row.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    total = {id(p): torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params}
    todo = [row for row in rows if row.num_response_tokens > 0]
    count = 0
    device = device_of(model)

    def add(grads: Sequence[torch.Tensor | None]) -> None:
        for param, grad in zip(params, grads):
            if grad is not None:
                total[id(param)] += grad.float()

    def add_rows(members: Sequence[TokenizedRow]) -> int:
        added = 0
        for row in members:
            _, grads = _row_gradient(model, row, pad_token_id)
            if grads is not None and all(g is None or bool(torch.isfinite(g).all()) for g in grads):
                add(grads)
                added += 1
        return added

    with scoring_mode(model), compute_autocast(config, device):
        if config.method == "loop":
            count = add_rows(tqdm(todo, desc="anchor gradient (loop)", unit="row", disable=not progress))
        else:
            # Only Σ_a g_a is needed, not per-row norms: one plain backward per batch, no hooks.
            lengths = [len(row.input_ids) for row in todo]
            batches = make_batches(lengths, config.token_budget(device.type), config.max_batch_size)
            for positions in tqdm(batches, desc="anchor gradient", unit="batch", disable=not progress):
                members = [todo[i] for i in positions]
                _, total_loss, finite = batch_losses(model, collate(members, pad_token_id, device))
                if bool(finite.all()):
                    grads = (
                        torch.autograd.grad(total_loss, params, allow_unused=True) if total_loss.requires_grad else ()
                    )
                    if all(g is None or bool(torch.isfinite(g).all()) for g in grads):
                        add(grads)
                        count += len(members)
                        continue
                # A row without a finite loss, or a NaN from padding: take the batch again row by row.
                count += add_rows(members)
    if count == 0:
        raise UserError(
            f"The anchor set has no row to take a gradient of ({len(rows)} rows, none with response tokens and a "
            "finite loss and gradient). Pass anchor rows with answers (e.g. harmful requests with refusals)."
        )
    return {key: grad / count for key, grad in total.items()}


def score_rows(
    model: nn.Module,
    rows: Sequence[TokenizedRow],
    config: ScoringConfig,
    pad_token_id: int,
    *,
    index: Sequence[int] | None = None,
    progress: bool = True,
    bar: Any = None,
    anchor: dict[int, torch.Tensor] | None = None,
) -> ScoreTable:
    """Score `rows` with `config.method` (`batched` hooks, or the batch-size-1 `loop` reference).

    `bar` is an outer progress bar to advance instead of opening one. With `anchor` (ḡ_A from `anchor_gradient`),
    each row's `anchor_dot` = ⟨g_i, ḡ_A⟩ and `anchor_cos` are filled in, from the same forward and backward.
    """
    table = ScoreTable.empty(rows, range(len(rows)) if index is None else index)
    todo = np.flatnonzero(table.num_response_tokens > 0)
    device = device_of(model)
    own_bar = bar is None
    if own_bar:
        bar = tqdm(total=len(todo), desc=f"scoring ({config.method})", unit="row", disable=not progress)
    with scoring_mode(model), compute_autocast(config, device):
        if config.method == "loop":
            for i in todo:
                scores = score_one(model, rows[i], pad_token_id, anchor)
                table.loss[i], table.grad_norm[i], table.anchor_dot[i] = scores
                bar.update(1)
        else:
            lengths = [len(rows[i].input_ids) for i in todo]
            with GradNormHooks(model, config.norm_method, anchor=anchor) as hooks:
                for batch_positions in make_batches(lengths, config.token_budget(device.type), config.max_batch_size):
                    members = todo[batch_positions]
                    batch = collate([rows[i] for i in members], pad_token_id, device)
                    losses, norms = score_batch(model, hooks, batch)
                    table.loss[members] = losses.double().cpu().numpy()
                    table.grad_norm[members] = norms.cpu().numpy()
                    if anchor is not None:
                        table.anchor_dot[members] = hooks.dots.cpu().numpy()
                    bar.update(len(members))
    if own_bar:
        bar.close()
    table.status = row_status(table.num_response_tokens, table.loss, table.grad_norm)
    bad = table.status == STATUS_NONFINITE
    if anchor is not None:
        table.anchor_dot, table.anchor_cos = anchor_scores(table.anchor_dot, table.grad_norm, table.status, anchor)
    if bad.any():
        logger.warning(
            "%d row(s) have a non-finite loss or gradient norm; they are marked `nonfinite`.", int(bad.sum())
        )
    return table


def anchor_scores(
    dots: np.ndarray, norms: np.ndarray, status: np.ndarray, anchor: dict[int, torch.Tensor]
) -> tuple[np.ndarray, np.ndarray]:
    """The anchor columns: `anchor_dot` = ⟨g_i, ḡ_A⟩ and `anchor_cos` = anchor_dot / (‖g_i‖·‖ḡ_A‖), both NaN for a
    row whose status is not `ok` (it has no score a rule may read)."""
    anchor_norm = math.sqrt(sum(float(grad.double().pow(2).sum()) for grad in anchor.values()))
    dots = np.where(status == STATUS_OK, dots, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        return dots, dots / (norms * anchor_norm)


def _row_gradient(
    model: nn.Module, row: TokenizedRow, pad_token_id: int
) -> tuple[float, tuple[torch.Tensor | None, ...] | None]:
    """One row alone (no padding): its mean response-token loss and `torch.autograd.grad` of it over every trainable
    parameter (None if the loss is not finite)."""
    params = [p for p in model.parameters() if p.requires_grad]
    batch = collate([row], pad_token_id, device_of(model))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    loss = per_sample_loss(logits, batch["labels"])[0][0]
    if not torch.isfinite(loss):
        return float("nan"), None
    return float(loss.detach()), torch.autograd.grad(loss, params, allow_unused=True)


def score_one(
    model: nn.Module, row: TokenizedRow, pad_token_id: int, anchor: dict[int, torch.Tensor] | None = None
) -> tuple[float, float, float]:
    """The reference: one row alone, its loss, gradient norm and (with `anchor`) ⟨g_i, ḡ_A⟩, from autograd."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss, grads = _row_gradient(model, row, pad_token_id)
    if grads is None:
        return loss, float("nan"), float("nan")
    sq = sum(float(g.double().pow(2).sum()) for g in grads if g is not None)
    dot = float("nan")
    if anchor is not None:
        dot = sum(float((g.double() * anchor[id(p)].double()).sum()) for p, g in zip(params, grads) if g is not None)
    return loss, math.sqrt(sq), dot
