"""lm-eval glue: gradsift's task folder (`--include_path`), the task index, a run on a loaded model, and lm-eval's
logged samples (which tasks the judge reads, the newest samples file per task, the answer of a sample)."""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradsift.errors import UserError
from gradsift.evaluation.judge import harmful_prompt, judge_answer


def evals_path() -> Path:
    """The folder to pass to `lm_eval --include_path`: the repo's `evals/tasks` in a checkout, else the wheel's."""
    here = Path(__file__).resolve().parents[1]  # gradsift/
    for candidate in (here.parents[1] / "evals" / "tasks", here / "evals" / "tasks"):
        if candidate.is_dir():
            return candidate
    raise UserError(f"gradsift's lm-eval tasks were not found beside {here}; reinstall gradsift.")


def task_manager() -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(evals_path()))


def check_task_names(names: Sequence[str], manager: Any | None = None) -> None:
    """Raise with close matches when a task or group name is unknown to lm-eval (with gradsift's tasks included)."""
    manager = manager or task_manager()
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=5, cutoff=0.6)
            hint = f" Close matches: {', '.join(close)}." if close else " `lm_eval ls tasks` lists them all."
            raise UserError(f"Unknown lm-eval task {name!r}.{hint}")


def run_lm_eval(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    output_path: Path,
    *,
    limit: int | float | None = None,
    batch_size: int = 8,
    max_gen_toks: int | None = None,
    seed: int = 0,
    model_name: str = "model",
    manager: Any | None = None,
) -> dict[str, Any]:
    """Evaluate a loaded model on lm-eval tasks; save lm-eval's results JSON and samples under `output_path`.

    The chat template is applied whenever the tokenizer has one (lm-eval's `apply_chat_template` run-time switch).
    Returns lm-eval's results dictionary. `manager`: a `task_manager()` already built (indexing tasks takes a while).
    """
    import lm_eval
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.models.huggingface import HFLM

    manager = manager or task_manager()
    check_task_names(tasks, manager)
    chat = getattr(tokenizer, "chat_template", None) is not None
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=None)
    gen_kwargs = {"max_gen_toks": max_gen_toks} if max_gen_toks else None
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=manager,
        limit=limit,
        apply_chat_template=chat,
        log_samples=True,
        gen_kwargs=gen_kwargs,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    if results is None:  # a non-zero rank under several processes
        return {}
    results["config"]["model_name"] = model_name
    tracker = EvaluationTracker(output_path=str(output_path))
    tracker.general_config_tracker.model_name = model_name
    tracker.general_config_tracker.model_name_sanitized = re.sub(r"[^\w.-]+", "__", model_name)
    samples = results.pop("samples")
    tracker.save_results_aggregated(results=results, samples=samples)
    for task_name in results["configs"]:
        if task_name in samples:
            tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    results["per_doc"] = {task: per_doc_metrics(task_samples) for task, task_samples in samples.items()}
    return results


def per_doc_metrics(samples: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
    """Each numeric metric of lm-eval's logged samples as a list in `doc_id` order, with the `doc_id` list itself.

    A report resamples these (a bootstrap over prompts) without the samples files. NaN marks a document the metric
    does not apply to (over-refusal's safe/unsafe split) and is kept as `None`.
    """
    ordered = sorted(samples, key=lambda sample: sample["doc_id"])
    out: dict[str, list[Any]] = {"doc_id": [int(sample["doc_id"]) for sample in ordered]}
    names = [key for key, value in (ordered[0].items() if ordered else ()) if _is_number(value) and key != "doc_id"]
    for name in names:
        out[name] = [None if math.isnan(float(sample[name])) else float(sample[name]) for sample in ordered]
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def results_table(results: dict[str, Any]) -> str:
    """lm-eval's own markdown table of a results dictionary (groups too)."""
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table


# ----------------------------------------------------------------------------------------------------------------
# The judge command: a guard model over lm-eval's logged samples
# ----------------------------------------------------------------------------------------------------------------

REFUSAL_TASK_PREFIX = "gradsift_refusal_"
OVERREFUSAL_TASK_PREFIX = "gradsift_overrefusal_"
BENIGN_REFUSAL_TASK_PREFIX = "gradsift_benign_refusal_"


def judged_task_kind(task: str) -> str | None:
    """`refusal` for a generated refusal task, `overrefusal` for an over-refusal task, `benign_refusal` for a
    benign-refusal task (ordinary requests; all three judged by `judge_answer`), None for any other task (the
    likelihood probe `gradsift_refusal_mc*` included)."""
    if task.startswith(OVERREFUSAL_TASK_PREFIX):
        return "overrefusal"
    if task.startswith(BENIGN_REFUSAL_TASK_PREFIX):
        return "benign_refusal"
    if task.startswith(REFUSAL_TASK_PREFIX) and not task.startswith("gradsift_refusal_mc"):
        return "refusal"
    return None


def find_samples(results_dir: Path) -> dict[str, Path]:
    """The newest `samples_<task>_<time>.jsonl` per generated refusal task under `results_dir`."""
    if not results_dir.is_dir():
        raise UserError(f"Results folder {str(results_dir)!r} does not exist. Pass the folder of an lm-eval run.")
    found = {task: path for task, path in newest_samples(results_dir).items() if judged_task_kind(task) == "refusal"}
    if not found:
        any_samples = any(results_dir.rglob("samples_*.jsonl"))
        what = "no generated refusal task (gradsift_refusal_*)" if any_samples else "no logged samples"
        raise UserError(
            f"{results_dir} holds {what}. Rerun lm_eval with `--log_samples` (and `--output_path`) on a "
            "gradsift_refusal_* task, or use `gradsift eval`, which always logs samples."
        )
    return found


_SAMPLES_FILE = re.compile(r"samples_(?P<task>.+)_(?P<time>\d{4}-\d{2}-\d{2}T[\d\-.]+)\.jsonl$")


def newest_samples(folder: Path) -> dict[str, Path]:
    """lm-eval's newest `samples_<task>_<time>.jsonl` per task under `folder` (a name without a time is oldest)."""
    found: dict[str, tuple[str, Path]] = {}
    for path in folder.rglob("samples_*.jsonl"):
        match = _SAMPLES_FILE.match(path.name)
        task, time = (match.group("task"), match.group("time")) if match else (path.stem[len("samples_") :], "")
        if task not in found or (time, str(path)) > (found[task][0], str(found[task][1])):
            found[task] = (time, path)
    return {task: path for task, (_, path) in sorted(found.items())}


def sample_answer(sample: dict[str, Any]) -> str:
    """The generated answer of one logged lm-eval sample (after its filter, when it has one)."""
    answer = sample.get("filtered_resps") or sample.get("resps") or [""]
    while isinstance(answer, list):
        answer = answer[0] if answer else ""
    return str(answer)


def read_samples(path: Path) -> list[dict[str, Any]]:
    """(prompt, response, keyword metrics) of each logged sample; `keyword_outcome` is `judge_answer`'s reading."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            sample = json.loads(line)
            response = sample_answer(sample)
            prompt = harmful_prompt(sample["doc"])
            records.append(
                {
                    "doc_id": sample.get("doc_id"),
                    "prompt": prompt,
                    "response": response,
                    "keyword_attack_success": sample.get("attack_success_rate"),
                    "keyword_outcome": judge_answer(response, prompt),
                }
            )
    return records
