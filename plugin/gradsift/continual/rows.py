"""A recipe stage's rows: where its data path points, how its rows are read, templated, shuffled and cut, and which
align rows the drift measure asks."""

from __future__ import annotations

import string
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradsift.continual.paths import resolve_path
from gradsift.errors import UserError
from gradsift.packaged import is_packaged

if TYPE_CHECKING:
    from gradsift.continual.schema import DataSpec, Recipe


def stage_records(recipe: Recipe, spec: DataSpec, seed: int) -> list[dict[str, Any]]:
    """The rows of a stage (or the align set), as single-turn prompt/completion conversations where possible."""
    return [as_prompt_completion(row) for row in source_rows(recipe, spec, seed)]


def mixed_records(recipe: Recipe, specs: list[DataSpec], seed: int) -> tuple[list[dict[str, Any]], list[Any]]:
    """A task stage's rows (`stage_records` of each source; a mix of several shuffled together by `seed`, so that a
    few rows of one source spread over the batches) and each row's label: its `recipe.label_column` value, None
    where it has none. The labels stay beside the rows, never in what is trained."""
    import random

    rows = [row for spec in specs for row in source_rows(recipe, spec, seed, recipe.label_column)]
    if len(specs) > 1:
        random.Random(seed).shuffle(rows)
    column = recipe.label_column
    labels = [row.get(column) if column else None for row in rows]
    return [as_prompt_completion(row) for row in rows], labels


def align_records(recipe: Recipe, seed: int) -> list[dict[str, Any]]:
    """The align stage's rows at `seed`: each source's `stage_records`, in the recipe's order."""
    assert recipe.align is not None
    return [row for spec in recipe.align.data for row in stage_records(recipe, spec, seed)]


def measures_drift(recipe: Recipe) -> bool:
    """Whether stages measure the KL drift: `drift_prompts` > 0 and an align set to take them from."""
    return recipe.drift_prompts > 0 and recipe.align is not None


def drift_records(recipe: Recipe) -> list[dict[str, Any]]:
    """The fixed prompts of the drift measure: the first `drift_prompts` benign rows of the align set (seed 0), its
    sources in the recipe's order.

    A row is benign when its `kind` says so (`recipes/data/align.jsonl` marks every row `harmful` or `benign`); a
    row without `kind` is benign unless its answer is a refusal. Harmful prompts are left out: the drift measures
    how far the answers to ordinary requests moved, which a refusal's shift would confound.
    """
    if not measures_drift(recipe):
        return []
    assert recipe.align is not None
    rows = [row for spec in recipe.align.data for row in source_rows(recipe, spec, 0) if _benign(row)]
    return [as_prompt_completion(row) for row in rows[: recipe.drift_prompts]]


def _benign(row: dict[str, Any]) -> bool:
    from gradsift.evaluation import judge_answer

    if row.get("kind") is not None:
        return row["kind"] == "benign"
    record = as_prompt_completion(row)
    answer = record.get("completion", record.get("output", ""))
    prompt = record.get("prompt", record.get("instruction", ""))
    return judge_answer(_text(answer), _text(prompt) or None) != "refused"


def _text(value: Any) -> str:
    """The text of a plain string or of a conversation's last turn."""
    if isinstance(value, list):
        value = value[-1].get("content", "") if value and isinstance(value[-1], dict) else ""
    return value if isinstance(value, str) else ""


def source_rows(recipe: Recipe, spec: DataSpec, seed: int, label: str | None = None) -> list[dict[str, Any]]:
    """A stage's rows as read (templates applied, a templated row keeping its `label` column), shuffled by `seed`,
    the first `offset` passed over and cut to `size`."""
    import random

    from gradsift.data import load_source
    from gradsift.synthetic import generate

    if spec.synthetic is not None:
        return generate(spec.synthetic, spec.size, split="train", seed=seed)
    assert spec.path is not None
    resolved = resolve_path(spec.path, recipe.base_dir)
    if isinstance(resolved, Path) or is_packaged(resolved):
        rows = list(load_source(str(resolved), split=spec.split).records)
    else:
        import datasets

        rows = list(datasets.load_dataset(resolved, spec.name, split=spec.split))
    random.Random(seed).shuffle(rows)
    if spec.offset and spec.offset >= len(rows):
        raise UserError(
            f"data `{spec.path}` (split {spec.split!r}) has {len(rows)} rows and `offset` is {spec.offset}: no row "
            "is left to take; lower `offset`"
        )
    rows = rows[spec.offset :]
    rows = rows[: spec.size] if spec.size else rows
    if spec.prompt_template is not None:
        rows = [{**templated(row, spec), **({label: row[label]} if label and label in row else {})} for row in rows]
    return rows


class _Formatter(string.Formatter):
    """`str.format` with two conversions: `!L` (0 → A, 1 → B, …) and `!F` (a list's first item, or "")."""

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        if conversion == "L":
            return "ABCDEFGHIJ"[int(value)]
        if conversion == "F":
            return value[0] if len(value) else ""
        return super().convert_field(value, conversion)


def templated(row: dict[str, Any], spec: DataSpec) -> dict[str, Any]:
    """A chat prompt/completion row built from a row's columns with the stage's templates."""
    assert spec.prompt_template is not None and spec.completion_template is not None
    formatter = _Formatter()
    try:
        prompt = formatter.format(spec.prompt_template, **row)
        completion = formatter.format(spec.completion_template, **row)
    except (KeyError, IndexError, ValueError, TypeError, AttributeError) as error:
        raise UserError(
            f"data template cannot be filled from a row with columns {sorted(row)}: {error!r}; fix "
            "`prompt_template` / `completion_template`"
        ) from None
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]}


def as_prompt_completion(row: dict[str, Any]) -> dict[str, Any]:
    """A one-turn `messages` row becomes TRL's conversational prompt/completion, so the loss is on the answer."""
    messages = row.get("messages")
    if isinstance(messages, list) and len(messages) >= 2 and messages[-1].get("role") == "assistant":
        return {"prompt": messages[:-1], "completion": messages[-1:]}
    return {k: v for k, v in row.items() if k in ("prompt", "completion", "instruction", "input", "output")}
