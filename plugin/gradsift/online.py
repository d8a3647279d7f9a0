"""The paper's online mode (Algorithm 1) as a trainer mixin, shared by TRL's `SFTTrainer` and axolotl's trainer.

For every optimizer step the mixin takes the step's micro-batches as the trainer fetched them, scores every row with
the current model (per-sample loss and gradient norm from the batched hooks: one forward and one backward per
micro-batch), applies the selection rule across the whole step (`online.window: step`) or inside each micro-batch
(`micro_batch`), and updates on the kept rows only. The update's loss is the kept rows' summed response-token
cross-entropy divided by their response-token count, as TRL computes it. The update is made one of two ways
(`online.update`):

- `reuse`: the scoring pass runs in train mode and keeps every row's per-sample gradient `G_i` of its mean loss
  `L_i` (for LoRA these are small); the step's gradient is `Σ_kept n_i G_i / Σ_kept n_i` (n_i: response tokens),
  written into `.grad` before the optimizer step. No second forward or backward: the step costs about one plain step.
- `recompute`: the trainer gets micro-batches holding only the kept rows and runs its usual forward and backward.

`auto` reuses unless something rules it out: a sharding engine (FSDP, DeepSpeed: no rank holds the whole gradient),
fp16 loss scaling, a loss other than token cross-entropy, trainable weights outside linear layers, or per-sample
gradients larger than `online.reuse_max_gb`.

Under several data-parallel processes (DDP) the window is the step's global batch: every rank scores its own rows,
the rows' numbers are all-gathered (`gradsift.online_window`), the rule runs once on the whole window on every rank
(the same kept set everywhere, no broadcast; `GRADSIFT_DEBUG=1` asserts it), and each rank trains its own kept rows.
`num_items_in_batch` is the global kept-token count (the trainer gathers it). With `reuse` each rank sums
`n_i G_i / Σ_kept n_i` over its own kept rows and one all-reduce of those sums (the size of the LoRA gradient, what DDP
all-reduces anyway) gives the exact global update; no backward runs through the DDP wrapper, so its own gradient sync
does not run. With `recompute` a rank that kept fewer rows still runs as many backward passes as the others (on a row
with no label to learn), since each backward all-reduces.

How many rows a window keeps: Algorithm 1 keeps ⌊ρ·|B|⌋ of a batch B whose rows all score. gradsift keeps ⌊ρ·n_ok⌋ of
the window's n_ok scoreable rows (rows without response tokens or with a non-finite loss or norm are never kept) and at
least one whenever one scores; the start-up check asks ⌊ρ·|B|⌋ ≥ 1 of a full window. A step is skipped only when no
row of its window scores.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any

import numpy as np
import torch

from gradsift.anchors import uses_anchor
from gradsift.config import GradSiftConfig
from gradsift.data import IGNORE_INDEX
from gradsift.distributed import Team
from gradsift.errors import UserError
from gradsift.fileio import dumps
from gradsift.hooks import GradNormHooks
from gradsift.model_mode import scoring_mode
from gradsift.online_window import Window, all_reduce_sum, gather_window
from gradsift.scoring import anchor_gradient, anchor_scores, score_batch
from gradsift.selection import FRACTION_RULES, fraction_count, select_rows
from gradsift.table import STATUS_OK, row_status
from gradsift.tokenization import TokenizedRow, row_digest

logger = logging.getLogger(__name__)

# accelerate's kinds of plain data parallelism (every rank holds the whole model), where `reuse` all-reduces the
# kept rows' gradients itself; FSDP, DeepSpeed and the like keep `recompute`.
DATA_PARALLEL = ("NO", "MULTI_CPU", "MULTI_GPU", "MULTI_NPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA", "MULTI_XPU",
                 "MULTI_HPU")  # fmt: skip
# Padding values per collated key when kept rows from different micro-batches are re-padded together.
PAD_VALUES = {"labels": IGNORE_INDEX, "attention_mask": 0}


def check_online_config(
    config: GradSiftConfig, micro_batch_size: int, gradient_accumulation_steps: int, world_size: int = 1
) -> int:
    """Return the number of rows one selection sees (over every data-parallel rank); raise if the rule would keep
    none of them."""
    steps = gradient_accumulation_steps if config.online.window == "step" else 1
    rows = micro_batch_size * steps * world_size
    if config.selection.rule in FRACTION_RULES and fraction_count(config.selection.keep_fraction, rows) < 1:
        ranks = f" × {world_size} processes" if world_size > 1 else ""
        raise UserError(
            f"`selection.keep_fraction` {config.selection.keep_fraction} keeps no row of a selection window of {rows} "
            f"rows (`online.window` {config.online.window!r}: micro_batch_size {micro_batch_size} × {steps}{ranks}). "
            f"Raise keep_fraction to at least {math.ceil(1000 / rows) / 1000:g}, or select over more rows."
        )
    if uses_anchor(config) and not config.scoring.anchor_data:
        raise UserError(
            "`selection.rule: anchor` and `selection.min_anchor_cos` rank rows by their gradient's agreement with an "
            "anchor set: set `scoring.anchor_data` (e.g. embedded:refusals)."
        )
    if config.selection.window is not None:
        raise UserError(
            "`selection.window` does not apply in online mode: the window is the training step or micro-batch "
            "(`online.window`). Remove `selection.window`."
        )
    return rows


@contextlib.contextmanager
def _train_mode(model: torch.nn.Module):
    was_training = model.training
    model.train()
    try:
        yield
    finally:
        model.train(was_training)


class OnlineSelectionMixin:
    """Mix into a `transformers.Trainer` subclass (before it in the bases) to train on selected rows only.

    Set `gradsift_config` (a `GradSiftConfig`) as a class attribute or pass `gradsift_config=` to the constructor.
    """

    gradsift_config: GradSiftConfig | None = None

    def __init__(self, *args: Any, gradsift_config: GradSiftConfig | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if gradsift_config is not None:
            self.gradsift_config = gradsift_config
        if self.gradsift_config is None:
            self.gradsift_config = GradSiftConfig(mode="online")
        if getattr(self.args, "padding_free", False) or getattr(self.args, "packing", False):
            raise UserError("gradsift's online mode scores padded rows: set `packing=False` and `padding_free=False`.")
        window_rows = check_online_config(
            self.gradsift_config,
            self.args.per_device_train_batch_size,
            self.args.gradient_accumulation_steps,
            self.args.world_size,
        )
        # The data-parallel ranks that select together from the step's global batch (alone: a team of one).
        self._gradsift_team = Team(rank=self.args.process_index, world_size=self.args.world_size)
        self.gradsift_stats: list[dict[str, Any]] = []
        self.gradsift_skipped_steps = 0
        self._gradsift_anchor_rows = self._gradsift_load_anchor()
        self._gradsift_anchor: dict[int, torch.Tensor] | None = None
        self._gradsift_anchor_at: tuple[int, int] | None = None  # (step, epoch) the anchor gradient was taken at
        self._gradsift_pending: tuple[dict[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        self._gradsift_pending_tokens = 0
        reason = self._gradsift_no_reuse_reason(window_rows)
        update = self.gradsift_config.online.update
        if update == "reuse" and reason is not None:
            raise UserError(f"`online.update` 'reuse' is not possible here: {reason}. Use 'auto' or 'recompute'.")
        self.gradsift_reuse = update != "recompute" and reason is None
        if self.gradsift_reuse:
            logger.info("gradsift: each step's update reuses the scoring pass's per-sample gradients")
        elif update == "auto":
            logger.info("gradsift: each step recomputes the kept rows' gradients, because %s", reason)

    def _gradsift_load_anchor(self) -> list[Any] | None:
        """The anchor rows, tokenized like the training rows (the trainer's tokenizer and max_length)."""
        config = self.gradsift_config
        if not config.scoring.anchor_data:
            return None
        from gradsift.anchors import anchor_rows

        tokenizer = getattr(self, "processing_class", None) or getattr(self, "tokenizer", None)
        max_length = getattr(self.args, "max_length", None) or config.data.max_length
        return anchor_rows(
            config.scoring.anchor_data, tokenizer, config.data.model_copy(update={"max_length": max_length})
        )

    def _gradsift_anchor_gradient(self, model: Any) -> dict[int, torch.Tensor] | None:
        """ḡ_A with the current model, taken again every `online.anchor_refresh_steps` steps (or each epoch)."""
        if self._gradsift_anchor_rows is None or not uses_anchor(self.gradsift_config):
            return None  # the selection does not read the anchor score: no anchor pass
        step, epoch = int(self.state.global_step), int(self.state.epoch or 0)
        every = self.gradsift_config.online.anchor_refresh_steps
        due = self._gradsift_anchor_at is None or (
            step - self._gradsift_anchor_at[0] >= every if every else epoch != self._gradsift_anchor_at[1]
        )
        if due:
            pad_token_id = self.processing_class.pad_token_id if hasattr(self, "processing_class") else 0
            scoring = self.gradsift_config.scoring.model_copy(update={"method": "batched"})
            self._gradsift_anchor = anchor_gradient(model, self._gradsift_anchor_rows, scoring, pad_token_id)
            self._gradsift_anchor_at = (step, epoch)
        return self._gradsift_anchor

    def _gradsift_no_reuse_reason(self, window_rows: int) -> str | None:
        """Why the scoring pass's per-sample gradients cannot make the update, or None when they can."""
        from accelerate.utils import DistributedType

        args, accelerator = self.args, self.accelerator
        data_parallel = {getattr(DistributedType, name) for name in DATA_PARALLEL if hasattr(DistributedType, name)}
        if accelerator.distributed_type not in data_parallel:
            return f"training runs under {accelerator.distributed_type.value}, which shards the weights across ranks"
        if getattr(accelerator, "scaler", None) is not None:
            return "fp16 loss scaling is on"
        loss_type = getattr(args, "loss_type", "nll")
        if loss_type not in ("nll", "chunked_nll") or args.label_smoothing_factor or self.compute_loss_func:
            return (
                f"the loss is not plain token cross-entropy (loss_type {loss_type!r}, label smoothing or a custom "
                "loss)"
            )
        model = self.accelerator.unwrap_model(self.model)
        if getattr(getattr(model, "config", None), "output_router_logits", False):
            return "the model adds a router auxiliary loss"
        try:
            GradNormHooks(model, keep_grads=True)
        except ValueError as error:
            return str(error).rstrip(".")
        rows = window_rows // max(args.world_size, 1)  # this rank's rows of the window
        size = sum(p.numel() for p in model.parameters() if p.requires_grad) * rows * 4 / 2**30
        limit = self.gradsift_config.online.reuse_max_gb
        if size > limit:
            return f"one window's per-sample gradients take {size:.1f} GiB, over `online.reuse_max_gb` {limit}"
        return None

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
        """Fetch one step's micro-batches, select rows, and return micro-batches holding only the kept rows."""
        while True:
            batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
            if not batches:
                return batches, None
            selected = self._gradsift_select(batches)
            if selected is not None:
                if self.gradsift_reuse:  # no loss is computed: the update is already known
                    return selected, None
                real = [batch for batch in selected if "_gradsift_skip" not in batch]
                return selected, self._get_num_items_in_batch(real, device)
            self.gradsift_skipped_steps += 1
            causes = ", ".join(f"{n} {reason}" for reason, n in sorted(self.gradsift_stats[-1]["dropped"].items()))
            logger.warning(
                "gradsift: a training step had no row to keep: none of its rows could be scored (%s); skipped (%d so "
                "far).",
                causes,
                self.gradsift_skipped_steps,
            )

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        if "_gradsift_reused" in inputs:  # the step's gradient is already known: add it once, report its loss
            if self._gradsift_pending is None:
                return torch.zeros((), device=self.args.device)
            grads, loss = self._gradsift_pending
            self._gradsift_pending = None
            loss = loss.to(self.args.device)
            for param, grad in grads.items():
                if param.grad is None:
                    param.grad = grad.to(param.dtype)
                else:
                    param.grad.add_(grad.to(param.dtype))
            self._gradsift_count_tokens(inputs)
            return loss
        if "_gradsift_skip" in inputs:  # a micro-batch left empty by the selection: nothing to add to the step
            return torch.zeros((), device=self.args.device)
        return super().training_step(model, inputs, num_items_in_batch)

    def _gradsift_count_tokens(self, inputs: dict[str, Any]) -> None:
        """Keep TRL's `num_tokens` metric counting on reused steps (its `compute_loss` does not run)."""
        if hasattr(self, "_total_train_tokens") and hasattr(self, "_metrics"):
            self._total_train_tokens += self._gradsift_pending_tokens
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        return super().floating_point_ops(inputs) if "input_ids" in inputs else 0

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.gradsift_stats and "loss" in logs:
            stats = self.gradsift_stats
            logs["gradsift/kept_fraction"] = float(np.mean([s["kept"] / s["rows"] for s in stats]))
            logs["gradsift/grad_norm_median"] = float(np.mean([s["grad_norm_q50"] for s in stats]))
            logs["gradsift/grad_norm_q10"] = float(np.mean([s["grad_norm_q10"] for s in stats]))
            logs["gradsift/grad_norm_q90"] = float(np.mean([s["grad_norm_q90"] for s in stats]))
            logs["gradsift/loss_filter_drops"] = float(np.sum([s["dropped"].get("loss_outlier", 0) for s in stats]))
            logs["gradsift/skipped_steps"] = float(self.gradsift_skipped_steps)
            self.gradsift_stats = []
        super().log(logs, *args, **kwargs)

    def _gradsift_select(self, batches: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        config = self.gradsift_config
        model = self.accelerator.unwrap_model(self.model)
        anchor = self._gradsift_anchor_gradient(model)
        scored, per_sample = [], []
        # Reuse scores in train mode: the update then is the gradient of the trainer's own forward (dropout too).
        mode = _train_mode(model) if self.gradsift_reuse else scoring_mode(model)
        # The trainer's mixed precision (accelerate wraps the model's forward in autocast; scoring may call the
        # decoder directly), so rows are scored with the numerics they are trained with.
        with (
            mode,
            self.accelerator.autocast(),
            self.compute_loss_context_manager(),
            GradNormHooks(model, config.scoring.norm_method, keep_grads=self.gradsift_reuse, anchor=anchor) as hooks,
        ):
            for batch in batches:
                inputs = {key: batch[key].to(self.args.device) for key in ("input_ids", "attention_mask", "labels")}
                losses, norms = score_batch(model, hooks, inputs)
                scored.append((losses.double().cpu().numpy(), norms.cpu().numpy(), hooks.dots.cpu().numpy()))
                if self.gradsift_reuse:
                    per_sample.append(hooks.take_grads())
        window = gather_window(self._gradsift_team, self._gradsift_local_window(batches, scored, anchor))
        keep = np.zeros(len(window.losses), dtype=bool)
        reasons = np.full(len(window.losses), "", dtype=object)
        for group in window.groups(config.online.window):
            # ⌊ρ·n_ok⌋ of the window's scoreable rows, at least one whenever one scores (the module docstring).
            selection = select_rows(
                window.losses[group],
                window.norms[group],
                window.status[group],
                config.selection,
                num_response_tokens=window.counts[group],
                min_kept=1,
                anchor_dot=None if window.dots is None else window.dots[group],
                anchor_cos=None if window.cosines is None else window.cosines[group],
            )
            keep[group], reasons[group] = selection.keep, selection.reasons
        self._gradsift_check_agreement(keep)
        self._gradsift_record(window, keep, reasons)
        if not keep.any():
            return None  # on every rank: the window is the same everywhere
        mine = keep[window.mine]
        packed = self._gradsift_repack(batches, mine, window.sizes[window.rank])
        if self.gradsift_reuse:
            self._gradsift_prepare_update(hooks, per_sample, window, keep)
            for batch in packed:
                if "_gradsift_skip" not in batch:
                    batch["_gradsift_reused"] = True
            if not mine.any():  # this rank kept no row but the step's update is every rank's: apply it here too
                packed[0] = {"_gradsift_reused": True}
        return packed

    def _gradsift_local_window(self, batches: list[dict[str, Any]], scored: list, anchor: Any) -> Window:
        """This rank's rows: their scores, statuses, anchor columns and content digests."""
        losses = np.concatenate([s[0] for s in scored])
        norms = np.concatenate([s[1] for s in scored])
        counts = np.concatenate([(batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).numpy() for batch in batches])
        status = row_status(counts, losses, norms)
        dots = cosines = None
        if anchor is not None:
            dots, cosines = anchor_scores(np.concatenate([s[2] for s in scored]), norms, status, anchor)
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

    def _gradsift_check_agreement(self, keep: np.ndarray) -> None:
        """With `GRADSIFT_DEBUG` set, assert that every rank kept the same rows (they must, with no broadcast)."""
        team = self._gradsift_team
        if team.world_size > 1 and os.environ.get("GRADSIFT_DEBUG"):
            masks = team.gather(keep.tobytes())
            if any(mask != masks[0] for mask in masks):
                raise RuntimeError("gradsift: the ranks selected different rows from the same window (a bug)")

    def _gradsift_prepare_update(self, hooks, per_sample, window: Window, keep: np.ndarray) -> None:
        """The kept rows' gradient of Σ_kept n_i L_i / Σ_kept n_i over the whole window, from the scoring pass's
        per-sample gradients: each rank weights its own kept rows, one all-reduce sums the ranks' parts."""
        total = window.counts[keep].sum()
        mine = keep[window.mine]
        counts = window.counts[window.mine]
        weights = np.where(mine, counts, 0) / total
        params = {id(p): p for p in hooks.params}
        grads: dict[int, torch.Tensor] = {}
        bounds = np.cumsum([0, *window.sizes[window.rank]])
        for b, batch_grads in enumerate(per_sample):
            rows = np.flatnonzero(mine[bounds[b] : bounds[b + 1]])
            if not len(rows):
                continue  # rows only ever weighted 0 are left out: a non-finite row's gradient may be NaN
            w = torch.as_tensor(weights[bounds[b] + rows], dtype=torch.float32)
            index = torch.as_tensor(rows)
            for key, grad in batch_grads.items():
                contribution = torch.tensordot(w.to(grad.device), grad[index.to(grad.device)], dims=1)
                grads[key] = grads[key] + contribution if key in grads else contribution
        if self._gradsift_team.world_size > 1:  # every rank adds a part, zero where it kept no row
            keys = [id(p) for p in hooks.params]  # the model's order, the same on every rank (ids are not)
            parts = [grads.get(key, torch.zeros_like(params[key], dtype=torch.float32)) for key in keys]
            grads = dict(zip(keys, all_reduce_sum(parts, self._gradsift_team)))
        loss = float(np.sum(np.where(keep, window.losses * window.counts, 0.0)) / total)
        self._gradsift_pending = ({params[key]: grad for key, grad in grads.items()}, torch.tensor(loss))
        self._gradsift_pending_tokens = int(window.tokens[keep].sum())

    def _gradsift_repack(self, batches: list[dict[str, Any]], keep: np.ndarray, sizes: list[int]) -> list[dict]:
        """Micro-batches of the kept rows: in place for `micro_batch`, re-dealt in order for `step`."""
        keys = [key for key, value in batches[0].items() if torch.is_tensor(value) and value.dim() == 2]
        rows = [{key: batch[key][i] for key in keys} for batch in batches for i in range(len(batch["input_ids"]))]
        kept_rows = [row for row, flag in zip(rows, keep) if flag]
        if self.gradsift_config.online.window == "step":
            size = max(sizes)
            chunks = [kept_rows[i : i + size] for i in range(0, len(kept_rows), size)]
        else:
            bounds = np.cumsum([0, *sizes])
            chunks = [[rows[i] for i in range(bounds[b], bounds[b + 1]) if keep[i]] for b in range(len(sizes))]
        empty = self._gradsift_empty(rows[0], keys)
        out = [self._gradsift_collate(chunk, keys) if chunk else empty for chunk in chunks]
        out += [empty] * (len(batches) - len(out))  # the trainer counts micro-batches per step
        return out

    def _gradsift_empty(self, row: dict[str, torch.Tensor], keys: list[str]) -> dict[str, Any]:
        """A micro-batch that adds nothing to the step. Alone it is skipped. Under DDP with `recompute` every rank
        must run as many backward passes as the others (each one all-reduces): one row with no label to learn
        (`labels` all ignored) gives a zero gradient and counts no token."""
        if self._gradsift_team.world_size == 1 or self.gradsift_reuse:
            return {"_gradsift_skip": True}
        batch = self._gradsift_collate([row], keys)
        batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
        return batch

    def _gradsift_collate(self, rows: list[dict[str, torch.Tensor]], keys: list[str]) -> dict[str, torch.Tensor]:
        # Trim to the longest kept row so the update sees the same tensors a trainer given only these rows would.
        width = max(int(row["attention_mask"].sum()) for row in rows)
        pad_id = self.processing_class.pad_token_id if hasattr(self, "processing_class") else 0
        batch = {}
        for key in keys:
            pad = PAD_VALUES.get(key, pad_id if key == "input_ids" else 0)
            tensor = torch.full((len(rows), width), pad, dtype=rows[0][key].dtype)
            for i, row in enumerate(rows):
                length = int(row["attention_mask"].sum())
                tensor[i, :length] = row[key][:length]
            batch[key] = tensor
        return batch

    def _gradsift_record(self, window: Window, keep: np.ndarray, reasons: np.ndarray) -> None:
        """The step's record (the whole window: every rank's rows): counts, norm quantiles, kept and dropped ids."""
        ok = window.status == STATUS_OK
        quantiles = np.quantile(window.norms[ok], [0.1, 0.5, 0.9]) if ok.any() else [float("nan")] * 3
        dropped: dict[str, int] = {}
        for reason in reasons[~keep]:
            dropped[reason] = dropped.get(reason, 0) + 1
        ids = window.sample_ids()
        record = {
            "step": int(self.state.global_step),
            "rows": len(ids),
            "kept": int(keep.sum()),
            "grad_norm_q10": float(quantiles[0]),
            "grad_norm_q50": float(quantiles[1]),
            "grad_norm_q90": float(quantiles[2]),
            "dropped": dropped,
            "kept_ids": [sample_id for sample_id, flag in zip(ids, keep) if flag],
            "dropped_ids": [sample_id for sample_id, flag in zip(ids, keep) if not flag],
        }
        self.gradsift_stats.append(record)
        log_file = self.gradsift_config.online.log_file
        if log_file and self.is_world_process_zero():
            path = os.path.join(self.args.output_dir, log_file)
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(dumps(record) + "\n")  # strict JSON: a window with no ok row has null quantiles
