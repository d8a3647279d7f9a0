"""One optimizer step of the paper's Algorithm 1, in its own steps: score the window, gather it across ranks, select,
and make the update by reuse or recompute (`gradsift.online` has the whole story and the trainer glue)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gradsift.config import GradSiftConfig
from gradsift.data import IGNORE_INDEX
from gradsift.distributed import Team
from gradsift.hooks import GradNormHooks
from gradsift.model_mode import scoring_mode
from gradsift.online_trainer import mark_reused, reused, skipped
from gradsift.online_window import Window, all_reduce_sum, gather_window
from gradsift.scoring import anchor_scores, score_batch
from gradsift.selection import select_rows
from gradsift.table import STATUS_OK, row_status
from gradsift.tokenization import TokenizedRow, row_digest

# Padding values per collated key when kept rows from different micro-batches are re-padded together.
PAD_VALUES = {"labels": IGNORE_INDEX, "attention_mask": 0}


@dataclass
class Scored:
    """The scoring pass over this rank's micro-batches: per micro-batch (losses, norms, anchor dots), and with
    `reuse` each row's per-sample gradient by parameter id, over `params`."""

    columns: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
    per_sample: list[dict[int, torch.Tensor]]
    params: list[torch.Tensor]


@dataclass
class Update:
    """A step's update made from the scoring pass (`reuse`): the gradient per parameter, the kept rows' loss and
    their attention-mask tokens."""

    grads: dict[torch.Tensor, torch.Tensor]
    loss: torch.Tensor
    tokens: int


@dataclass
class Outcome:
    """What one step selected: its record (`gradsift_online.jsonl`), the micro-batches to train on (None: no row
    scored, skip the step) and, with `reuse`, the update."""

    record: dict[str, Any]
    batches: list[dict[str, Any]] | None = None
    update: Update | None = None


@dataclass
class OnlineStep:
    """Algorithm 1 for one optimizer step, on the micro-batches the trainer fetched."""

    config: GradSiftConfig
    team: Team
    reuse: bool
    pad_token_id: int

    def __call__(
        self, model: Any, batches: list[dict[str, Any]], anchor: Any, device: Any, contexts: Callable, step: int
    ) -> Outcome:
        scored = self.score(model, batches, anchor, device, contexts)
        window = gather_window(self.team, local_window(batches, scored, anchor))
        keep, reasons = self.select(window, step)
        check_agreement(self.team, keep)
        record = step_record(step, window, keep, reasons)
        if not keep.any():
            return Outcome(record)  # on every rank: the window is the same everywhere
        mine = keep[window.mine]
        packed = self.repack(batches, mine, window.sizes[window.rank])
        if not self.reuse:
            return Outcome(record, packed)
        mark_reused(packed)
        if not mine.any():  # this rank kept no row but the step's update is every rank's: apply it here too
            packed[0] = reused()
        return Outcome(record, packed, reused_update(scored, window, keep, self.team))

    def score(self, model: Any, batches: list[dict[str, Any]], anchor: Any, device: Any, contexts: Callable) -> Scored:
        """Each row's loss and gradient norm (and ⟨g_i, ḡ_A⟩), one forward and backward per micro-batch; with `reuse`
        in train mode, keeping the per-sample gradients, so that the update is the gradient of the trainer's own
        forward (dropout too). `contexts()`: the trainer's mixed-precision contexts, so rows are scored with the
        numerics they are trained with."""
        mode = _train_mode(model) if self.reuse else scoring_mode(model)
        hooks = GradNormHooks(model, self.config.scoring.norm_method, keep_grads=self.reuse, anchor=anchor)
        scored = Scored([], [], hooks.params)
        with contextlib.ExitStack() as stack:
            for context in (mode, *contexts(), hooks):
                stack.enter_context(context)
            for batch in batches:
                inputs = {key: batch[key].to(device) for key in ("input_ids", "attention_mask", "labels")}
                losses, norms = score_batch(model, hooks, inputs)
                scored.columns.append((losses.double().cpu().numpy(), norms.cpu().numpy(), hooks.dots.cpu().numpy()))
                if self.reuse:
                    scored.per_sample.append(hooks.take_grads())
        return scored

    def select(self, window: Window, step: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """The rule on each group of the window: ⌊ρ·n_ok⌋ of its scoreable rows, at least one whenever one scores.

        `random` draws with `selection.seed` + `step` (+ the group's index), so each step draws afresh and every rank
        draws alike."""
        keep = np.zeros(len(window.losses), dtype=bool)
        reasons = np.full(len(window.losses), "", dtype=object)
        for number, group in enumerate(window.groups(self.config.online.window)):
            seed = self.config.selection.seed + step * 1_000_003 + number  # a prime stride: no two (step, group) alike
            selection = select_rows(
                window.losses[group],
                window.norms[group],
                window.status[group],
                self.config.selection.model_copy(update={"seed": seed}),
                num_response_tokens=window.counts[group],
                min_kept=1,
                anchor_dot=None if window.dots is None else window.dots[group],
                anchor_cos=None if window.cosines is None else window.cosines[group],
            )
            keep[group], reasons[group] = selection.keep, selection.reasons
        return keep, reasons

    def repack(self, batches: list[dict[str, Any]], keep: np.ndarray, sizes: list[int]) -> list[dict[str, Any]]:
        """Micro-batches of the kept rows (`recompute` trains on them): in place for `micro_batch`, re-dealt in order
        for `step`; as many as the trainer fetched, since it counts micro-batches per step."""
        keys = [key for key, value in batches[0].items() if torch.is_tensor(value) and value.dim() == 2]
        rows = [{key: batch[key][i] for key in keys} for batch in batches for i in range(len(batch["input_ids"]))]
        kept_rows = [row for row, flag in zip(rows, keep) if flag]
        if self.config.online.window == "step":
            size = max(sizes)
            chunks = [kept_rows[i : i + size] for i in range(0, len(kept_rows), size)]
        else:
            bounds = np.cumsum([0, *sizes])
            chunks = [[rows[i] for i in range(bounds[b], bounds[b + 1]) if keep[i]] for b in range(len(sizes))]
        empty = self.empty(rows[0], keys)
        out = [self.collate(chunk, keys) if chunk else empty for chunk in chunks]
        return out + [empty] * (len(batches) - len(out))

    def empty(self, row: dict[str, torch.Tensor], keys: list[str]) -> dict[str, Any]:
        """A micro-batch that adds nothing to the step. Alone it is skipped. Under DDP with `recompute` every rank
        must run as many backward passes as the others (each one all-reduces): one row with no label to learn
        (`labels` all ignored) gives a zero gradient and counts no token."""
        if self.team.world_size == 1 or self.reuse:
            return skipped()
        batch = self.collate([row], keys)
        batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
        return batch

    def collate(self, rows: list[dict[str, torch.Tensor]], keys: list[str]) -> dict[str, torch.Tensor]:
        """The rows padded to the longest kept row: the tensors a trainer given only these rows would see."""
        width = max(int(row["attention_mask"].sum()) for row in rows)
        batch = {}
        for key in keys:
            pad = PAD_VALUES.get(key, self.pad_token_id if key == "input_ids" else 0)
            tensor = torch.full((len(rows), width), pad, dtype=rows[0][key].dtype)
            for i, row in enumerate(rows):
                length = int(row["attention_mask"].sum())
                tensor[i, :length] = row[key][:length]
            batch[key] = tensor
        return batch


@contextlib.contextmanager
def _train_mode(model: torch.nn.Module):
    was_training = model.training
    model.train()
    try:
        yield
    finally:
        model.train(was_training)


def local_window(batches: list[dict[str, Any]], scored: Scored, anchor: Any) -> Window:
    """This rank's rows: their scores, statuses, anchor columns and content digests."""
    losses = np.concatenate([s[0] for s in scored.columns])
    norms = np.concatenate([s[1] for s in scored.columns])
    counts = np.concatenate([(batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).numpy() for batch in batches])
    status = row_status(counts, losses, norms)
    dots = cosines = None
    if anchor is not None:
        dots, cosines = anchor_scores(np.concatenate([s[2] for s in scored.columns]), norms, status, anchor)
    rows = [
        TokenizedRow(
            input_ids=b["input_ids"][i][b["attention_mask"][i].bool()].tolist(),
            labels=b["labels"][i][b["attention_mask"][i].bool()].tolist(),
        )
        for b in batches
        for i in range(len(b["input_ids"]))
    ]
    return Window(
        losses=losses,
        norms=norms,
        counts=counts,
        tokens=np.concatenate([batch["attention_mask"].sum(dim=1).cpu().numpy() for batch in batches]),
        status=status,
        digests=[row_digest(row) for row in rows],
        sizes=[[len(batch["input_ids"]) for batch in batches]],
        dots=dots,
        cosines=cosines,
    )


def check_agreement(team: Team, keep: np.ndarray) -> None:
    """With `GRADSIFT_DEBUG` set, assert that every rank kept the same rows (they must, with no broadcast)."""
    if team.world_size > 1 and os.environ.get("GRADSIFT_DEBUG"):
        masks = team.gather(keep.tobytes())
        if any(mask != masks[0] for mask in masks):
            raise RuntimeError("gradsift: the ranks selected different rows from the same window (a bug)")


def reused_update(scored: Scored, window: Window, keep: np.ndarray, team: Team) -> Update:
    """The kept rows' gradient of Σ_kept n_i L_i / Σ_kept n_i over the whole window, from the scoring pass's
    per-sample gradients: each rank weights its own kept rows, one all-reduce sums the ranks' parts."""
    total = window.counts[keep].sum()
    mine = keep[window.mine]
    weights = np.where(mine, window.counts[window.mine], 0) / total
    params = {id(p): p for p in scored.params}
    grads: dict[int, torch.Tensor] = {}
    bounds = np.cumsum([0, *window.sizes[window.rank]])
    for b, batch_grads in enumerate(scored.per_sample):
        rows = np.flatnonzero(mine[bounds[b] : bounds[b + 1]])
        if not len(rows):
            continue  # rows only ever weighted 0 are left out: a non-finite row's gradient may be NaN
        w = torch.as_tensor(weights[bounds[b] + rows], dtype=torch.float32)
        index = torch.as_tensor(rows)
        for key, grad in batch_grads.items():
            contribution = torch.tensordot(w.to(grad.device), grad[index.to(grad.device)], dims=1)
            grads[key] = grads[key] + contribution if key in grads else contribution
    if team.world_size > 1:  # every rank adds a part, zero where it kept no row
        keys = [id(p) for p in scored.params]  # the model's order, the same on every rank (ids are not)
        parts = [grads.get(key, torch.zeros_like(params[key], dtype=torch.float32)) for key in keys]
        grads = dict(zip(keys, all_reduce_sum(parts, team)))
    loss = float(np.sum(np.where(keep, window.losses * window.counts, 0.0)) / total)
    return Update(
        {params[key]: grad for key, grad in grads.items()}, torch.tensor(loss), int(window.tokens[keep].sum())
    )


def step_record(step: int, window: Window, keep: np.ndarray, reasons: np.ndarray) -> dict[str, Any]:
    """The step's record (the whole window: every rank's rows): counts, norm quantiles, kept and dropped ids."""
    ok = window.status == STATUS_OK
    quantiles = np.quantile(window.norms[ok], [0.1, 0.5, 0.9]) if ok.any() else [float("nan")] * 3
    dropped: dict[str, int] = {}
    for reason in reasons[~keep]:
        dropped[reason] = dropped.get(reason, 0) + 1
    ids = window.sample_ids()
    return {
        "step": step,
        "rows": len(ids),
        "kept": int(keep.sum()),
        "grad_norm_q10": float(quantiles[0]),
        "grad_norm_q50": float(quantiles[1]),
        "grad_norm_q90": float(quantiles[2]),
        "dropped": dropped,
        "kept_ids": [sample_id for sample_id, flag in zip(ids, keep) if flag],
        "dropped_ids": [sample_id for sample_id, flag in zip(ids, keep) if not flag],
    }
