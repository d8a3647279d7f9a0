"""What a recipe measures after each stage: the lm-eval tasks (refusal, over-refusal, the domain tasks), the KL drift
to the pretrained and aligned models, and `--rejudge`, which labels the logged answers again."""

from __future__ import annotations

import collections
import functools
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradsift.config import DataConfig
from gradsift.continual.backends import device
from gradsift.continual.layout import RunLayout, Step, run_metadata
from gradsift.continual.rows import drift_records, measures_drift
from gradsift.continual.schema import Recipe, RecipeError
from gradsift.fileio import write_json
from gradsift.hardware import generation_dtype

logger = logging.getLogger(__name__)


def evaluate(
    recipe: Recipe, model: Any, tokenizer: Any, step: Step, into: Path | None = None
) -> tuple[dict[str, dict[str, float | None]], dict[str, dict[str, list]]]:
    """Run the stage's evals on the model (`eval_model`: the adapter merged into a fresh copy); lm-eval's results
    and samples go to `into` (default: the stage's `eval/`).

    Returns {task: {metric: value}} and, for the report's per-prompt bootstrap, {task: {metric: [value per doc]}}
    (with the `doc_id` list) of the generated refusal, over-refusal and benign-refusal tasks.
    """
    from gradsift.evaluation import judged_task_kind, run_lm_eval

    spec, tasks = recipe.eval_tasks(step.index)
    if not tasks:
        return {}, {}
    model = generation_model(model, generation_dtype(spec.generation_dtype, device(recipe)))
    runs = [(tasks, spec.limit, spec.max_gen_toks)]
    if spec.domain_apart():  # the domain tasks in a run of their own, with their own limit and answer length
        domain = [stage.domain_task() for stage in recipe.stages]
        runs = [([t for t in tasks if t not in domain], spec.limit, spec.max_gen_toks)]
        runs.append(([t for t in tasks if t in domain], spec.domain_docs(), spec.domain_max_gen_toks))
    metrics: dict[str, dict[str, float | None]] = {}
    per_doc: dict[str, dict[str, list]] = {}
    for names, limit, max_gen_toks in (run for run in runs if run[0]):
        results = run_lm_eval(
            model,
            tokenizer,
            names,
            into or RunLayout.eval_dir(step.folder),
            limit=limit,
            batch_size=spec.batch_size,
            max_gen_toks=max_gen_toks,
            seed=spec.seed if spec.seed is not None else step.seed,
            model_name=f"{recipe.name}/seed-{step.seed}/{step.arm or 'align'}/{step.index:02d}-{step.stage}",
            manager=_task_manager(),
        )
        for task, values in results.get("results", {}).items():
            for key, value in values.items():
                if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                    continue
                metrics.setdefault(task, {})[key.split(",")[0]] = finite(float(value))
        for task, values in results.get("per_doc", {}).items():
            if judged_task_kind(task) is not None:
                per_doc[task] = values
    return metrics, per_doc


def generation_model(model: Any, dtype: str | None) -> Any:
    """`model` cast in place to `dtype` for generating answers (`evals.*.generation_dtype`). A quantized model, whose
    weights cannot be cast, keeps its compute dtype (a warning, once, when that is not `dtype`)."""
    if dtype is None:
        return model
    import torch

    from gradsift.models import model_quantization

    target = getattr(torch, dtype)
    quantization = model_quantization(model)
    if quantization == "none":
        return model.to(target)
    if model.dtype != target:
        _warn_kept_dtype(quantization, str(model.dtype).removeprefix("torch."), dtype)
    return model


@functools.cache
def _warn_kept_dtype(quantization: str, kept: str, asked: str) -> None:
    logger.warning(
        "gradsift run: the evaluated model is quantized (%s); its answers are generated in its compute dtype %s, "
        "not `generation_dtype` %s",
        quantization,
        kept,
        asked,
    )


@functools.cache
def _task_manager() -> Any:
    """lm-eval's task index, built once per run: indexing every task takes seconds, and a run evaluates often."""
    from gradsift.evaluation import task_manager

    return task_manager()


def eval_model(recipe: Recipe, base: str, adapters: Sequence[str]) -> Any:
    """`base` with the stage's adapters applied: one, an `olora` arm's every stage so far, or none (align)."""
    from gradsift.models import load_for_eval

    config = recipe.scoring_config().model_copy(update={"model": base, "adapter": None})
    return load_for_eval(config, merge=True, adapters=adapters)


def drift(recipe: Recipe, model: Any, tokenizer: Any, step: Step) -> dict[str, float | None]:
    """Mean per-token KL(p_model ‖ p_reference) on the align set's first benign answers (fixed prompts), against the
    pretrained model and (for a task stage) the seed's aligned model."""
    if not measures_drift(recipe):
        return {}
    import torch

    from gradsift.evaluation import response_logprobs, token_kl
    from gradsift.tokenization import collate, tokenize_records

    records = drift_records(recipe)
    if not records:
        logger.warning("gradsift run: the align set has no benign row (`kind: benign`); no drift measured")
        return {}
    rows = tokenize_records(records, tokenizer, DataConfig(max_length=256), progress=False)
    batch = collate(rows, tokenizer.pad_token_id, device(recipe))
    references = {"pretrained": recipe.reference_model or recipe.model}
    if step.arm:
        references["aligned"] = str(step.layout.aligned_model(step.seed))
    out = {}
    with torch.no_grad():
        logp = response_logprobs(model, batch)
        for name, spec in references.items():
            reference = _reference_logprobs(recipe, spec, batch).to(logp.device)
            out[name] = finite(float(token_kl(logp, reference).mean()))
    return out


# The reference models' log-probs on the drift prompts, on the CPU: the same for every stage of a seed, so kept for the
# two references used last (the pretrained model and the seed's aligned one) when under 1 GiB each. Keyed by how the
# model is loaded and by its files' fingerprint, and emptied when a run starts.
_REFERENCES: collections.OrderedDict[tuple[str, ...], Any] = collections.OrderedDict()
_REFERENCE_BYTES = 2**30


def forget_references() -> None:
    """Empty the reference log-probs kept by earlier runs in this process (a reference may have been trained again)."""
    _REFERENCES.clear()


def _reference_logprobs(recipe: Recipe, spec: str, batch: dict[str, Any]) -> Any:
    import hashlib

    import torch

    from gradsift.evaluation import response_logprobs
    from gradsift.models import model_fingerprint

    loading = recipe.scoring_config()
    tokens = hashlib.sha256(batch["input_ids"].cpu().numpy().tobytes() + bytes(str(batch["input_ids"].shape), "ascii"))
    key = (
        spec,
        json.dumps(model_fingerprint(spec), sort_keys=True),
        *(str(getattr(loading, name)) for name in ("device", "dtype", "quantization", "trust_remote_code")),
        tokens.hexdigest(),
    )
    if key in _REFERENCES:
        _REFERENCES.move_to_end(key)
        return _REFERENCES[key]
    reference = eval_model(recipe, spec, [])
    with torch.no_grad():
        logp = response_logprobs(reference, batch)
    del reference
    if logp.numel() * logp.element_size() <= _REFERENCE_BYTES:
        _REFERENCES[key] = logp.cpu()
        while len(_REFERENCES) > 2:
            _REFERENCES.popitem(last=False)
    return logp


def rejudge_run(run_dir: Path) -> int:
    """Judge the logged answers of every finished stage's refusal, over-refusal and benign-refusal tasks again; return
    the count.

    Each stage keeps lm-eval's samples (prompt and answer per document) under `eval/`. The judge's metrics of those
    tasks, and their per-document values, are recomputed from them with the judge as it is now and written back to
    the stage's `stage.json`, so a run's numbers follow a judge fix without generating any answer again.
    """
    from gradsift.locking import folder_lock

    if run_metadata(run_dir) is None:
        raise RecipeError(
            f"{str(run_dir)!r} is not a folder written by `gradsift run` (it has no recipe.json); --rejudge rewrites "
            "the stage.json files of such a folder only. Pass the run's --out folder."
        )
    with folder_lock(run_dir):  # not while a run writes its stages
        return _rejudge(run_dir)


def _rejudge(run_dir: Path) -> int:
    from gradsift.evaluation import (
        benign_refusal_metrics,
        judged_task_kind,
        newest_samples,
        overrefusal_metrics,
        per_doc_metrics,
        refusal_metrics,
        sample_answer,
    )

    judges = {"refusal": refusal_metrics, "overrefusal": overrefusal_metrics, "benign_refusal": benign_refusal_metrics}
    rewritten = 0
    for _, _, _, stage_dir in RunLayout(run_dir).finished_stages():
        marker = RunLayout.stage_file(stage_dir)
        record = json.loads(marker.read_text(encoding="utf-8"))
        judged = False
        for task, path in newest_samples(RunLayout.eval_dir(stage_dir)).items():
            judge = judges.get(judged_task_kind(task))
            if judge is None:
                continue
            samples = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            by_doc = {s["doc_id"]: s for s in samples}  # one answer per document (one filter per task)
            if not by_doc:
                logger.warning("gradsift report: %s holds no answers; %s of %s left as it was", path, task, marker)
                continue
            scored = [{"doc_id": d, **judge(s["doc"], [sample_answer(s)])} for d, s in by_doc.items()]
            per_doc = per_doc_metrics(scored)
            record.setdefault("eval", {})[task] = {
                name: _mean(values) for name, values in per_doc.items() if name != "doc_id"
            }
            record.setdefault("eval_per_doc", {})[task] = per_doc
            judged = True
        if judged:
            write_json(record, marker)
            rewritten += 1
    return rewritten


def _mean(values: list[float | None]) -> float | None:
    """The mean over the documents a metric applies to (None marks the others, e.g. over-refusal's unsafe prompts)."""
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def finite(value: float | None) -> float | None:
    """None for NaN and ±inf (no strict JSON can hold them)."""
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else value
