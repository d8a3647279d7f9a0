"""What an arm does beyond the core rule: the `random` arm's matched subset, the step-matched arms' step count,
where select arms cache their scores, and the `kl` arm's trainer."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gradsift.continual.layout import RunLayout, Step
from gradsift.continual.schema import Recipe, TrainSpec


def random_subset(recipe: Recipe, arm: str, rows: int, matched: int | None) -> Any:
    """A `random` arm's selection of `rows` rows: `matched` of them (the `gradsift` arm's count), else its fraction.

    A random subset has no scores, so the recipe's anchor filter (`min_anchor_cos`, meant for the scored arms) is off.
    """
    import numpy as np

    from gradsift.selection import select_rows

    selection = recipe.selection_for(arm).model_copy(update={"min_anchor_cos": None})
    zeros = np.zeros(rows)
    return select_rows(zeros, zeros, np.array(["ok"] * rows, dtype=object), selection, keep_count=matched)


def kept_range(values: Any, keep: Any) -> list[float] | None:
    """[min, max] of a score over the kept rows with a finite value (None if there are none)."""
    import numpy as np

    kept = values[keep]
    kept = kept[np.isfinite(kept)]
    return [float(kept.min()), float(kept.max())] if len(kept) else None


def full_arm_steps(rows: int, train: TrainSpec) -> int:
    """Optimizer steps of a `full` stage over `rows` rows: the Trainer's count for `epochs` passes of its batches."""
    per_epoch = math.ceil(math.ceil(rows / train.batch_size) / train.gradient_accumulation_steps)
    return max(math.ceil(train.epochs * per_epoch), 1)


def scores_cache(step: Step, recipe: Recipe) -> Path:
    """Where a select arm caches its scores.

    Every arm of a seed scores stage 1 with the same model (the seed's aligned weights and a fresh LoRA seeded
    alike) and rows, so they share one cache (`RunLayout.shared_scores`). Later stages score with the arm's own
    adapter, in the stage folder.
    """
    if step.index != 1:
        return RunLayout.scores(step.folder)
    return step.layout.shared_scores(step.seed, step.index, step.stage, aligned=recipe.align is not None)


def finished_beside(steps: list[Step], step: Step) -> Iterator[tuple[str, dict[str, Any]]]:
    """(arm, stage.json) of every arm that finished the same seed and stage."""
    for other in steps:
        if other.seed == step.seed and other.index == step.index and other.arm is not None and other.done():
            yield other.arm, json.loads(RunLayout.stage_file(other.folder).read_text(encoding="utf-8"))


def full_steps_by(steps: list[Step], step: Step) -> int | None:
    """Optimizer steps a `full`-kind arm took at the same seed and stage, if one ran."""
    for _, record in finished_beside(steps, step):
        if record.get("arm_kind") == "full" and record["train"].get("steps") is not None:
            return int(record["train"]["steps"])
    return None


def kept_by(steps: list[Step], step: Step, arm: str) -> int | None:
    """Rows the `arm` arm kept at the same seed and stage, if it ran."""
    return next((int(record["kept"]) for name, record in finished_beside(steps, step) if name == arm), None)


def kl_trainer_class() -> type:
    """`SFTTrainer` with KL(model ‖ aligned model) at response tokens added to the loss (the paper's `kl` arm).

    The aligned model is the same network with the adapter disabled (task stages train one LoRA on the merged
    aligned weights), so no second copy of the model is held.
    """
    import torch
    from trl import SFTTrainer

    from gradsift.evaluation import logprobs_at_responses, token_kl

    class KLSFTTrainer(SFTTrainer):
        def __init__(self, *args: Any, kl_coef: float, **kwargs: Any):
            kwargs["args"].loss_type = "nll"  # the KL needs the logits, which `chunked_nll` does not return
            super().__init__(*args, **kwargs)
            self.kl_coef = kl_coef

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
            with torch.no_grad(), self.accelerator.unwrap_model(model).disable_adapter():
                reference = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
            logp = logprobs_at_responses(outputs.logits, inputs["labels"])
            kl = token_kl(logp, logprobs_at_responses(reference, inputs["labels"])).sum()
            count = num_items_in_batch if num_items_in_batch is not None else logp.shape[0]  # response tokens
            loss = loss + self.kl_coef * kl / count
            return (loss, outputs) if return_outputs else loss

    return KLSFTTrainer
