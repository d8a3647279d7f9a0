"""The recipe runner: the plan (every stage of every seed and arm, in order) and running it, stage by stage.

For each seed, arm and stage the runner scores the stage's rows with the model as it stands (the previous stage's
adapter), selects, trains the one LoRA adapter further (TRL, or axolotl), evaluates with lm-eval and writes the stage
folder (`gradsift.continual.layout`). Everything is validated, and every error in the file reported with its YAML
path, before any training starts; the run folder is locked for the whole run.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from gradsift import __version__
from gradsift.continual import align_cache, backends
from gradsift.continual.arms import (
    ewc_anchors,
    ewc_end_anchor,
    finished_adapter,
    full_arm_steps,
    full_steps_by,
    kl_trainer_class,
    olora_adapters,
    olora_seed,
    stage_rows,
)
from gradsift.continual.checks import cross_field_problems
from gradsift.continual.evals import drift, eval_model, evaluate, forget_references
from gradsift.continual.fingerprint import (
    EVALUATED_BY,
    MADE_BY,
    Fingerprints,
    check_finished,
    finished_status,
    first_index,
    move_aside,
)
from gradsift.continual.layout import EVAL_NEW, RunLayout, Step, check_run_folder, clean_stage, replaced_dir
from gradsift.continual.penalties import NEW_ADAPTER, penalty_trainer_class
from gradsift.continual.rows import align_records, measures_drift, mixed_records
from gradsift.continual.schema import PENALTY_KINDS, STEPPED_KINDS, Recipe, RecipeError, gradsift_config_for
from gradsift.errors import UserError
from gradsift.fileio import write_json
from gradsift.hardware import describe_device, generation_dtype

logger = logging.getLogger(__name__)


def plan(recipe: Recipe, out: Path, arms: list[str] | None = None, seeds: list[int] | None = None) -> list[Step]:
    """Every stage to run, in order: per seed the align stage, then each arm's task stages.

    Raises `UserError` when `out` is not a folder a run may write into (`check_run_folder`), so a dry run says so too.
    """
    problems = cross_field_problems(recipe)  # `load_recipe` ran them; a `Recipe` built in code has them here
    if problems:
        raise RecipeError(";\n".join(problems))
    check_run_folder(out)
    arms = arms or list(recipe.arms)
    unknown = [arm for arm in arms if arm not in recipe.arms]
    if unknown:
        raise RecipeError(f"--arms {', '.join(unknown)}: not in the recipe's arms ({', '.join(recipe.arms)}).")
    # A `random` arm matches the size its `match` arm (default `gradsift`) kept, so it runs after the select arms; a
    # step-matched arm matches the steps `full` took, so `full` runs first.
    arms = sorted(arms, key=lambda arm: {"full": 0, "random": 2}.get(recipe.arm(arm).kind, 1))
    layout = RunLayout(out)
    seeds = seeds if seeds is not None else recipe.seeds
    unmatched(recipe, layout, arms, seeds)
    steps = []
    for seed in seeds:
        if recipe.align is not None:
            steps.append(Step(seed, None, 0, "align", layout))
        for arm in arms:
            steps += [Step(seed, arm, k, stage.name, layout) for k, stage in enumerate(recipe.stages, start=1)]
    return steps


def unmatched(recipe: Recipe, layout: RunLayout, arms: list[str], seeds: list[int]) -> None:
    """Raise `UserError` when a `random` arm's `match` arm is left out of `arms` and has not finished a stage the
    random arm needs its kept count of."""
    for arm in arms:
        target = recipe.arm(arm).match
        if target is None or target in arms:
            continue
        for seed in seeds:
            for k, stage in enumerate(recipe.stages, start=1):
                if not Step(seed, target, k, stage.name, layout).done():
                    raise UserError(
                        f"arms.{arm}.match: `{target}` (whose kept count sizes this arm) has no finished stage "
                        f"`{stage.name}` at seed {seed}; add `{target}` to --arms or remove `match`"
                    )


def describe_plan(recipe: Recipe, steps: list[Step], rerun_from: str | None = None) -> str:
    """The plan, a line per stage with its status: to run, done, changed (its recipe settings), re-evaluate (its
    evals changed) or, from `rerun_from` on, rerun (moved aside and trained again)."""
    arms = ", ".join(recipe.arms)
    prints = Fingerprints(recipe)
    first = first_index(recipe, rerun_from) if rerun_from is not None else None
    lines = [f"recipe {recipe.name}: model {recipe.model}, {len(recipe.stages)} stage(s), arms {arms}"]
    for step in steps:
        what = f"{step.arm}: {step.stage}"
        if step.arm is None:
            seed = recipe.align_seed(step.seed)
            what = "align (shared by all arms)" if seed == step.seed else f"align (seed {seed}'s, shared by all seeds)"
        if step.arm is not None:
            spec = recipe.arm(step.arm)
            stage = recipe.stages[step.index - 1]
            size = stage.size() or "all"
            mode = spec.mode or recipe.mode
            selection = recipe.selection_for(step.arm)
            floor = f", anchor cos ≥ {selection.min_anchor_cos:g}" if selection.min_anchor_cos is not None else ""
            if selection.max_refusal_logprob is not None:
                floor += f", refusal log-prob ≤ {selection.max_refusal_logprob:g}"
            sized = f", the size {spec.match} kept" if spec.match else ""
            detail = {"select": f"select {selection.rule}{floor} ({mode})", "random": f"random subset{sized}"}
            detail["ewc"] = f"EWC λ {spec.ewc_lambda:g}" + (
                ", anchors after each stage" if spec.ewc_every_stage else ""
            )
            detail["olora"] = f"O-LoRA λ1 {spec.olora_lambda1:g} λ2 {spec.olora_lambda2:g}"
            matched = (spec.steps or recipe.steps) == "full" and spec.kind in STEPPED_KINDS
            matched = ", as many steps as full" if matched else ""
            what += f" [{size} rows, {detail.get(spec.kind, spec.kind)}{matched}]"
        rerun = first is not None and step.index >= first and step.folder.exists()
        status = "rerun" if rerun else finished_status(step, prints)[0]
        lines.append(f"  seed {step.seed}  {what:<60s} {status:11s} {step.folder}")
    return "\n".join(lines)


def run_recipe(
    recipe: Recipe,
    out: Path,
    *,
    arms: list[str] | None = None,
    seeds: list[int] | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    rerun_from: str | None = None,
) -> list[Step]:
    """Run every unfinished stage of the plan in order. `stop_after` ends after that many stages (for tests).

    `out` must be new, empty or a run folder (`check_run_folder`); it is locked for the whole run, so a second
    `gradsift run` on it fails with `UserError` instead of writing the same stages. A finished stage made by other
    settings than the recipe's stops the run (`fingerprint.check_finished`) unless `rerun_from` names it or an
    earlier stage: those stages are moved aside and trained again. A finished stage whose evals changed is evaluated
    again.
    """
    from gradsift.locking import folder_lock

    steps = plan(recipe, out, arms, seeds)
    if rerun_from is not None:
        first_index(recipe, rerun_from)  # a name that is no stage fails before the lock
        if rerun_from == "align" and arms is not None and set(arms) != set(recipe.arms):
            raise UserError(
                f"--rerun-from align --arms {','.join(arms)}: every arm of a seed trains on from its align stage, so "
                "the arms left out would keep stages trained on the old one. Run it without --arms."
            )
    forget_references()
    with folder_lock(out):
        check_run_folder(out)  # again, now that no other run can write it
        finished = check_finished(recipe, steps, rerun_from=rerun_from)  # before anything moves
        if rerun_from is not None:
            for old, new in move_aside(recipe, steps, rerun_from):
                logger.info("gradsift run: --rerun-from %s: moved %s to %s", rerun_from, old, new)
        meta = {
            "gradsift_version": __version__,
            "name": recipe.name,
            "model": recipe.model,
            "stages": [stage.name for stage in recipe.stages],
            "domain_tasks": [stage.domain_task() for stage in recipe.stages],
            "arms": list(recipe.arms),
            "recipe": recipe.model_dump(mode="json"),
        }
        write_json(meta, RunLayout(out).recipe_file)
        ran = 0
        for step in steps:
            if step in finished.reevaluate:
                logger.info("gradsift run: %s is finished; its evals changed, so it is evaluated again", step.folder)
                _reevaluate(recipe, step)
                continue
            if step.done():
                logger.info("gradsift run: %s already finished, skipped", step.folder)
                continue
            if stop_after is not None and ran >= stop_after:
                break
            start = time.perf_counter()
            clean_stage(step.folder)
            if step.arm is None:
                _run_align(recipe, step, progress)
            else:
                _run_stage(recipe, step, steps, progress)
            ran += 1
            logger.info("gradsift run: %s finished in %.0f s", step.folder, time.perf_counter() - start)
    return steps


def _run_align(recipe: Recipe, step: Step, progress: bool) -> None:
    assert recipe.align is not None
    tokenizer = backends.tokenizer(recipe)
    train = recipe.train_for(recipe.align)
    seed = recipe.align_seed(step.seed)
    records = align_records(recipe, seed)
    aligned = step.layout.aligned_model(step.seed)
    cached = recipe.align.cache and align_cache.cache_root() is not None
    key = align_cache.align_key(_align_identity(recipe, train, records, seed)) if cached else None
    training = align_cache.fetch(key, aligned) if key else None
    record: dict[str, Any] = {"stage": "align", "index": 0, "seed": step.seed, "rows": len(records)}
    if seed != step.seed:
        record["align_seed"] = seed
    record.update(_made_by(recipe, step))
    if key:  # `train` then holds the record of the run that trained it, its `seconds` included
        record["cache"] = {"key": key, "reused": training is not None}
    if training is None:
        training = _train_align(recipe, step, seed, train, records, tokenizer, aligned, progress)
        if key:
            align_cache.store(key, aligned, training)
    record["train"] = training
    _finish_stage(recipe, step, tokenizer, record, adapters=[])


def _align_identity(recipe: Recipe, train: Any, records: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    """Everything that makes a seed's aligned model (`align_cache.align_key`)."""
    import platform

    from gradsift.models import model_fingerprint

    where = backends.device(recipe)
    loading = recipe.scoring_config().model_dump(include={"dtype", "quantization", "trust_remote_code"})
    return {
        "model": model_fingerprint(recipe.model, full_weights=True),
        "hardware": {**describe_device(where), "machine": platform.machine()},
        "rows": records,
        "train": backends.train_values(train, None, where),
        "lora": recipe.lora.model_dump(),
        "seed": seed,
        "device": where,
        "loading": loading,
    }


def _train_align(
    recipe: Recipe,
    step: Step,
    seed: int,
    train: Any,
    records: list[dict[str, Any]],
    tokenizer: Any,
    aligned: Path,
    progress: bool,
) -> dict[str, Any]:
    """Train the align stage's LoRA on `records`, merge it into the weights and save them (and the tokenizer) to
    `aligned`; return the training record."""
    from datasets import Dataset
    from trl import SFTTrainer

    model = backends.fresh_lora(recipe, backends.load_base(recipe, recipe.model), seed)
    args = backends.sft_args(recipe, train, None, step.folder, seed, progress)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(records), processing_class=tokenizer)
    training = backends.train(trainer, step.folder)
    merged = model.merge_and_unload()
    merged.save_pretrained(aligned, safe_serialization=True)
    tokenizer.save_pretrained(aligned)
    return training


def _stage_model(recipe: Recipe, step: Step) -> Any:
    """The base (aligned) model with the arm's adapter as the previous stage left it, trainable; for an `olora` arm,
    a new trainable LoRA beside its earlier stages' adapters, frozen."""
    from peft import PeftModel

    from gradsift.continual.penalties import olora_model

    assert step.arm is not None
    base = backends.load_base(recipe, backends.base_model_spec(recipe, step))
    if recipe.arm(step.arm).kind == "olora":
        return olora_model(backends.fresh_lora(recipe, base, olora_seed(step)), olora_adapters(recipe, step))
    if step.index == 1:
        return backends.fresh_lora(recipe, base, step.seed)
    return PeftModel.from_pretrained(base, str(previous_adapter(recipe, step)), is_trainable=True)


def previous_adapter(recipe: Recipe, step: Step) -> Path:
    """The adapter the arm's previous stage wrote, which this stage trains further (`UserError` if it is gone)."""
    return finished_adapter(recipe, step, step.index - 1)


def _run_stage(recipe: Recipe, step: Step, steps: list[Step], progress: bool) -> None:
    from trl import SFTTrainer

    from gradsift.integrations.trl import GradSiftSFTTrainer

    assert step.arm is not None
    stage = recipe.stages[step.index - 1]
    spec = recipe.arm(step.arm)
    train = recipe.train_for(stage)
    tokenizer = backends.tokenizer(recipe)
    made = _made_by(recipe, step)  # before the rows are read: what the stage is made of, as it starts
    records, labels = mixed_records(recipe, stage.data, step.seed)
    model = _stage_model(recipe, step)
    args = backends.sft_args(recipe, train, spec, step.folder, step.seed, progress)
    config = gradsift_config_for(recipe, step.arm, train, step.index)
    record: dict[str, Any] = {"stage": stage.name, "index": step.index, "seed": step.seed, "arm": step.arm, **made}
    record["arm_kind"] = spec.kind
    record["rows"] = len(records)
    online = spec.kind == "select" and config.mode == "online"
    start = time.perf_counter()
    dataset = stage_rows(
        recipe, step, steps, records, labels, model, tokenizer, config, args, record, online, progress
    )
    record["kept"] = len(dataset)
    record["select_seconds"] = backends.elapsed(start)
    if spec.kind in STEPPED_KINDS and not online and (spec.steps or recipe.steps) == "full":
        # As many optimizer steps as `full` took on all rows (its record; the Trainer's count when it has not run):
        # the trainer cycles the kept rows until then.
        args.max_steps = full_steps_by(steps, step) or full_arm_steps(len(records), train)
        record["max_steps"] = args.max_steps
    adapter = RunLayout.adapter(step.folder)
    if recipe.trainer == "axolotl":
        del model
        previous = previous_adapter(recipe, step) if step.index > 1 else None
        record["train"] = backends.train_axolotl(
            recipe, step, train, dataset, config if online else None, spec, record.get("max_steps"), previous
        )
    else:
        if online:
            trainer = GradSiftSFTTrainer(
                model=model, args=args, train_dataset=dataset, processing_class=tokenizer, gradsift_config=config
            )
        elif spec.kind == "kl":
            trainer = kl_trainer_class()(
                model=model, args=args, train_dataset=dataset, processing_class=tokenizer, kl_coef=spec.kl_coef
            )
        elif spec.kind in PENALTY_KINDS:
            penalty = _penalty(recipe, step, model, tokenizer, progress)
            trainer = penalty_trainer_class()(
                model=model, args=args, train_dataset=dataset, processing_class=tokenizer, penalty=penalty
            )
        else:
            trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        start_penalty = _penalty_value(trainer, model)
        record["train"] = backends.train(trainer, step.folder)
        if start_penalty is not None:  # the penalty term at the first and the last step's weights
            record["train"]["penalty"] = {"start": start_penalty, "end": _penalty_value(trainer, model)}
        if spec.kind == "ewc":
            ewc_end_anchor(recipe, step, model, tokenizer, progress)
        model.save_pretrained(adapter, selected_adapters=[NEW_ADAPTER])
        del trainer, model
    if online:
        _count_online(record, RunLayout.online_log(step.folder))
    _finish_stage(recipe, step, tokenizer, record, adapters=_stage_adapters(recipe, step))


def _penalty(recipe: Recipe, step: Step, model: Any, tokenizer: Any, progress: bool) -> Any:
    """The term an `ewc` or `olora` arm's stage adds to the loss, as a function of the model."""
    from gradsift.continual.penalties import ewc_term, olora_penalty

    assert step.arm is not None
    spec = recipe.arm(step.arm)
    if spec.kind == "ewc":
        return ewc_term(ewc_anchors(recipe, step, model, tokenizer, progress), spec.ewc_lambda)
    return lambda m: olora_penalty(m, spec.olora_lambda1, spec.olora_lambda2)


def _penalty_value(trainer: Any, model: Any) -> float | None:
    """The value of a penalty trainer's term at the model's weights (None for other trainers)."""
    import torch

    penalty = getattr(trainer, "penalty", None)
    if penalty is None:
        return None
    with torch.no_grad():
        return float(penalty(model))


def _made_by(recipe: Recipe, step: Step) -> dict[str, Any]:
    """A starting stage's record entries: what makes it (`gradsift.continual.fingerprint`), the machine it trains on
    and its training precision."""
    where = backends.device(recipe)
    bf16 = backends.bf16(recipe.train_for(_stage_of(recipe, step)), where)
    return {
        MADE_BY: Fingerprints(recipe).made_by(step),
        "hardware": describe_device(where),
        "precision": {"bf16": bf16},
    }


def _finish_stage(recipe: Recipe, step: Step, tokenizer: Any, record: dict[str, Any], adapters: list[str]) -> None:
    """Evaluate the stage's model (base + `adapters`), measure drift, and write stage.json (the stage is finished),
    with what evaluated it (`gradsift.continual.fingerprint`)."""
    _measure(recipe, step, tokenizer, record, adapters)
    record[EVALUATED_BY] = Fingerprints(recipe).evaluated_by(step)
    write_json(record, RunLayout.stage_file(step.folder))


def _reevaluate(recipe: Recipe, step: Step) -> None:
    """Evaluate a finished stage again with the recipe's evals, its model untouched: the new eval/ is written beside
    the old one and renamed into place when complete; the old one is moved under `<out>/replaced/`."""
    stage_file = RunLayout.stage_file(step.folder)
    record = json.loads(stage_file.read_text(encoding="utf-8"))
    fresh = step.folder / EVAL_NEW
    shutil.rmtree(fresh, ignore_errors=True)  # what an interrupted re-evaluation left
    _measure(recipe, step, backends.tokenizer(recipe), record, _stage_adapters(recipe, step), into=fresh)
    record[EVALUATED_BY] = Fingerprints(recipe).evaluated_by(step)
    record["evaluated_on"] = describe_device(backends.device(recipe))  # `hardware` stays the training machine
    old = RunLayout.eval_dir(step.folder)
    if old.exists():
        aside = replaced_dir(step.layout.root) / old.relative_to(step.layout.root)
        aside.parent.mkdir(parents=True)
        old.rename(aside)
    if fresh.exists():
        fresh.rename(old)
    write_json(record, stage_file)


def _stage_adapters(recipe: Recipe, step: Step) -> list[str]:
    """The adapters a finished stage is evaluated with: none for the align stage, the stage's own, and before it an
    `olora` arm's earlier stages'."""
    if step.arm is None:
        return []
    earlier = olora_adapters(recipe, step) if recipe.arm(step.arm).kind == "olora" else []
    return [str(path) for path in [*earlier, RunLayout.adapter(step.folder)]]


def _measure(
    recipe: Recipe, step: Step, tokenizer: Any, record: dict[str, Any], adapters: list[str], into: Path | None = None
) -> None:
    """Set the stage's drift, evals (`Recipe.final_evals_at` says which) and generation dtype in `record`."""
    base = backends.base_model_spec(recipe, step)
    spec, tasks = recipe.eval_tasks(step.index)
    needed = bool(tasks) or measures_drift(recipe)
    model = eval_model(recipe, base, adapters) if needed else None  # one load for the drift and the evals
    record.setdefault("precision", {})["generation_dtype"] = generation_dtype(
        spec.generation_dtype, backends.device(recipe)
    )
    record["drift"] = drift(recipe, model, tokenizer, step)  # in the loading dtype: `evaluate` may cast the model
    record["eval"], record["eval_per_doc"] = evaluate(recipe, model, tokenizer, step, into=into)
    del model


def _stage_of(recipe: Recipe, step: Step) -> Any:
    """The recipe's spec of the step's stage: the align spec or the task stage."""
    return recipe.align if step.arm is None else recipe.stages[step.index - 1]


def _count_online(record: dict[str, Any], path: Path) -> None:
    """Set the stage's kept and seen row counts from the online selection log, when there is one."""
    if path.is_file():
        entries = [json.loads(line) for line in path.read_text().splitlines()]
        record["kept"] = int(sum(e["kept"] for e in entries))
        record["online_rows"] = int(sum(e["rows"] for e in entries))
