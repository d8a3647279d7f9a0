"""The trainer internals gradsift's online mode reads or updates (private names of transformers and TRL), and the
marks it leaves in micro-batches, in one place.

Written against transformers 5.16 (`Trainer._get_num_items_in_batch`) and TRL 1.9 (`SFTTrainer._total_train_tokens`,
`SFTTrainer._metrics`), the versions `constraints.txt` pins; axolotl 0.19's trainer is a TRL `SFTTrainer`. The mixin
(`gradsift.online`) overrides public Trainer methods (`get_batch_samples`, `training_step`, `log`,
`floating_point_ops`) and reads public attributes (`args`, `state`, `accelerator`); a new version that renames those
breaks it there.

The marks: `get_batch_samples` returns the step's micro-batches to the trainer's loop, which hands each to
`training_step`; a micro-batch the selection left empty, or one whose gradient the scoring pass already made
(`online.update: reuse`), carries a key saying so. They are the only keys gradsift adds to a trainer's batch dicts.
"""

from __future__ import annotations

from typing import Any

SKIP = "_gradsift_skip"  # a micro-batch with no kept row: it adds nothing to the step
REUSED = "_gradsift_reused"  # the step's update is the scoring pass's: add it once, compute no loss


def skipped() -> dict[str, Any]:
    """A micro-batch that adds nothing to the step."""
    return {SKIP: True}


def is_skipped(batch: dict[str, Any]) -> bool:
    """Whether the micro-batch adds nothing to the step."""
    return SKIP in batch


def mark_reused(batches: list[dict[str, Any]]) -> None:
    """Mark the step's micro-batches as made by the scoring pass (a skipped one stays skipped)."""
    for batch in batches:
        if not is_skipped(batch):
            batch[REUSED] = True


def reused() -> dict[str, Any]:
    """A micro-batch standing for the step's reused update on a rank that kept no row of its own."""
    return {REUSED: True}


def is_reused(batch: dict[str, Any]) -> bool:
    """Whether the micro-batch stands for the scoring pass's update."""
    return REUSED in batch


def num_items_in_batch(trainer: Any, batches: list[dict[str, Any]], device: Any) -> Any:
    """The trainer's count of the step's label tokens over the real micro-batches (gathered across ranks)."""
    return trainer._get_num_items_in_batch([batch for batch in batches if not is_skipped(batch)], device)


def count_tokens(trainer: Any, tokens: int) -> None:
    """Keep TRL's `num_tokens` metric counting on a reused step (its `compute_loss`, which counts them, does not
    run)."""
    if hasattr(trainer, "_total_train_tokens") and hasattr(trainer, "_metrics"):
        trainer._total_train_tokens += tokens
        trainer._metrics["train"]["num_tokens"] = [trainer._total_train_tokens]
