"""What made a finished stage, so that a run folder holds one recipe's stages only.

Each finished stage's `stage.json` records two flat {recipe key: value} maps:

- `made_by`: everything its model came from: the model (and its files' fingerprint), the loading settings, the LoRA,
  the seed, the stage's training settings, its data (and the sha256 of a local data file), the arm, its selection
  (for `select` arms), the trainer, and `previous`: the digest of the `made_by` of the stage it trained on from (the
  align stage's for stage 1), so a change upstream reaches every stage after it.
- `evaluated_by`: what its numbers were measured with: the evals spec it ran, its tasks, the drift settings.

A resumed run compares both with the recipe as it is now (`check_finished`). A `made_by` key whose value changed
stops the run with one line naming the stage and the keys (`UserError`): keeping the old stage would mix two recipes
in one report. Keys a newer gradsift records and an older stage lacks are not compared. A stage whose only change is
in `evaluated_by` is evaluated again, without training. A stage written before gradsift recorded `made_by` is kept
as it is. `--rerun-from STAGE` moves the stage and the ones after it aside (`move_aside`), never deleting them.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradsift.continual.layout import REPLACED_DIR, Step
from gradsift.continual.paths import resolve_path
from gradsift.continual.schema import Recipe
from gradsift.errors import UserError

MADE_BY = "made_by"
EVALUATED_BY = "evaluated_by"


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1}, values as JSON reads them back (tuples become lists)."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: json.loads(json.dumps(value, default=str))}


def digest(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode("utf-8")).hexdigest()


@dataclass
class Fingerprints:
    """The `made_by` and `evaluated_by` of a recipe's stages, computed once per step (a stage's `previous` needs the
    one before it); file hashes computed once per path."""

    recipe: Recipe
    _made: dict[tuple[int, str | None, int], dict[str, Any]] = field(default_factory=dict)
    _files: dict[str, str] = field(default_factory=dict)
    _model: dict[str, str] | None = None

    def made_by(self, step: Step) -> dict[str, Any]:
        key = (step.seed, step.arm, step.index)
        if key not in self._made:
            self._made[key] = flatten(self._made_by(step))
        return self._made[key]

    def _made_by(self, step: Step) -> dict[str, Any]:
        recipe = self.recipe
        if self._model is None:
            from gradsift.models import model_fingerprint

            self._model = model_fingerprint(recipe.model)
        loading = recipe.scoring.model_dump(mode="json", include={"dtype", "quantization", "trust_remote_code"})
        inputs: dict[str, Any] = {**self._model, "loading": loading, "lora": recipe.lora.model_dump(mode="json")}
        inputs["seed"] = step.seed
        if step.arm is None:
            assert recipe.align is not None
            inputs["train"] = recipe.train_for(recipe.align).model_dump(mode="json")
            inputs["data"] = {str(i): self._data(spec) for i, spec in enumerate(recipe.align.data)}
            return inputs
        stage = recipe.stages[step.index - 1]
        spec = recipe.arm(step.arm)
        inputs["train"] = recipe.train_for(stage).model_dump(mode="json")
        inputs["data"] = self._data(stage.data)
        inputs["arm"] = spec.model_dump(mode="json", exclude={"selection", "mode", "steps"})
        inputs["trainer"] = recipe.trainer
        if recipe.trainer == "axolotl":
            inputs["axolotl"] = recipe.axolotl
        if spec.kind in ("select", "random"):
            inputs["steps"] = spec.steps or recipe.steps
        if spec.kind == "select":
            inputs["mode"] = spec.mode or recipe.mode
            inputs["selection"] = recipe.selection_for(step.arm).model_dump(mode="json")
            scoring = recipe.scoring.model_dump(mode="json")
            anchor = recipe.scoring.anchor_data
            if anchor:
                scoring["anchor_data_sha256"] = self._file(anchor)
            inputs["scoring"] = scoring
        if step.index > 1:
            inputs["previous"] = digest(self.made_by(Step(step.seed, step.arm, step.index - 1, "", step.layout)))
        elif recipe.align is not None:
            inputs["previous"] = digest(self.made_by(Step(step.seed, None, 0, "align", step.layout)))
        return inputs

    def evaluated_by(self, step: Step) -> dict[str, Any]:
        recipe = self.recipe
        final = step.arm is None or step.index == len(recipe.stages)
        spec, tasks = recipe.eval_tasks(final)
        inputs = {"evals": spec.model_dump(mode="json"), "tasks": tasks, "drift_prompts": recipe.drift_prompts}
        inputs["reference_model"] = recipe.reference_model
        return flatten(inputs)

    def _data(self, spec: Any) -> dict[str, Any]:
        values = spec.model_dump(mode="json")
        if spec.path:
            values["sha256"] = self._file(spec.path)
        return values

    def _file(self, path: str) -> str | None:
        """The sha256 of a local data file (of every file, by name, of a folder); None for a packaged source or a
        hub id."""
        if path not in self._files:
            found = resolve_path(path, self.recipe.base_dir)
            self._files[path] = _content_sha256(found) if isinstance(found, Path) else None
        return self._files[path]


def _content_sha256(path: Path) -> str:
    from gradsift.fileio import file_fingerprint

    if path.is_file():
        return file_fingerprint(path)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    listing = [(p.relative_to(path).as_posix(), file_fingerprint(p)) for p in files]
    return hashlib.sha256(json.dumps(listing).encode("utf-8")).hexdigest()


def changed_keys(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The recorded keys whose value is not the one now (a key the record lacks is not compared)."""
    return [key for key, value in recorded.items() if key not in now or now[key] != value]


@dataclass(frozen=True)
class Finished:
    """What a resumed run does with its finished stages: those evaluated with other settings are evaluated again."""

    reevaluate: list[Step]


def check_finished(recipe: Recipe, steps: list[Step], prints: Fingerprints | None = None) -> Finished:
    """Compare every finished stage in `steps` with the recipe as it is now.

    Raises `UserError` (one line: the first changed stage, its changed keys with the values before and now, the
    choices) when a finished stage was made by other settings; returns the stages to evaluate again.
    """
    prints = prints or Fingerprints(recipe)
    changed: list[tuple[Step, list[str], dict[str, Any]]] = []
    reevaluate = []
    for step in steps:
        what, keys, made = finished_status(step, prints)
        if what == "changed":
            changed.append((step, keys, made))
        elif what == "re-evaluate":
            reevaluate.append(step)
    if changed:
        raise UserError(_changed_message(changed, prints))
    return Finished(reevaluate)


def finished_status(step: Step, prints: Fingerprints) -> tuple[str, list[str], dict[str, Any]]:
    """(status, changed `made_by` keys, the recorded `made_by`) of a step: "to run" (not finished), "done" (or made
    before gradsift recorded it), "changed" (made by other settings) or "re-evaluate" (only its evals changed)."""
    if not step.done():
        return "to run", [], {}
    record = json.loads((step.folder / "stage.json").read_text(encoding="utf-8"))
    made = record.get(MADE_BY)
    if not isinstance(made, dict):
        return "done", [], {}  # written before gradsift recorded what made a stage: kept as it is
    keys = changed_keys(made, prints.made_by(step))
    if keys:
        return "changed", keys, made
    evaluated = record.get(EVALUATED_BY)
    if isinstance(evaluated, dict) and changed_keys(evaluated, prints.evaluated_by(step)):
        return "re-evaluate", [], made
    return "done", [], made


def _changed_message(changed: list[tuple[Step, list[str], dict[str, Any]]], prints: Fingerprints) -> str:
    step, keys, made = changed[0]
    now = prints.made_by(step)
    shown = [key for key in keys if key != "previous"] or keys  # `previous` only says an earlier stage changed
    parts = [f"{key} {_short(made.get(key))} → {_short(now.get(key, '(gone)'))}" for key in shown[:4]]
    more = f" and {len(shown) - 4} more key(s)" if len(shown) > 4 else ""
    others = f" ({len(changed) - 1} other finished stage(s) too)" if len(changed) > 1 else ""
    name = "align" if step.arm is None else step.stage
    return (
        f"{step.folder} was trained with other settings than the recipe's now: {'; '.join(parts)}{more}{others}. "
        "Keeping it would mix two recipes in one run: choose a new --out for the changed recipe, or retrain this "
        f"stage and the ones after it with --rerun-from {name} (the old folders are moved aside under "
        f"{step.layout.root / REPLACED_DIR}/, not deleted), or undo the change."
    )


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def stage_names(recipe: Recipe) -> list[str]:
    """The names `--rerun-from` takes: `align` (when the recipe has one) and the task stages'."""
    return (["align"] if recipe.align is not None else []) + [stage.name for stage in recipe.stages]


def move_aside(recipe: Recipe, steps: list[Step], stage: str) -> list[tuple[Path, Path]]:
    """`--rerun-from STAGE`: move the folders of `stage` and every later stage of the plan's arms and seeds (for
    `align`: the seed's whole folder but what other seeds hold) under `<out>/replaced/<UTC time>/`, keeping their
    place in the run's layout. Returns (old, new) of each folder moved; deletes nothing."""
    names = stage_names(recipe)
    if stage not in names:
        raise UserError(f"--rerun-from {stage!r}: the recipe's stages are {', '.join(names)}. Name one of them.")
    first = 0 if stage == "align" else next(i for i, s in enumerate(recipe.stages, start=1) if s.name == stage)
    moved = []
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for step in steps:
        if step.index < first or not step.folder.exists():
            continue
        target = step.layout.root / REPLACED_DIR / stamp / step.folder.relative_to(step.layout.root)
        target.parent.mkdir(parents=True, exist_ok=True)
        step.folder.rename(target)
        moved.append((step.folder, target))
    return moved
