"""Reading a recipe file: every schema, cross-field, data and lm-eval task problem collected, each with its YAML
path, before anything loads or trains."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from gradsift.continual.checks import cross_field_problems, data_specs
from gradsift.continual.paths import resolve_path
from gradsift.continual.rows import templated
from gradsift.continual.schema import DataSpec, Recipe, RecipeError, arm_dict, error_lines
from gradsift.errors import UserError
from gradsift.packaged import is_packaged
from gradsift.synthetic import TASKS as SYNTHETIC_TASKS


def load_recipe(path: str | os.PathLike, *, check_tasks: bool = True, check_data: bool = True) -> Recipe:
    """Read and validate a recipe; raise `RecipeError` listing every problem with its YAML path.

    Schema, cross-field, data (`check_data`: local files read, every row's columns checked, synthetic sizes) and
    lm-eval task (`check_tasks`) problems are all collected before anything is raised; nothing is downloaded.
    """
    path = Path(path)
    if path.is_dir():
        raise RecipeError(
            f"Recipe {str(path)!r} is a folder; pass a recipe's YAML file, e.g. {str(path / 'x.yaml')!r}."
        )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"Recipe file {str(path)!r} does not exist.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(f"Cannot read the recipe file {str(path)!r}: {error}.") from None
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        kind = type(raw).__name__
        raise RecipeError(f"{path}: a recipe is a mapping with `name`, `model`, `stages`, …; got {kind}.")
    recipe, problems = _validate(raw)
    if recipe is not None:
        recipe.read_from(path.parent)
        if check_data:
            problems += _check_data(recipe, path.parent)
        if check_tasks:
            problems += _check_tasks(recipe)
    if problems:
        raise RecipeError(f"{path}:\n" + ";\n".join(f"  {p.rstrip('.')}" for p in problems))
    return recipe


def _validate(raw: dict[str, Any]) -> tuple[Recipe | None, list[str]]:
    """The recipe, and its schema and cross-field problems.

    A part that fails its schema (a stage, an arm, an `evals` entry, any other top-level key) is replaced by a stand-in
    and the rest validated again, so that one mistake does not hide the problems of the parts that are right. The
    returned recipe then holds stand-ins: use it for checks only. It is None when even the stand-ins do not validate.
    """
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as error:
        problems = error_lines(error, raw=raw)
        standing, invalid, failed = _stand_ins(raw, error)
        try:
            recipe = Recipe.model_validate(standing)
        except ValidationError:
            return None, problems
        recipe.mark_stand_ins(invalid)
    else:
        problems, failed = [], frozenset()
    return recipe, problems + cross_field_problems(recipe, failed)


def _stand_ins(raw: dict[str, Any], error: ValidationError) -> tuple[dict[str, Any], frozenset[int], frozenset[str]]:
    """A copy of `raw` with every part in `error` replaced: (copy, indices of replaced stages, top-level keys hit)."""
    out = copy.deepcopy(raw)
    if "arms" in out:
        out["arms"] = arm_dict(out["arms"])
    invalid: set[int] = set()
    failed: set[str] = set()
    for item in error.errors():
        loc = item["loc"]
        if not loc:
            continue
        key, part = loc[0], loc[1] if len(loc) > 1 else None
        failed.add(str(key))
        stages, arms, evals = out.get("stages"), out.get("arms"), out.get("evals")
        if key == "stages" and isinstance(part, int) and isinstance(stages, list) and part < len(stages):
            stages[part] = {"name": f"stage-{part}", "data": {"synthetic": SYNTHETIC_TASKS[0]}}
            invalid.add(part)
        elif key == "stages":
            out["stages"] = [{"name": "stage-0", "data": {"synthetic": SYNTHETIC_TASKS[0]}}]
            invalid = {0}
        elif key == "arms" and isinstance(arms, dict) and part in arms:
            if "[key]" in loc:  # not a string
                del arms[part]
            else:
                arms[part] = {"kind": "full"}
        elif key == "evals" and isinstance(evals, dict) and part in evals:
            del evals[part]
        elif key in ("name", "model"):
            out[key] = "recipe"
        else:
            out.pop(key, None)
    return out, frozenset(invalid), frozenset(failed)


def _check_data(recipe: Recipe, base: Path) -> list[str]:
    from gradsift.data import load_source
    from gradsift.synthetic import pool

    problems = []
    anchor = recipe.scoring.anchor_data
    if anchor and not is_packaged(anchor):
        try:
            resolve_path(anchor, base)
        except UserError as error:
            problems.append(f"scoring.anchor_data: {error}")
    for where, spec in data_specs(recipe):
        if spec.synthetic is not None:
            available = len(pool(spec.synthetic, "train"))
            if spec.size is not None and spec.size > available:
                problems.append(
                    f"{where}.size: synthetic task {spec.synthetic!r} has {available} train questions; {spec.size} "
                    f"were asked for. Set `size` to at most {available}"
                )
            continue
        try:
            resolved = resolve_path(spec.path, base)
            if not isinstance(resolved, Path) and not is_packaged(resolved):
                continue  # a hub id: read (and its format checked) when its stage starts; a dry run downloads nothing
            records = load_source(str(resolved), split=spec.split).records
            problem = _rows_problem(records, spec)
        except UserError as error:
            problem = str(error)
        except OSError as error:
            problem = f"{spec.path!r} cannot be read: {error.strerror or error}"
        if problem:
            problems.append(f"{where}.path: {problem}")
        elif spec.offset:
            problems += _offset_problems(where, spec, len(records))
    return problems


def _offset_problems(where: str, spec: DataSpec, rows: int) -> list[str]:
    """An `offset` that leaves no row, or fewer than `size`, of a source of `rows` rows."""
    source = f"`{spec.path}` (split {spec.split!r}) has {rows} rows"
    if spec.offset >= rows:
        return [f"{where}.offset: got {spec.offset}; {source}, so none is left after it; lower `offset`"]
    if spec.size is not None and spec.offset + spec.size > rows:
        return [
            f"{where}.size: got {spec.size} after `offset` {spec.offset}; {source}, so {rows - spec.offset} are left; "
            "lower `size` or `offset`"
        ]
    return []


def _rows_problem(records: list[Any], spec: DataSpec) -> str | None:
    """What keeps a file's rows from being a stage's rows (every row checked), or None."""
    from gradsift.data import check_rows

    if not records:
        return f"{spec.path!r} holds no rows"

    def first_bad(problem: Any) -> str | None:
        bad = [(number, found) for number, row in enumerate(records, 1) if (found := problem(row))]
        if not bad:
            return None
        more = f" (and {len(bad) - 1} more row(s))" if len(bad) > 1 else ""
        return f"{spec.path!r} row {bad[0][0]}{more}: {bad[0][1]}"

    found = first_bad(lambda row: None if isinstance(row, dict) else f"not a mapping but {type(row).__name__}")
    if found:
        return found
    if spec.prompt_template is not None:
        return first_bad(lambda row: _template_problem(row, spec))
    try:
        fmt = check_rows(records)  # every row: its columns and their types, named by line
    except UserError as error:
        return str(error)
    if fmt == "messages":
        return first_bad(
            lambda row: (
                None
                if row["messages"] and row["messages"][-1].get("role") == "assistant"
                else "`messages` must end with the assistant's answer (the stage trains on it)"
            )
        )
    return None


def _template_problem(row: dict[str, Any], spec: DataSpec) -> str | None:
    try:
        templated(row, spec)
    except ValueError as error:
        return str(error)
    return None


def _check_tasks(recipe: Recipe) -> list[str]:
    from gradsift.evaluation import check_task_names, task_manager

    problems = []
    specs = [("evals.after_each_stage", recipe.evals.after_each_stage)]
    if recipe.evals.final is not None:
        specs.append(("evals.final", recipe.evals.final))
    named = [(f"{where}.tasks", task) for where, spec in specs for task in spec.tasks]
    named += [(f"stages.{i}.eval_task", s.eval_task) for i, s in recipe.valid_stages() if s.eval_task]
    manager = task_manager() if named else None  # indexing lm-eval's tasks takes seconds
    for where, task in named:
        try:
            check_task_names([task], manager)
        except ValueError as error:
            problems.append(f"{where}: {error}")
    return problems
