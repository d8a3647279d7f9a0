"""The paper's online mode (Algorithm 1) as a trainer mixin, shared by TRL's `SFTTrainer` and axolotl's trainer.

For every optimizer step the mixin takes the step's micro-batches as the trainer fetched them, scores every row with
the current model (per-sample loss and gradient norm from the batched hooks: one forward and one backward per
micro-batch, no parameter gradient kept), applies the selection rule across the whole step (`online.window: step`)
or inside each micro-batch (`micro_batch`), and hands the trainer micro-batches that hold only the kept rows. The
trainer then runs its usual forward and backward on them, and its loss is the kept rows' summed response-token
cross-entropy divided by their response-token count (`num_items_in_batch`), as TRL computes it.

With several processes each one selects among its own rows.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import numpy as np
import torch

from gradsift.config import GradSiftConfig
from gradsift.data import IGNORE_INDEX, TokenizedRow, assign_sample_ids
from gradsift.scoring import STATUS_NO_RESPONSE, STATUS_NONFINITE, STATUS_OK, GradNormHooks, score_batch, scoring_mode
from gradsift.selection import select_rows

logger = logging.getLogger(__name__)

# Rule parameters that decide how many rows a selection keeps, for the start-up check.
FRACTION_RULES = ("moderate", "random", "high", "low")
# Padding values per collated key when kept rows from different micro-batches are re-padded together.
PAD_VALUES = {"labels": IGNORE_INDEX, "attention_mask": 0}


def check_online_config(config: GradSiftConfig, micro_batch_size: int, gradient_accumulation_steps: int) -> int:
    """Return the number of rows one selection sees; raise if the rule would keep none of them."""
    rows = micro_batch_size * (gradient_accumulation_steps if config.online.window == "step" else 1)
    if config.selection.rule in FRACTION_RULES and math.floor(round(config.selection.keep_fraction * rows, 6)) < 1:
        raise ValueError(
            f"`selection.keep_fraction` {config.selection.keep_fraction} keeps no row of a selection window of {rows} "
            f"rows (`online.window` {config.online.window!r}: micro_batch_size {micro_batch_size} × "
            f"{gradient_accumulation_steps if config.online.window == 'step' else 1}). Raise keep_fraction to at "
            f"least {1 / rows:.3g}, or select over more rows."
        )
    if config.selection.window is not None:
        raise ValueError(
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
        if getattr(self.args, "padding_free", False) or getattr(self.args, "packing", False):
            raise ValueError(
                "gradsift's online mode scores padded rows: set `packing=False` and `padding_free=False`."
            )
        check_online_config(
            self.gradsift_config, self.args.per_device_train_batch_size, self.args.gradient_accumulation_steps
        )
        self.gradsift_stats: list[dict[str, Any]] = []
        self.gradsift_skipped_steps = 0

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
        """Fetch one step's micro-batches, select rows, and return micro-batches holding only the kept rows."""
        while True:
            batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
            if not batches:
                return batches, None
            selected = self._gradsift_select(batches)
            if selected is not None:
                real = [batch for batch in selected if "_gradsift_skip" not in batch]
                return selected, self._get_num_items_in_batch(real, device)
            self.gradsift_skipped_steps += 1
            logger.warning(
                "gradsift: a training step had no row to keep (no response tokens or non-finite losses); skipped "
                "(%d so far).",
                self.gradsift_skipped_steps,
            )

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        if "_gradsift_skip" in inputs:  # a micro-batch left empty by the selection: nothing to add to the step
            return torch.zeros((), device=self.args.device)
        return super().training_step(model, inputs, num_items_in_batch)

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        return 0 if "_gradsift_skip" in inputs else super().floating_point_ops(inputs)

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
        scored = []
        with scoring_mode(model), GradNormHooks(model, config.scoring.norm_method) as hooks:
            for batch in batches:
                inputs = {key: batch[key].to(self.args.device) for key in ("input_ids", "attention_mask", "labels")}
                losses, norms = score_batch(model, hooks, inputs)
                scored.append((losses.double().cpu().numpy(), norms.cpu().numpy()))
        sizes = [len(batch["input_ids"]) for batch in batches]
        losses = np.concatenate([s[0] for s in scored])
        norms = np.concatenate([s[1] for s in scored])
        counts = np.concatenate([(batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).numpy() for batch in batches])
        status = np.where(counts == 0, STATUS_NO_RESPONSE, STATUS_OK).astype(object)
        status[(status == STATUS_OK) & ~(np.isfinite(losses) & np.isfinite(norms))] = STATUS_NONFINITE
        if config.online.window == "step":
            groups = [np.arange(len(losses))]
        else:
            bounds = np.cumsum([0, *sizes])
            groups = [np.arange(bounds[i], bounds[i + 1]) for i in range(len(sizes))]
        keep = np.zeros(len(losses), dtype=bool)
        reasons = np.full(len(losses), "", dtype=object)
        for group in groups:
            selection = select_rows(
                losses[group], norms[group], status[group], config.selection, num_response_tokens=counts[group]
            )
            keep[group], reasons[group] = selection.keep, selection.reasons
        self._gradsift_record(batches, losses, norms, status, keep, reasons)
        if not keep.any():
            return None
        return self._gradsift_repack(batches, keep, sizes)

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
        out = [self._gradsift_collate(chunk, keys) if chunk else {"_gradsift_skip": True} for chunk in chunks]
        out += [{"_gradsift_skip": True}] * (len(batches) - len(out))  # the trainer counts micro-batches per step
        return out

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

    def _gradsift_record(self, batches, losses, norms, status, keep, reasons) -> None:
        ok = status == STATUS_OK
        rows = [
            TokenizedRow(
                input_ids=b["input_ids"][i][b["attention_mask"][i].bool()].tolist(),
                labels=b["labels"][i][b["attention_mask"][i].bool()].tolist(),
            )
            for b in batches
            for i in range(len(b["input_ids"]))
        ]
        assign_sample_ids(rows)
        quantiles = np.quantile(norms[ok], [0.1, 0.5, 0.9]) if ok.any() else [float("nan")] * 3
        dropped: dict[str, int] = {}
        for reason in reasons[~keep]:
            dropped[reason] = dropped.get(reason, 0) + 1
        record = {
            "step": int(self.state.global_step),
            "rows": len(rows),
            "kept": int(keep.sum()),
            "grad_norm_q10": float(quantiles[0]),
            "grad_norm_q50": float(quantiles[1]),
            "grad_norm_q90": float(quantiles[2]),
            "dropped": dropped,
            "kept_ids": [row.sample_id for row, flag in zip(rows, keep) if flag],
            "dropped_ids": [row.sample_id for row, flag in zip(rows, keep) if not flag],
        }
        self.gradsift_stats.append(record)
        log_file = self.gradsift_config.online.log_file
        if log_file and self.is_world_process_zero():
            path = os.path.join(self.args.output_dir, log_file)
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
