"""What made a finished stage, so that a run folder holds one recipe's stages only.

Each finished stage's `stage.json` records two flat {recipe key: value} maps:

- `made_by`, taken when the stage starts: everything its model came from: the model (and its files' fingerprint),
  the loading settings, the LoRA, the seed, the stage's training settings, its data (a local file by its sha256, a
  packaged source or hub id by name), the arm, its selection (`select` and `random` arms) and scoring (`select`), the
  trainer, and `previous`: the digest of the recorded `made_by` of the stage it trained on from (the align stage's
  for stage 1), so a stage trained again upstream reaches every stage after it. Settings that change only speed or
  memory (shard and batch sizes, gradient checkpointing, the device) are left out. Not in it: what the other arm
  a stage's size or step count was matched to made (a `random` arm's count of the rows its `match` arm kept,
  `steps: full`'s count of `full`'s steps); retraining that arm alone leaves the matched stage as it was.
- `evaluated_by`: what its numbers were measured with: the evals spec it ran, its tasks, the drift settings.

A resumed run compares both with the recipe as it is now (`check_finished`): a key added, removed or changed in
`made_by` stops the run with one line naming the stage and the keys (`UserError`), since keeping the old stage would
mix two recipes in one report. Records of another format (an older layout, or a gradsift with other settings fields:
`schema_format`) are compared on the keys both hold. A stage whose only
change is in `evaluated_by` is evaluated again, without training. A stage written before gradsift recorded `made_by`
is kept as it is. `--rerun-from STAGE` moves the stage and the ones after it aside (`move_aside`), never deleting
them.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradsift.continual.layout import REPLACED_DIR, Step, replaced_dir
from gradsift.continual.paths import resolve_path
from gradsift.continual.schema import STEPPED_KINDS, Recipe
from gradsift.errors import UserError
from gradsift.fileio import dumps

MADE_BY = "made_by"
EVALUATED_BY = "evaluated_by"
# The layout of `made_by`; with the settings' field names (`schema_format`) it makes the record's `format`.
FORMAT = 1
# Settings that change how fast a stage runs or how much memory it takes, not what it makes.
SPEED_KEYS = frozenset({"max_tokens_per_batch", "max_batch_size", "gradient_checkpointing", "shard_size", "device"})


def _field_names(model: type, prefix: str = "") -> list[str]:
    from pydantic import BaseModel

    names = []
    for name, info in model.model_fields.items():
        names.append(prefix + name)
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            names += _field_names(info.annotation, f"{prefix}{name}.")
    return names


@functools.cache
def schema_format() -> str:
    """`made_by`'s format: `FORMAT` and a digest of every settings field name it can hold. A gradsift that adds a
    setting (recorded at its default from then on) writes another format, so its records are compared with older ones
    on the keys both hold, and an upgrade does not stop a resumed run (nor re-evaluate it); within one format a key
    added or removed is a change of the recipe."""
    from gradsift.config import ScoringConfig, SelectionConfig
    from gradsift.continual.schema import ArmSpec, DataSpec, EvalSpec, LoraSpec, TrainSpec

    models = (ScoringConfig, SelectionConfig, ArmSpec, DataSpec, LoraSpec, TrainSpec, EvalSpec)
    names = [f"{model.__name__}.{name}" for model in models for name in _field_names(model)]
    return f"{FORMAT}:{hashlib.sha256(' '.join(sorted(names)).encode()).hexdigest()[:12]}"


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1}, values as stage.json reads them back (tuples become lists, a non-finite float
    None: `fileio.dumps`)."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: json.loads(dumps(value))}


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
        inputs: dict[str, Any] = {"format": schema_format(), **self._model, "loading": loading}
        inputs.update(lora=recipe.lora.model_dump(mode="json"), seed=step.seed)
        if step.arm is None:
            inputs["seed"] = recipe.align_seed(step.seed)
            assert recipe.align is not None
            inputs["train"] = _speed_free(recipe.train_for(recipe.align).model_dump(mode="json"))
            inputs["data"] = {str(i): self._data(spec) for i, spec in enumerate(recipe.align.data)}
            return inputs
        stage = recipe.stages[step.index - 1]
        spec = recipe.arm(step.arm)
        inputs["train"] = _speed_free(recipe.train_for(stage).model_dump(mode="json"))
        # One source as before lists were allowed (a finished run's fingerprints stay valid); a mix, each source.
        data = [self._data(spec) for spec in stage.data]
        inputs["data"] = data[0] if len(data) == 1 else {str(i): values for i, values in enumerate(data)}
        inputs["arm"] = spec.model_dump(mode="json", exclude={"selection", "mode", "steps"})
        if spec.kind == "clean":  # which rows it keeps
            inputs["label_column"] = recipe.label_column
        inputs["trainer"] = recipe.trainer
        if recipe.trainer == "axolotl":
            inputs["axolotl"] = recipe.axolotl
        if spec.kind in ("select", "random"):
            inputs["selection"] = recipe.selection_for(step.arm).model_dump(mode="json")
        online = spec.kind == "select" and (spec.mode or recipe.mode) == "online"
        if spec.kind in STEPPED_KINDS and not online:  # the runner's condition for `steps: full`
            inputs["steps"] = spec.steps or recipe.steps
        if spec.kind == "select":
            inputs["mode"] = spec.mode or recipe.mode
            scoring = _speed_free(recipe.scoring.model_dump(mode="json", exclude={"model", "adapter"}))
            if recipe.scoring.anchor_data:
                scoring["anchor_data"] = self._source(recipe.scoring.anchor_data)
            inputs["scoring"] = scoring
        if step.index > 1:
            inputs["previous"] = self._recorded_digest(Step(step.seed, step.arm, step.index - 1, "", step.layout))
        elif recipe.align is not None:
            inputs["previous"] = self._recorded_digest(Step(step.seed, None, 0, "align", step.layout))
        return inputs

    def _recorded_digest(self, step: Step) -> str:
        """The digest of a stage's `made_by` as its stage.json records it, or as it would be made now when it has
        none (not finished, or written before gradsift recorded it)."""
        recorded = recorded_made_by(self.recipe, step)
        return digest(recorded if recorded is not None else self.made_by(step))

    def evaluated_by(self, step: Step) -> dict[str, Any]:
        recipe = self.recipe
        spec, tasks = recipe.eval_tasks(step.index)
        inputs = {"format": schema_format(), "evals": spec.model_dump(mode="json"), "tasks": tasks}
        inputs.update(drift_prompts=recipe.drift_prompts, reference_model=recipe.reference_model)
        return flatten(inputs)

    def _data(self, spec: Any) -> dict[str, Any]:
        values = spec.model_dump(mode="json")
        if spec.path:
            values["path"] = self._source(spec.path)
        return values

    def _source(self, path: str) -> str:
        """A data source as what it holds: a local file's sha256 (of every file, by name, of a folder), so that a
        path spelt otherwise is the same source; a packaged source or hub id by its name."""
        if path not in self._files:
            found = resolve_path(path, self.recipe.base_dir)
            self._files[path] = f"sha256:{_content_sha256(found)}" if isinstance(found, Path) else path
        return self._files[path]


def _speed_free(values: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if key not in SPEED_KEYS}


def recorded_made_by(recipe: Recipe, step: Step) -> dict[str, Any] | None:
    """A finished stage's recorded `made_by`, or None (not finished, or written before gradsift recorded it)."""
    folder = step.layout.stage_dir(step.seed, step.arm, step.index, _stage_name(recipe, step))
    try:
        made = json.loads((folder / "stage.json").read_text(encoding="utf-8")).get(MADE_BY)
    except (OSError, ValueError):
        return None
    return made if isinstance(made, dict) else None


def _stage_name(recipe: Recipe, step: Step) -> str:
    return "align" if step.arm is None else recipe.stages[step.index - 1].name


def _content_sha256(path: Path) -> str:
    from gradsift.fileio import file_fingerprint
    from gradsift.models import folder_fingerprint

    return file_fingerprint(path) if path.is_file() else folder_fingerprint(path, full=True)


def changed_keys(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The keys whose value differs, added or removed ones included; against a record of another format (or without
    one) only the keys both hold are compared."""
    if recorded.get("format") == now.get("format") and "format" in now:
        keys = list(dict.fromkeys([*recorded, *now]))
    else:
        keys = [key for key in recorded if key in now and key != "format"]
    return [key for key in keys if recorded.get(key, _ABSENT) != now.get(key, _ABSENT)]


_ABSENT = "(not set)"


@dataclass(frozen=True)
class Finished:
    """What a resumed run does with its finished stages: those evaluated with other settings are evaluated again."""

    reevaluate: list[Step]


def check_finished(
    recipe: Recipe, steps: list[Step], prints: Fingerprints | None = None, rerun_from: str | None = None
) -> Finished:
    """Compare every finished stage in `steps` (but those `rerun_from` will train again) with the recipe as it is now.

    Raises `UserError` (one line: the first changed stage, its changed keys with the values before and now, the
    choices) when a finished stage was made by other settings; returns the stages to evaluate again.
    """
    prints = prints or Fingerprints(recipe)
    first = first_index(recipe, rerun_from) if rerun_from is not None else None
    changed: list[tuple[Step, list[str], dict[str, Any]]] = []
    reevaluate = []
    for step in steps:
        if first is not None and step.index >= first:
            continue
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


# Keys that hold another stage's digest: they say that stage changed, not what.
_UPSTREAM = {"previous": "the stage it trained on from was trained again since, or is new"}


def _changed_message(changed: list[tuple[Step, list[str], dict[str, Any]]], prints: Fingerprints) -> str:
    step, keys, made = min(changed, key=lambda found: found[0].index)  # the earliest: --rerun-from must start there
    now = prints.made_by(step)
    own = [key for key in keys if key not in _UPSTREAM]
    parts = [f"{key} {_short(made.get(key, _ABSENT))} → {_short(now.get(key, _ABSENT))}" for key in own[:4]]
    parts += [_UPSTREAM[key] for key in keys if key in _UPSTREAM and not own]
    more = f" and {len(own) - 4} more key(s)" if len(own) > 4 else ""
    others = f" ({len(changed) - 1} other finished stage(s) too)" if len(changed) > 1 else ""
    name = "align" if step.arm is None else step.stage
    arms = sorted({found.arm for found, _, _ in changed if found.arm is not None})
    every = list(prints.recipe.arms)
    only = f" --arms {','.join(arms)}" if step.arm is not None and arms != sorted(every) else ""
    return (
        f"{step.folder} was made by other settings than the recipe's now: {'; '.join(parts)}{more}{others}. "
        "Keeping it would mix two recipes in one run: choose a new --out for the changed recipe, or train this "
        f"stage and the ones after it again with --rerun-from {name}{only} (the old folders are moved under "
        f"{step.layout.root / REPLACED_DIR}/, not deleted), or undo the change."
    )


def _short(value: Any) -> str:
    text = value if value is _ABSENT else json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def stage_names(recipe: Recipe) -> list[str]:
    """The names `--rerun-from` takes: `align` (when the recipe has one) and the task stages'."""
    return (["align"] if recipe.align is not None else []) + [stage.name for stage in recipe.stages]


def first_index(recipe: Recipe, stage: str) -> int:
    """The index of `--rerun-from STAGE` (0 for `align`); `UserError` naming the choices for another name."""
    names = stage_names(recipe)
    if stage not in names:
        raise UserError(
            f"--rerun-from {stage!r} is not one of the recipe's stages ({', '.join(names)}): name one of them."
        )
    return 0 if stage == "align" else next(i for i, s in enumerate(recipe.stages, start=1) if s.name == stage)


def move_aside(recipe: Recipe, steps: list[Step], stage: str) -> list[tuple[Path, Path]]:
    """`--rerun-from STAGE`: move the folders of `stage` and every later stage of the plan's arms and seeds (for
    `align`: every stage of the plan's seeds and arms) into a new `<out>/replaced/<UTC time>-<id>/`, keeping their
    place in the run's layout. Returns (old, new) of each folder moved; deletes nothing. An arm left out of the plan
    keeps its stages; if they were trained on a stage moved here, the next run that includes it says so."""
    first = first_index(recipe, stage)
    moved: list[tuple[Path, Path]] = []
    aside: Path | None = None
    for step in steps:
        if step.index < first or not step.folder.exists():
            continue
        aside = aside or replaced_dir(step.layout.root)
        target = aside / step.folder.relative_to(step.layout.root)
        target.parent.mkdir(parents=True, exist_ok=True)
        step.folder.rename(target)
        moved.append((step.folder, target))
    return moved
