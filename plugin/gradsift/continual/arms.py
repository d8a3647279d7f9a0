"""What an arm does beyond the core rule: the rows each arm trains on (`stage_rows`), the `random` arm's matched
subset, the step-matched arms' step count, where select arms cache their scores, the `kl` arm's trainer, and the
`ewc` and `olora` arms' anchors and adapters."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gradsift.continual.layout import EWC_END_FILE, EWC_FILE, RunLayout, Step
from gradsift.continual.penalties import Anchor, anchor_here, load_anchors, save_anchors
from gradsift.continual.rows import align_records, mixed_records
from gradsift.continual.schema import Recipe, TrainSpec
from gradsift.errors import UserError
from gradsift.store import DROPPED_FILE, SELECTION_FILE, write_dropped, write_selection

# An `olora` arm's stage k > 1 starts its new LoRA from seed + OLORA_SEED_STRIDE·(k − 1); stage 1 from the seed, as
# every arm's stage 1 does.
OLORA_SEED_STRIDE = 1000


def random_subset(recipe: Recipe, arm: str, rows: int, matched: int | None) -> Any:
    """A `random` arm's selection of `rows` rows: `matched` of them (the count of the arm it matches), else its
    fraction.

    A random subset has no scores, so the recipe's filters (`min_anchor_cos`, `max_refusal_logprob`, meant for the
    scored arms) are off.
    """
    import numpy as np

    from gradsift.selection import select_rows

    selection = recipe.selection_for(arm).model_copy(update={"min_anchor_cos": None, "max_refusal_logprob": None})
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


def kept_by(step: Step, arm: str) -> int | None:
    """Rows the `arm` arm kept at the same seed and stage, if it finished there (in this run or an earlier one)."""
    other = Step(step.seed, arm, step.index, step.stage, step.layout)
    if not other.done():
        return None
    return int(json.loads(RunLayout.stage_file(other.folder).read_text(encoding="utf-8"))["kept"])


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


def stage_folder(recipe: Recipe, step: Step, index: int) -> Path:
    """The folder of the arm's stage `index` (1-based) at the step's seed."""
    assert step.arm is not None
    return step.layout.stage_dir(step.seed, step.arm, index, recipe.stages[index - 1].name)


def _finished(recipe: Recipe, step: Step, index: int, path: Path, what: str, present: bool) -> Path:
    """`path`, which the arm's finished stage `index` wrote, if `present`; else `UserError` saying how to recover."""
    if not present:
        folder = stage_folder(recipe, step, index)
        raise UserError(
            f"{str(path)!r} is missing: it is {what} stage {index} of arm {step.arm!r} (seed {step.seed}) left, which "
            f"{step.stage!r} needs. Restore it, or remove {str(RunLayout.stage_file(folder))!r} so that stage runs "
            "again."
        )
    return path


def finished_adapter(recipe: Recipe, step: Step, index: int) -> Path:
    """The adapter the arm's stage `index` wrote (`UserError` if it is gone)."""
    adapter = RunLayout.adapter(stage_folder(recipe, step, index))
    return _finished(recipe, step, index, adapter, "the adapter", (adapter / "adapter_config.json").is_file())


def olora_adapters(recipe: Recipe, step: Step) -> list[Path]:
    """The adapters an `olora` arm's earlier stages trained, in order (each stage trains one of its own)."""
    return [finished_adapter(recipe, step, index) for index in range(1, step.index)]


def olora_seed(step: Step) -> int:
    """The seed of an `olora` stage's new LoRA: the arm's stage 1 starts as every arm's does."""
    return step.seed + OLORA_SEED_STRIDE * (step.index - 1)


def fisher_sample(records: list[dict[str, Any]], rows: int, seed: int) -> list[dict[str, Any]]:
    """A seeded sample of `rows` records (all of them when there are fewer)."""
    import random

    return random.Random(seed).sample(records, min(rows, len(records)))


def _load(recipe: Recipe, step: Step, index: int, name: str) -> list[Anchor]:
    path = stage_folder(recipe, step, index) / name
    return load_anchors(_finished(recipe, step, index, path, "the EWC anchors", path.is_file()))


def ewc_anchors(recipe: Recipe, step: Step, model: Any, tokenizer: Any, progress: bool) -> list[Anchor]:
    """The anchors an `ewc` arm's stage trains against, written to its folder (`EWC_FILE`) before it trains.

    Stage 1 anchors at the model it starts from (the aligned weights and the seed's fresh LoRA), its Fisher estimated
    now on a sample of the align stage's rows. A later stage reads the previous stage's anchors, and the one that
    stage estimated at its end (`EWC_END_FILE`, with `ewc_every_stage`), from its folder: no finished stage's Fisher
    is estimated again.
    """
    assert step.arm is not None
    spec = recipe.arm(step.arm)
    anchors: list[Anchor] = []
    if step.index == 1 and recipe.align is not None:
        records = fisher_sample(align_records(recipe, recipe.align_seed(step.seed)), spec.fisher_rows, step.seed)
        length = recipe.train_for(recipe.align).max_length
        anchors.append(anchor_here(model, "00-align", records, tokenizer, length, progress))
    elif step.index > 1:
        anchors = _load(recipe, step, step.index - 1, EWC_FILE)
        if spec.ewc_every_stage:
            anchors += _load(recipe, step, step.index - 1, EWC_END_FILE)
    save_anchors(anchors, step.folder / EWC_FILE)
    return anchors


def ewc_end_anchor(recipe: Recipe, step: Step, model: Any, tokenizer: Any, progress: bool) -> None:
    """With `ewc_every_stage`, before a stage but the last finishes: the anchor at its trained weights, its Fisher on
    a sample of its rows, written to its folder (`EWC_END_FILE`) for the next stage."""
    assert step.arm is not None
    spec = recipe.arm(step.arm)
    if not spec.ewc_every_stage or step.index == len(recipe.stages):
        return
    stage = recipe.stages[step.index - 1]
    records = fisher_sample(mixed_records(recipe, stage.data, step.seed)[0], spec.fisher_rows, step.seed)
    length = recipe.train_for(stage).max_length
    save_anchors(
        [anchor_here(model, step.folder.name, records, tokenizer, length, progress)], step.folder / EWC_END_FILE
    )


def stage_rows(
    recipe: Recipe,
    step: Step,
    steps: list[Step],
    records: list[dict[str, Any]],
    labels: list[Any],
    model: Any,
    tokenizer: Any,
    config: Any,
    args: Any,
    record: dict[str, Any],
    online: bool,
    progress: bool,
) -> Any:
    """The rows the stage trains on: the offline selection's kept rows (scores, dropped.jsonl and selection.json
    written, the summary in `record`), a random arm's subset, a `clean` arm's rows of its label, or all rows (online
    arms and the other kinds). Where the rows mix two or more labels (`recipe.label_column`), `record["labels"]`
    counts each label's rows and kept rows (an online arm's kept rows are in its online log: there it counts rows
    only)."""
    import numpy as np
    from datasets import Dataset

    from gradsift.integrations.trl import select_dataset
    from gradsift.store import MANIFEST, TABLE

    assert step.arm is not None
    spec = recipe.arm(step.arm)
    labelled = len({str(label) for label in labels if label is not None}) > 1
    if labelled:
        record["labels"] = label_counts(labels, None if online else np.ones(len(records), dtype=bool))
    if spec.kind == "select" and not online:
        cache = scores_cache(step, recipe)
        kept, report = select_dataset(
            Dataset.from_list(records), model, tokenizer, config, sft_config=args, cache_dir=cache, progress=progress
        )
        scores = RunLayout.scores(step.folder)
        if cache != scores:
            scores.mkdir()
            for name in (TABLE, MANIFEST):  # the finished table and its manifest; not the shards or a lock
                shutil.copy2(cache / name, scores / name)
        column = recipe.label_column

        def describe(index: int) -> dict[str, Any]:
            return {column: labels[index]} if column and labels[index] is not None else {}

        write_dropped(step.folder / DROPPED_FILE, report.table, report.selection, describe)
        extra: dict[str, Any] = {"reused_scores": report.reused_scores}
        if labelled:
            keep = kept_mask(report.table.index, report.selection.keep, len(records))
            record["labels"] = extra["labels"] = label_counts(labels, keep)
            extra["label_column"] = column
        write_selection(step.folder / SELECTION_FILE, report.table, report.selection, config.selection, extra)
        record["selection"] = {
            "summary": report.summary(),
            "dropped": report.selection.counts(),
            "kept_norm_range": kept_range(report.table.grad_norm, report.selection.keep),
            "kept_anchor_cos_range": kept_range(report.table.anchor_cos, report.selection.keep),
        }
        return kept
    if spec.kind == "random":
        target = spec.match or "gradsift"
        matched = kept_by(step, target) if target in recipe.arms and recipe.is_offline_select(target) else None
        if matched is None and spec.match is not None:  # `plan` refuses this before anything trains
            raise UserError(
                f"arms.{step.arm}.match: `{target}` (whose kept count sizes this arm) has no finished stage "
                f"`{step.stage}` at seed {step.seed}; add `{target}` to --arms or remove `match`"
            )
        chosen = random_subset(recipe, step.arm, len(records), matched)
        record["selection"] = {"summary": chosen.summary(), "matched_to": target if matched is not None else None}
        keep = np.asarray(chosen.keep, dtype=bool)
    elif spec.kind == "clean":
        if all(label is None for label in labels):  # nothing known to drop
            record["selection"] = {"summary": "clean: the rows carry no label; kept all"}
            return Dataset.from_list(records)
        keep = np.array([label is not None and str(label) == spec.clean_label for label in labels], dtype=bool)
        if not keep.any():
            found = sorted({str(label) for label in labels})
            raise UserError(
                f"arm `{step.arm}` (clean) trains the rows whose `{recipe.label_column}` is {spec.clean_label!r}; "
                f"stage `{step.stage}` has none (its labels: {', '.join(found)}); set the arm's `clean_label` or the "
                "recipe's `label_column`"
            )
        summary = f"clean: kept {int(keep.sum())}/{len(keep)} rows labelled {spec.clean_label!r}"
        record["selection"] = {"summary": summary}
    else:
        return Dataset.from_list(records)
    if labelled:
        record["labels"] = label_counts(labels, keep)
    return Dataset.from_list([records[i] for i in np.flatnonzero(keep)])


def kept_mask(index: Any, keep: Any, rows: int) -> Any:
    """A selection's keep mask over the stage's rows: `keep` is over the score table's positions, whose dataset
    rows `index` names."""
    import numpy as np

    mask = np.zeros(rows, dtype=bool)
    mask[np.asarray(index)[np.asarray(keep, dtype=bool)]] = True
    return mask


def label_counts(labels: list[Any], keep: Any) -> dict[str, dict[str, int]]:
    """{label: {"rows": n, "kept": k}} of the labelled rows (`kept` only where `keep`, a mask over them, is known)."""
    counts: dict[str, dict[str, int]] = {}
    for index, label in enumerate(labels):
        if label is None:
            continue
        entry = counts.setdefault(str(label), {"rows": 0} if keep is None else {"rows": 0, "kept": 0})
        entry["rows"] += 1
        if keep is not None:
            entry["kept"] += int(bool(keep[index]))
    return dict(sorted(counts.items()))
