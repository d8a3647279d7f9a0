"""The paper's online mode (Algorithm 1) as a trainer mixin, shared by TRL's `SFTTrainer` and axolotl's trainer.

The mixin is the glue: it fetches each step's micro-batches, hands them to `gradsift.online_step.OnlineStep` (score
the window, gather it, select, update by reuse or recompute: Algorithm 1's steps) and returns what that step kept.
Every trainer internal it touches, and the marks it leaves in micro-batches, are in `gradsift.online_trainer`.

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

import logging
import math
import os
from typing import Any

import numpy as np
import torch

from gradsift.anchors import uses_anchor
from gradsift.config import GradSiftConfig
from gradsift.distributed import Team
from gradsift.errors import UserError
from gradsift.fileio import dumps
from gradsift.hardware import warn_slow_bf16
from gradsift.hooks import GradNormHooks
from gradsift.online_step import OnlineStep, Outcome, Update
from gradsift.online_trainer import count_tokens, is_reused, is_skipped, num_items_in_batch
from gradsift.scoring import anchor_gradient
from gradsift.selection import FRACTION_RULES, fraction_count

logger = logging.getLogger(__name__)

# accelerate's kinds of plain data parallelism (every rank holds the whole model), where `reuse` all-reduces the
# kept rows' gradients itself; FSDP, DeepSpeed and the like keep `recompute`.
DATA_PARALLEL = ("NO", "MULTI_CPU", "MULTI_GPU", "MULTI_NPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA", "MULTI_XPU",
                 "MULTI_HPU")  # fmt: skip


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
    if config.selection.max_refusal_logprob is not None:
        raise UserError(
            "`selection.max_refusal_logprob` reads the refusal probe of offline scoring, which the online mode does "
            "not run; filter the data first (`gradsift score` with --refusal-probe, then `gradsift select`), or "
            "remove it."
        )
    if config.selection.window is not None:
        raise UserError(
            "`selection.window` does not apply in online mode: the window is the training step or micro-batch "
            "(`online.window`). Remove `selection.window`."
        )
    return rows


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
        warn_slow_bf16(
            getattr(self.args, "bf16", False), self.args.device, "The trainer's `bf16=True` (TRL's default)"
        )
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
        self._gradsift_pending: Update | None = None  # a reused step's update, added by its first micro-batch
        reason = self._gradsift_no_reuse_reason(window_rows)
        update = self.gradsift_config.online.update
        if update == "reuse" and reason is not None:
            raise UserError(f"`online.update` 'reuse' is not possible here: {reason}. Use 'auto' or 'recompute'.")
        self.gradsift_reuse = update != "recompute" and reason is None
        if self.gradsift_reuse:
            logger.info("gradsift: each step's update reuses the scoring pass's per-sample gradients")
        elif update == "auto":
            logger.info("gradsift: each step recomputes the kept rows' gradients, because %s", reason)
        # The tokenizer's pad id pads the re-collated kept rows and the anchor rows (0 without a tokenizer).
        tokenizer = getattr(self, "processing_class", None)
        pad_token_id = tokenizer.pad_token_id if tokenizer is not None else 0
        self._gradsift_step = OnlineStep(self.gradsift_config, self._gradsift_team, self.gradsift_reuse, pad_token_id)

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
            scoring = self.gradsift_config.scoring.model_copy(update={"method": "batched"})
            pad_token_id = self._gradsift_step.pad_token_id
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
        """Fetch one step's micro-batches, select rows (`OnlineStep`), and return micro-batches holding only the kept
        rows; a step whose window has no scoreable row is skipped and the next one fetched."""
        while True:
            batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
            if not batches:
                return batches, None
            outcome = self._gradsift_select(batches)
            if outcome.batches is not None:
                self._gradsift_pending = outcome.update
                if self.gradsift_reuse:  # no loss is computed: the update is already known
                    return outcome.batches, None
                return outcome.batches, num_items_in_batch(self, outcome.batches, device)
            self.gradsift_skipped_steps += 1
            causes = ", ".join(f"{n} {reason}" for reason, n in sorted(outcome.record["dropped"].items()))
            logger.warning(
                "gradsift: a training step had no row to keep: none of its rows could be scored (%s); skipped (%d so "
                "far).",
                causes,
                self.gradsift_skipped_steps,
            )

    def _gradsift_select(self, batches: list[dict[str, Any]]) -> Outcome:
        model = self.accelerator.unwrap_model(self.model)
        contexts = lambda: (self.accelerator.autocast(), self.compute_loss_context_manager())  # noqa: E731
        step = int(self.state.global_step)
        anchor = self._gradsift_anchor_gradient(model)
        outcome = self._gradsift_step(model, batches, anchor, self.args.device, contexts, step)
        self._gradsift_write(outcome.record)
        return outcome

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        if is_reused(inputs):  # the step's gradient is already known: add it once, report its loss
            if self._gradsift_pending is None:
                return torch.zeros((), device=self.args.device)
            update, self._gradsift_pending = self._gradsift_pending, None
            for param, grad in update.grads.items():
                if param.grad is None:
                    param.grad = grad.to(param.dtype)
                else:
                    param.grad.add_(grad.to(param.dtype))
            count_tokens(self, update.tokens)
            return update.loss.to(self.args.device)
        if is_skipped(inputs):  # a micro-batch left empty by the selection: nothing to add to the step
            return torch.zeros((), device=self.args.device)
        return super().training_step(model, inputs, num_items_in_batch)

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

    def _gradsift_write(self, record: dict[str, Any]) -> None:
        """Keep the step's record for the next log line, and append it to `online.log_file` (rank 0)."""
        self.gradsift_stats.append(record)
        log_file = self.gradsift_config.online.log_file
        if log_file and self.is_world_process_zero():
            path = os.path.join(self.args.output_dir, log_file)
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(dumps(record) + "\n")  # strict JSON: a window with no ok row has null quantiles
