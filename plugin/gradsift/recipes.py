"""Continual recipes: a YAML task sequence run stage by stage, once per arm and seed, with evals after each stage.

A recipe names a base model, an optional `align` stage (trained once per seed, merged into the weights, shared by
every arm), an ordered list of task stages, the selection config and the arms to compare. For each seed, arm and
stage the runner scores the stage's rows with the model as it stands (the previous stage's adapter), selects,
trains the one LoRA adapter further with TRL, evaluates with lm-eval and writes

    <out>/recipe.json                              the recipe as run (its `gradsift_version` marks a run folder)
    <out>/seed-<s>/00-align/                       model/ (merged), stage.json, eval/
    <out>/seed-<s>/<arm>/<NN>-<stage>/             adapter/, scores/, dropped.jsonl, selection.json, eval/,
                                                   stage.json (written last: the stage is finished)

Every stage folder carries `.gradsift-stage` from its start. A killed run resumes at the first stage without
`stage.json`, emptying that stage's folder first; gradsift empties only a folder it can tell is its own (the marker,
or, for a folder of a run older than the marker, nothing but names a stage writes) and writes only into an `<out>`
that is new, empty or a run folder, one `gradsift run` at a time. Everything is validated, and every error in the
file reported with its YAML path, before any training starts.
"""

from __future__ import annotations

import collections
import copy
import functools
import json
import logging
import math
import os
import re
import shutil
import string
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gradsift import __version__
from gradsift.config import ONLINE_LOG, DataConfig, EvalConfig, GradSiftConfig, ScoringConfig, SelectionConfig
from gradsift.errors import UserError
from gradsift.fileio import write_json
from gradsift.store import DROPPED_FILE, SELECTION_FILE, write_dropped, write_selection
from gradsift.synthetic import TASKS as SYNTHETIC_TASKS

logger = logging.getLogger(__name__)

BUILTIN_ARMS = ("full", "random", "gradsift", "high", "low", "anchor", "clip", "kl")
STAGE_FILE = "stage.json"
RUN_FILE = "recipe.json"
# Written when a stage starts: the stage folder is gradsift's, so a resumed run may empty it.
STAGE_MARK = ".gradsift-stage"
# A stage's copy of the online mode's per-step record.
STAGE_ONLINE_LOG = "online.jsonl"
# Everything a stage writes at its top level. An unfinished stage folder of a run older than STAGE_MARK is emptied
# only if it holds nothing else (and `atomic_path`'s temporary files).
STAGE_NAMES = frozenset(
    {
        STAGE_FILE,
        "adapter",
        "model",
        "scores",
        "shared-scores",
        "eval",
        DROPPED_FILE,
        SELECTION_FILE,
        STAGE_ONLINE_LOG,
        "trainer",
        "train.jsonl",
        "axolotl.yaml",
        "axolotl.log",
        "axolotl-out",
        "axolotl-prepared",
    }
)
_TEMPORARY = re.compile(r"\..+\.tmp")
# Keys of a stage's axolotl config that place its files in the stage folder or chain the stages: never from `axolotl:`.
AXOLOTL_OWNED = ("base_model", "datasets", "dataset_prepared_path", "output_dir", "lora_model_dir")
# Per seed, what several arms share (stage 1's scores); not an arm.
SHARED_DIR = "_shared"
SAFETY_METRICS = ("refusal_rate", "compliance_rate_safe", "refusal_rate_unsafe", "acc")
# Names that become one path segment: the recipe's (`runs/<name>`), a stage's (`<NN>-<name>`) and an arm's.
_SEGMENT = re.compile(r"[A-Za-z0-9_.-]+")
_ARM_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")
# A data `path` that can only mean a file: it never falls back to a hub dataset id.
_DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def _segment(value: str, what: str) -> str:
    if not _SEGMENT.fullmatch(value) or value in (".", ".."):
        raise ValueError(
            f"{what} becomes a folder name, so it is letters, digits, `_`, `.` and `-`, and not `.` or `..`; "
            f"got {value!r}"
        )
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class LoraSpec(_Strict):
    """The one LoRA adapter every task stage trains further."""

    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"


class TrainSpec(_Strict):
    """Training hyperparameters (TRL `SFTConfig` names); a stage's `train:` overrides the recipe's."""

    epochs: float = Field(1.0, gt=0)
    learning_rate: float = Field(3e-4, gt=0)
    batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_length: int = Field(512, ge=8)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    lr_scheduler_type: str = "linear"
    bf16: bool | None = Field(None, description="null: bf16 where the hardware has it fast (CUDA bf16, CPU AMX).")
    gradient_checkpointing: bool = False


class DataSpec(_Strict):
    """A stage's rows: a synthetic task of `gradsift.synthetic`, or a file / hub dataset."""

    synthetic: str | None = None
    path: str | None = Field(
        None,
        description="A .jsonl/.json/.parquet file or saved dataset folder (relative: to the recipe's folder, else "
        "the current one), or a hub dataset id.",
    )
    size: int | None = Field(None, ge=1, description="Rows to take (the first `size` after a seeded shuffle).")
    split: str = "train"
    name: str | None = Field(None, description="Hub dataset configuration (e.g. `main` for gsm8k).")
    prompt_template: str | None = Field(
        None,
        description="Build a prompt from a row's columns, e.g. `{question}`; `{cop!L}` turns 0..3 into A..D, "
        "`{answers[text]!F}` takes a list's first item. Needs `completion_template`.",
    )
    completion_template: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if (self.synthetic is None) == (self.path is None):
            raise ValueError("give exactly one of `synthetic` (a task name) or `path` (a file or hub dataset)")
        if self.synthetic is not None and self.synthetic not in SYNTHETIC_TASKS:
            raise ValueError(f"unknown synthetic task {self.synthetic!r}; choose from {', '.join(SYNTHETIC_TASKS)}")
        if (self.prompt_template is None) != (self.completion_template is None):
            raise ValueError("give both `prompt_template` and `completion_template`, or neither")
        return self


class StageSpec(_Strict):
    name: str
    data: DataSpec
    train: dict[str, Any] = Field(default_factory=dict, description="Overrides of the recipe's `train:`.")
    eval_task: str | None = Field(
        None, description="lm-eval task measuring this stage's domain; default for synthetic data: its own task."
    )

    @field_validator("name")
    @classmethod
    def _folder_name(cls, value: str) -> str:
        return _segment(value, "a stage name (in `<NN>-<name>`)")

    def domain_task(self) -> str | None:
        if self.eval_task is not None:
            return self.eval_task
        return f"gradsift_domain_{self.data.synthetic}" if self.data.synthetic else None


class AlignSpec(_Strict):
    data: DataSpec
    train: dict[str, Any] = Field(default_factory=dict)


class ArmSpec(_Strict):
    """One way of training the stages. Built-in names need no spec; a named spec defines a new arm."""

    kind: Literal["full", "select", "random", "clip", "kl"] = "select"
    selection: dict[str, Any] = Field(default_factory=dict, description="Overrides of the recipe's `selection:`.")
    mode: Literal["offline", "online"] | None = None
    max_grad_norm: float = Field(0.5, gt=0, description="`clip`: gradient clipping norm (the paper: 0.5).")
    kl_coef: float = Field(0.1, gt=0, description="`kl`: weight of KL(model ‖ aligned model) per response token.")
    steps: Literal["kept", "full"] | None = Field(
        None,
        description="`select` / `random` arms: `kept` trains the stage's epochs over the kept rows (the paper's "
        "protocol); `full` trains as many optimizer steps as the `full` arm does on all rows (the kept rows "
        "repeated), so that a difference to `full` is not just fewer steps. Default: the recipe's `steps`.",
    )


class EvalSpec(EvalConfig):
    """`gradsift eval`'s settings (`EvalConfig`) for the evals after a stage, plus the stages' domain tasks."""

    tasks: list[str] = Field(default_factory=list, description="lm-eval tasks beside the stages' domain tasks.")
    domain: bool = Field(True, description="Also evaluate every stage's domain task (the accuracy matrix).")
    limit: int | None = Field(None, ge=1, description="Documents per task (lm-eval's `--limit`); null: all.")
    domain_limit: int | None = Field(
        None, ge=1, description="Documents per domain task, when it differs from `limit` (a separate lm-eval run)."
    )
    max_gen_toks: int | None = Field(
        None, ge=1, description="Answer length of the generated `tasks`; null: each task's own. Domain tasks keep "
        "their own when `domain_limit` or `domain_max_gen_toks` is set.",
    )  # fmt: skip
    domain_max_gen_toks: int | None = Field(
        None, ge=1, description="Answer length of the domain tasks, in a run of their own; null: each domain task's "
        "own (then `max_gen_toks` applies to them unless `domain_limit` is set).",
    )  # fmt: skip

    def domain_docs(self) -> int | None:
        """Documents per domain task."""
        return self.domain_limit if self.domain_limit is not None else self.limit

    def domain_apart(self) -> bool:
        """Whether the domain tasks run on their own (their own document count or answer length)."""
        return self.domain_limit is not None or self.domain_max_gen_toks is not None

    def domain_answer_length(self) -> int | None:
        """The domain tasks' answer length (null: each task's own)."""
        return self.domain_max_gen_toks if self.domain_apart() else self.max_gen_toks


class EvalsSpec(_Strict):
    after_each_stage: EvalSpec = Field(default_factory=EvalSpec)
    final: EvalSpec | None = Field(None, description="After the last stage, instead of `after_each_stage`.")


def _arm_dict(value: Any) -> Any:
    """`arms: [full, random, gradsift]` is short for built-in arms without options."""
    return {name: {} for name in value} if isinstance(value, list) else value


class Recipe(_Strict):
    name: str = Field(description="The run's name; the default run folder is `runs/<name>`.")
    model: str
    reference_model: str | None = Field(None, description="Pretrained reference for drift; default: `model`.")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    lora: LoraSpec = Field(default_factory=LoraSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    align: AlignSpec | None = None
    stages: list[StageSpec] = Field(min_length=1)
    scoring: dict[str, Any] = Field(default_factory=dict, description="gradsift `scoring:` options.")
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    mode: Literal["offline", "online"] = "offline"
    steps: Literal["kept", "full"] = Field("kept", description="Default `steps` of the `select` and `random` arms.")
    trainer: Literal["trl", "axolotl"] = Field(
        "trl", description="Training backend of the task stages: TRL in-process, or one `axolotl train` per stage."
    )
    axolotl: dict[str, Any] = Field(
        default_factory=dict, description="Extra axolotl config keys for every stage (e.g. CPU kernel switches)."
    )
    arms: dict[str, ArmSpec] = Field(default_factory=lambda: {name: ArmSpec() for name in ("full", "gradsift")})
    evals: EvalsSpec = Field(default_factory=EvalsSpec)
    drift_prompts: int = Field(
        16, ge=0, description="Benign align-set rows (`kind: benign`, or not a refusal) for the KL drift measure."
    )
    # Where relative data paths start (the recipe file's folder), and the indices of the stages that failed their
    # schema and were replaced by stand-ins while `load_recipe` collects the other problems.
    _base: Path | None = PrivateAttr(None)
    _invalid_stages: frozenset[int] = PrivateAttr(frozenset())

    @field_validator("name")
    @classmethod
    def _folder_name(cls, value: str) -> str:
        return _segment(value, "the recipe name (the default run folder `runs/<name>`)")

    @field_validator("arms", mode="before")
    @classmethod
    def _arm_list(cls, value: Any) -> Any:
        return _arm_dict(value)

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> Recipe:
        if not (info.context or {}).get("collect"):  # `load_recipe` collects these with every other problem
            problems = cross_field_problems(self)
            if problems:
                raise ValueError("; ".join(problems))
        return self

    def arm(self, name: str) -> ArmSpec:
        """The arm's spec: a built-in name's meaning, with what its spec sets on top (`random: {steps: full}`)."""
        spec = self.arms[name]
        if name not in BUILTIN_ARMS:
            return spec
        fraction = {"keep_fraction": self.selection.keep_fraction}
        builtin = {
            "full": ArmSpec(kind="full"),
            "random": ArmSpec(kind="random", selection={"rule": "random", **fraction}),
            "gradsift": ArmSpec(kind="select"),
            "high": ArmSpec(kind="select", selection={"rule": "high", **fraction}),
            "low": ArmSpec(kind="select", selection={"rule": "low", **fraction}),
            "anchor": ArmSpec(kind="select", selection={"rule": "anchor", **fraction}),
            "clip": ArmSpec(kind="clip"),
            "kl": ArmSpec(kind="kl"),
        }[name]
        update = {field: getattr(spec, field) for field in spec.model_fields_set}
        if "selection" in update:
            update["selection"] = {**builtin.selection, **spec.selection}
        return builtin.model_copy(update=update)

    def selection_for(self, arm: str) -> SelectionConfig:
        return SelectionConfig(**{**self.selection.model_dump(), **self.arm(arm).selection})

    def train_for(self, stage: StageSpec | AlignSpec) -> TrainSpec:
        return TrainSpec(**{**self.train.model_dump(), **stage.train})

    def scoring_config(self) -> ScoringConfig:
        scoring = {"model": self.model, "device": self.device, **self.scoring}
        anchor = scoring.get("anchor_data")
        if anchor and not str(anchor).startswith("embedded:"):  # a path, from the recipe's folder like its data
            scoring["anchor_data"] = str(resolve_path(str(anchor), getattr(self, "_base", None) or Path.cwd()))
        return ScoringConfig(**scoring)

    def eval_tasks(self, final: bool) -> tuple[EvalSpec, list[str]]:
        spec = self.evals.final if final and self.evals.final is not None else self.evals.after_each_stage
        tasks = list(spec.tasks)
        if spec.domain:
            tasks += [t for t in (stage.domain_task() for stage in self.stages) if t and t not in tasks]
        return spec, tasks

    def valid_stages(self) -> Iterator[tuple[int, StageSpec]]:
        """(index, stage) of the stages that passed their schema: all of them, outside `load_recipe`."""
        return ((i, stage) for i, stage in enumerate(self.stages) if i not in self._invalid_stages)


def cross_field_problems(recipe: Recipe, failed: frozenset[str] = frozenset()) -> list[str]:
    """Every problem between the recipe's fields, each `yaml.path: message`.

    `failed`: top-level keys whose own schema failed (and that now hold their defaults), so the checks that would
    judge other parts against them are skipped rather than report a problem the user does not have.
    """
    problems = []
    bad = [name for name in recipe.arms if not _ARM_NAME.fullmatch(name)]
    if bad:
        problems.append(
            f"arms: {', '.join(map(repr, bad))}: an arm name becomes a folder name beside `00-align`, so it is "
            "letters, digits, `_`, `.` and `-`, starting with a letter (e.g. `random_steps`)"
        )
    steps = [
        name
        for name in recipe.arms
        if recipe.arm(name).steps is not None
        and (recipe.arm(name).kind not in ("select", "random") or (recipe.arm(name).mode or recipe.mode) == "online")
    ]
    if steps:
        problems.append(
            f"arms: {', '.join(steps)}: `steps` applies to offline `select` and `random` arms (a `full`, `clip` "
            "or `kl` arm trains on all rows; an online arm selects inside each step); remove it"
        )
    unknown = [name for name, spec in recipe.arms.items() if name not in BUILTIN_ARMS and not spec.model_fields_set]
    if unknown:
        problems.append(
            f"arms: unknown arm(s) {', '.join(unknown)}: built-in arms are {', '.join(BUILTIN_ARMS)}; a new arm "
            "needs a spec (e.g. `my_arm: {selection: {rule: band}}`)"
        )
    names = [stage.name for _, stage in recipe.valid_stages()]
    if len(set(names)) != len(names):
        problems.append(f"stages: stage names must be unique; got {names}")
    if "scoring" not in failed:
        try:
            scoring = ScoringConfig(**recipe.scoring)
        except ValidationError as error:
            problems += _error_lines(error, "scoring")
        else:
            if recipe.align is not None and scoring.quantization == "nf4":
                problems.append(
                    "align: `align` merges its adapter into the weights, which a 4-bit model cannot hold: set "
                    "`scoring.quantization: none` (or auto) for a recipe with an align stage"
                )
    if "selection" not in failed:
        for name in recipe.arms:
            try:
                selection = recipe.selection_for(name)
            except ValidationError as error:
                problems += _error_lines(error, f"arms.{name}.selection")
                continue
            uses_anchor = selection.rule == "anchor" or selection.min_anchor_cos is not None
            if uses_anchor and recipe.arm(name).kind == "select" and not recipe.scoring.get("anchor_data"):
                problems.append(
                    f"arms.{name}: the anchor rule and `min_anchor_cos` need anchor scores; set `scoring.anchor_data` "
                    "(e.g. embedded:refusals)"
                )
    if "train" not in failed:
        parts = [(f"stages.{i}.train", stage) for i, stage in recipe.valid_stages()]
        parts += [("align.train", recipe.align)] if recipe.align is not None else []
        for where, part in parts:
            try:
                recipe.train_for(part)
            except ValidationError as error:
                problems += _error_lines(error, where)
    if not failed & {"train", "selection", "scoring"}:
        problems += _online_window_problems(recipe)
    final, each = recipe.evals.final, recipe.evals.after_each_stage
    if "evals" not in failed and final is not None and final.domain and each.domain:
        if final.domain_docs() != each.domain_docs():
            problems.append(
                f"evals: evals.final evaluates {final.domain_docs()} documents per domain task and "
                f"evals.after_each_stage {each.domain_docs()} (`domain_limit`, else `limit`): the accuracy matrix "
                "must compare the same documents at every stage; set them alike"
            )
        if final.domain_answer_length() != each.domain_answer_length():
            problems.append(
                f"evals: evals.final lets domain answers run to {final.domain_answer_length()} tokens and "
                f"evals.after_each_stage to {each.domain_answer_length()} (`domain_max_gen_toks`, else "
                "`max_gen_toks` unless `domain_limit` is set; None: each task's own): the accuracy matrix must judge "
                "answers of the same length at every stage; set them alike"
            )
    if recipe.trainer == "axolotl":
        kl = [name for name in recipe.arms if recipe.arm(name).kind == "kl"]
        if kl:
            problems.append(f"arms: {', '.join(kl)}: the `kl` arm needs `trainer: trl`")
    owned = sorted(set(recipe.axolotl) & set(AXOLOTL_OWNED))
    if owned:
        problems.append(
            f"axolotl: {', '.join(owned)}: the runner sets these for each stage (inside its folder, from the "
            "previous stage); remove them"
        )
    return problems


def _online_window_problems(recipe: Recipe) -> list[str]:
    """Online arms whose keep fraction keeps no row of a stage's window: found now, not after earlier stages train."""
    from gradsift.online import check_online_config

    problems = []
    for name in recipe.arms:
        spec = recipe.arm(name)
        if spec.kind != "select" or (spec.mode or recipe.mode) != "online":
            continue
        for i, stage in recipe.valid_stages():
            try:
                train = recipe.train_for(stage)
                check_online_config(
                    gradsift_config_for(recipe, name, train), train.batch_size, train.gradient_accumulation_steps
                )
            except (UserError, ValidationError) as error:
                problems.append(f"arms.{name} (stage stages.{i}): {error}")
    return problems


class RecipeError(UserError):
    """Every problem found in a recipe, each with its YAML path, separated by `;` (one per line)."""


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
        recipe._base = path.parent
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
    context = {"collect": True}
    try:
        recipe = Recipe.model_validate(raw, context=context)
    except ValidationError as error:
        problems = _error_lines(error)
        standing, invalid, failed = _stand_ins(raw, error)
        try:
            recipe = Recipe.model_validate(standing, context=context)
        except ValidationError:
            return None, problems
        recipe._invalid_stages = invalid
    else:
        problems, failed = [], frozenset()
    return recipe, problems + cross_field_problems(recipe, failed)


def _stand_ins(raw: dict[str, Any], error: ValidationError) -> tuple[dict[str, Any], frozenset[int], frozenset[str]]:
    """A copy of `raw` with every part in `error` replaced: (copy, indices of replaced stages, top-level keys hit)."""
    out = copy.deepcopy(raw)
    if "arms" in out:
        out["arms"] = _arm_dict(out["arms"])
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


def _error_lines(error: ValidationError, prefix: str = "") -> list[str]:
    """One `yaml.path: message` per pydantic error, under `prefix` (the key the validated mapping sits at)."""
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in (prefix, *item["loc"]) if part != "") or "(top level)"
        message = str(item["msg"]).removeprefix("Value error, ")
        received = item.get("input")
        shown = "" if item["type"] in ("missing", "value_error") else f" (got {received!r})"
        if item["type"] == "extra_forbidden":
            message = "not a recipe key; check the spelling against the recipe schema in the README"
        lines.append(f"{where}: {message}{shown}")
    return lines


def _data_specs(recipe: Recipe) -> list[tuple[str, DataSpec]]:
    specs = [("align.data", recipe.align.data)] if recipe.align else []
    return specs + [(f"stages.{i}.data", stage.data) for i, stage in recipe.valid_stages()]


def _check_data(recipe: Recipe, base: Path) -> list[str]:
    from gradsift.data import load_source
    from gradsift.synthetic import pool

    problems = []
    anchor = recipe.scoring.get("anchor_data")
    if isinstance(anchor, str) and not anchor.startswith("embedded:"):
        try:
            resolve_path(anchor, base)
        except UserError as error:
            problems.append(f"scoring.anchor_data: {error}")
    for where, spec in _data_specs(recipe):
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
            if not isinstance(resolved, Path):
                continue  # a hub id: read (and its format checked) when its stage starts; a dry run downloads nothing
            problem = _rows_problem(load_source(str(resolved), split=spec.split).records, spec)
        except UserError as error:
            problem = str(error)
        except OSError as error:
            problem = f"{spec.path!r} cannot be read: {error.strerror or error}"
        if problem:
            problems.append(f"{where}.path: {problem}")
    return problems


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
        _templated(row, spec)
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


def _data_roots(base: Path) -> list[Path]:
    """Where a relative data path is looked for: the recipe's folder, the current one, and for a recipe shipped with
    gradsift (`recipes/*.yaml` in a checkout or the wheel) the folder holding its `recipes/`, where its data lies."""
    roots = [base.resolve(), Path.cwd()]
    here = Path(__file__).resolve()
    if roots[0] in (here.parents[2] / "recipes", here.parent / "recipes"):
        roots.append(roots[0].parent)
    return list(dict.fromkeys(roots))


def resolve_path(path: str, base: Path) -> Path | str:
    """A recipe's data path: a file or folder (absolute, or relative to `base` or the current folder), or a hub id.

    A path that can only mean a file (a .jsonl/.json/.parquet suffix, a start of `./`, `../`, `/` or `~`, or more than
    one `/`) and exists nowhere raises `UserError`: it never silently becomes a hub dataset id.
    """
    candidate = Path(path).expanduser()
    roots = [] if candidate.is_absolute() else _data_roots(base)
    for found in [candidate] if candidate.is_absolute() else [root / candidate for root in roots]:
        if found.exists():
            return found
    file_like = (
        path.lower().endswith(_DATA_SUFFIXES) or path.startswith(("./", "../", "/", "~")) or path.count("/") > 1
    )
    if candidate.is_absolute() or file_like:
        where = f" (looked in {' and '.join(map(str, roots))})" if roots else ""
        raise UserError(
            f"{path!r} does not exist{where}. Fix the path; a hub dataset id has one `/`, e.g. `org/name`."
        )
    return path  # a hub dataset id


# ---------------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Step:
    seed: int
    arm: str | None  # None for the shared align stage
    index: int  # 0 for align, 1.. for task stages
    stage: str
    folder: Path

    def done(self) -> bool:
        return (self.folder / STAGE_FILE).is_file()


def plan(recipe: Recipe, out: Path, arms: list[str] | None = None, seeds: list[int] | None = None) -> list[Step]:
    """Every stage to run, in order: per seed the align stage, then each arm's task stages.

    Raises `UserError` when `out` is not a folder a run may write into (`check_run_folder`), so a dry run says so too.
    """
    check_run_folder(out)
    arms = arms or list(recipe.arms)
    unknown = [arm for arm in arms if arm not in recipe.arms]
    if unknown:
        raise RecipeError(f"--arms {', '.join(unknown)}: not in the recipe's arms ({', '.join(recipe.arms)}).")
    # `random` matches the size the `gradsift` arm kept, so it runs after it; a step-matched arm matches the steps
    # `full` took, so `full` runs first.
    arms = sorted(arms, key=lambda arm: {"full": 0, "random": 2}.get(recipe.arm(arm).kind, 1))
    steps = []
    for seed in seeds if seeds is not None else recipe.seeds:
        root = out / f"seed-{seed}"
        if recipe.align is not None:
            steps.append(Step(seed, None, 0, "align", root / "00-align"))
        for arm in arms:
            for k, stage in enumerate(recipe.stages, start=1):
                steps.append(Step(seed, arm, k, stage.name, root / arm / f"{k:02d}-{stage.name}"))
    return steps


def check_run_folder(out: Path) -> None:
    """Raise `UserError` unless `out` is new, empty or a folder `gradsift run` wrote (it holds gradsift's recipe.json).

    A run writes into, and empties unfinished stage folders under, its folder: never one of the user's.
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file, not a run folder. Choose an empty or new --out folder.")
    from gradsift.locking import LOCK_NAME

    if not out.is_dir() or all(p.name == LOCK_NAME for p in out.iterdir()):
        return
    if run_metadata(out) is None:
        raise UserError(
            f"--out {str(out)!r} is not a gradsift run folder (it holds files but no recipe.json written by "
            "`gradsift run`), and a run writes and deletes inside its folder: choose an empty or new --out."
        )


def run_metadata(run_dir: Path) -> dict[str, Any] | None:
    """The recipe.json of a folder written by `gradsift run` (marked with `gradsift_version`, or with the keys a run
    wrote before that mark), or None when the folder has no such file."""
    try:
        meta = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(meta, dict) and ("gradsift_version" in meta or {"name", "stages", "arms", "recipe"} <= set(meta)):
        return meta
    return None


def describe_plan(recipe: Recipe, steps: list[Step]) -> str:
    arms = ", ".join(recipe.arms)
    lines = [f"recipe {recipe.name}: model {recipe.model}, {len(recipe.stages)} stage(s), arms {arms}"]
    for step in steps:
        what = "align (shared by all arms)" if step.arm is None else f"{step.arm}: {step.stage}"
        if step.arm is not None:
            spec = recipe.arm(step.arm)
            stage = recipe.stages[step.index - 1]
            size = stage.data.size if stage.data.size else "all"
            mode = spec.mode or recipe.mode
            selection = recipe.selection_for(step.arm)
            floor = f", anchor cos ≥ {selection.min_anchor_cos:g}" if selection.min_anchor_cos is not None else ""
            detail = {"select": f"select {selection.rule}{floor} ({mode})", "random": "random subset"}
            matched = (spec.steps or recipe.steps) == "full" and spec.kind in detail
            matched = ", as many steps as full" if matched else ""
            what += f" [{size} rows, {detail.get(spec.kind, spec.kind)}{matched}]"
        status = "done" if step.done() else "to run"
        lines.append(f"  seed {step.seed}  {what:<60s} {status:7s} {step.folder}")
    return "\n".join(lines)


def stage_records(recipe: Recipe, spec: DataSpec, seed: int) -> list[dict[str, Any]]:
    """The rows of a stage (or the align set), as single-turn prompt/completion conversations where possible."""
    return [_as_prompt_completion(row) for row in _source_rows(recipe, spec, seed)]


def _measures_drift(recipe: Recipe) -> bool:
    """Whether stages measure the KL drift: `drift_prompts` > 0 and an align set to take them from."""
    return recipe.drift_prompts > 0 and recipe.align is not None


def drift_records(recipe: Recipe) -> list[dict[str, Any]]:
    """The fixed prompts of the drift measure: the first `drift_prompts` benign rows of the align set (seed 0).

    A row is benign when its `kind` says so (`recipes/data/align.jsonl` marks every row `harmful` or `benign`); a
    row without `kind` is benign unless its answer is a refusal. Harmful prompts are left out: the drift measures
    how far the answers to ordinary requests moved, which a refusal's shift would confound.
    """
    if not _measures_drift(recipe):
        return []
    rows = [row for row in _source_rows(recipe, recipe.align.data, 0) if _benign(row)]
    return [_as_prompt_completion(row) for row in rows[: recipe.drift_prompts]]


def _benign(row: dict[str, Any]) -> bool:
    from gradsift.evaluation import judge_answer

    if row.get("kind") is not None:
        return row["kind"] == "benign"
    record = _as_prompt_completion(row)
    answer = record.get("completion", record.get("output", ""))
    prompt = record.get("prompt", record.get("instruction", ""))
    return judge_answer(_text(answer), _text(prompt) or None) != "refused"


def _text(value: Any) -> str:
    """The text of a plain string or of a conversation's last turn."""
    if isinstance(value, list):
        value = value[-1].get("content", "") if value and isinstance(value[-1], dict) else ""
    return value if isinstance(value, str) else ""


def _source_rows(recipe: Recipe, spec: DataSpec, seed: int) -> list[dict[str, Any]]:
    """A stage's rows as read (templates applied), shuffled by `seed` and cut to `size`."""
    import random

    from gradsift.data import load_source
    from gradsift.synthetic import generate

    if spec.synthetic is not None:
        return generate(spec.synthetic, spec.size, split="train", seed=seed)
    resolved = resolve_path(spec.path, recipe._base or Path.cwd())
    if isinstance(resolved, Path):
        rows = list(load_source(str(resolved), split=spec.split).records)
    else:
        import datasets

        rows = list(datasets.load_dataset(resolved, spec.name, split=spec.split))
    random.Random(seed).shuffle(rows)
    rows = rows[: spec.size] if spec.size else rows
    if spec.prompt_template is not None:
        rows = [_templated(row, spec) for row in rows]
    return rows


class _Formatter(string.Formatter):
    """`str.format` with two conversions: `!L` (0 → A, 1 → B, …) and `!F` (a list's first item, or "")."""

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        if conversion == "L":
            return "ABCDEFGHIJ"[int(value)]
        if conversion == "F":
            return value[0] if len(value) else ""
        return super().convert_field(value, conversion)


def _templated(row: dict[str, Any], spec: DataSpec) -> dict[str, Any]:
    """A chat prompt/completion row built from a row's columns with the stage's templates."""
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


def _as_prompt_completion(row: dict[str, Any]) -> dict[str, Any]:
    """A one-turn `messages` row becomes TRL's conversational prompt/completion, so the loss is on the answer."""
    messages = row.get("messages")
    if isinstance(messages, list) and len(messages) >= 2 and messages[-1].get("role") == "assistant":
        return {"prompt": messages[:-1], "completion": messages[-1:]}
    return {k: v for k, v in row.items() if k in ("prompt", "completion", "instruction", "input", "output")}


def iter_stage_files(run_dir: Path) -> Iterator[tuple[int, str | None, int, dict[str, Any]]]:
    """(seed, arm, stage index, stage.json) of every finished stage under a run folder."""
    for seed_dir in sorted(run_dir.glob("seed-*")):
        seed = int(seed_dir.name.split("-", 1)[1])
        align = seed_dir / "00-align" / STAGE_FILE
        if align.is_file():
            yield seed, None, 0, json.loads(align.read_text())
        for arm_dir in sorted(p for p in seed_dir.iterdir() if p.is_dir() and p.name not in ("00-align", SHARED_DIR)):
            for stage_dir in sorted(arm_dir.iterdir()):
                marker = stage_dir / STAGE_FILE
                if marker.is_file():
                    yield seed, arm_dir.name, int(stage_dir.name.split("-", 1)[0]), json.loads(marker.read_text())


def rejudge_run(run_dir: Path) -> int:
    """Judge the logged answers of every finished stage's refusal and over-refusal tasks again; return the count.

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
        judged_task_kind,
        newest_samples,
        overrefusal_metrics,
        per_doc_metrics,
        refusal_metrics,
        sample_answer,
    )

    rewritten = 0
    for marker in _stage_markers(run_dir):
        record = json.loads(marker.read_text(encoding="utf-8"))
        judged = False
        for task, path in newest_samples(marker.parent / "eval").items():
            judge = {"refusal": refusal_metrics, "overrefusal": overrefusal_metrics}.get(judged_task_kind(task))
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


def _stage_markers(run_dir: Path) -> list[Path]:
    """Every finished stage's stage.json in the run layout (`seed-N/00-align`, `seed-N/<arm>/NN-<stage>`), no links."""
    markers = []
    for seed_dir in sorted(p for p in run_dir.glob("seed-*") if p.is_dir() and not p.is_symlink()):
        stages = [seed_dir / "00-align"]
        for arm_dir in sorted(p for p in seed_dir.iterdir() if p.is_dir() and not p.is_symlink()):
            if arm_dir.name not in ("00-align", SHARED_DIR):
                stages += sorted(p for p in arm_dir.iterdir() if p.is_dir() and re.match(r"\d\d-", p.name))
        markers += [s / STAGE_FILE for s in stages if not s.is_symlink() and (s / STAGE_FILE).is_file()]
    return markers


def _mean(values: list[float | None]) -> float | None:
    """The mean over the documents a metric applies to (None marks the others, e.g. over-refusal's unsafe prompts)."""
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def _clean(folder: Path) -> None:
    """Start a stage in an empty folder marked as gradsift's, removing what an interrupted run of it left.

    An existing folder is emptied only if gradsift can tell it wrote it: it carries `STAGE_MARK`, or (a stage folder
    of a run older than the mark) holds nothing but names a stage writes. Anything else raises `UserError`, and
    nothing is deleted.
    """
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise UserError(
            f"{str(folder)!r} is where this stage's folder goes, but it is a file or a link, which gradsift did not "
            "write: move it away, or choose another --out."
        )
    if folder.is_dir():
        names = sorted(p.name for p in folder.iterdir())
        foreign = [n for n in names if n not in STAGE_NAMES and n != STAGE_MARK and not _TEMPORARY.fullmatch(n)]
        if names and STAGE_MARK not in names and foreign:
            raise UserError(
                f"{str(folder)!r} holds files gradsift did not write ({', '.join(foreign[:5])}), and an unfinished "
                "stage restarts in an emptied folder: move them away, or choose another --out."
            )
        if names:
            logger.info("gradsift run: %s was left unfinished; starting it again", folder)
            shutil.rmtree(folder)
    folder.mkdir(parents=True)
    mark = {"gradsift_version": __version__, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json(mark, folder / STAGE_MARK)


def elapsed(start: float) -> float:
    return round(time.perf_counter() - start, 2)


def finite(value: float | None) -> float | None:
    """None for NaN and ±inf (no strict JSON can hold them)."""
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else value


def gradsift_config_for(recipe: Recipe, arm: str, train: TrainSpec) -> GradSiftConfig:
    spec = recipe.arm(arm)
    return GradSiftConfig(
        mode=spec.mode or recipe.mode,
        data=DataConfig(max_length=train.max_length),
        scoring=recipe.scoring_config(),
        selection=recipe.selection_for(arm),
        online={"log_file": ONLINE_LOG},
    )


# ---------------------------------------------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------------------------------------------


def run_recipe(
    recipe: Recipe,
    out: Path,
    *,
    arms: list[str] | None = None,
    seeds: list[int] | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> list[Step]:
    """Run every unfinished stage of the plan in order. `stop_after` ends after that many stages (for tests).

    `out` must be new, empty or a run folder (`check_run_folder`); it is locked for the whole run, so a second
    `gradsift run` on it fails with `UserError` instead of writing the same stages.
    """
    from gradsift.locking import folder_lock

    steps = plan(recipe, out, arms, seeds)
    _REFERENCES.clear()  # a reference of an earlier run in this process may have been trained again since
    with folder_lock(out):
        check_run_folder(out)  # again, now that no other run can write it
        meta = {
            "gradsift_version": __version__,
            "name": recipe.name,
            "model": recipe.model,
            "stages": [stage.name for stage in recipe.stages],
            "domain_tasks": [stage.domain_task() for stage in recipe.stages],
            "arms": list(recipe.arms),
            "recipe": recipe.model_dump(mode="json"),
        }
        write_json(meta, out / RUN_FILE)
        ran = 0
        for step in steps:
            if step.done():
                logger.info("gradsift run: %s already finished, skipped", step.folder)
                continue
            if stop_after is not None and ran >= stop_after:
                break
            start = time.perf_counter()
            _clean(step.folder)
            if step.arm is None:
                _run_align(recipe, step, progress)
            else:
                _run_stage(recipe, step, steps, progress)
            ran += 1
            logger.info("gradsift run: %s finished in %.0f s", step.folder, time.perf_counter() - start)
    return steps


def _device(recipe: Recipe) -> str:
    from gradsift.models import resolve_device

    return resolve_device(recipe.scoring_config())


def _tokenizer(recipe: Recipe) -> Any:
    from gradsift.models import load_tokenizer

    return load_tokenizer(recipe.model)  # with a pad token (EOS when the model has none)


def _base_model_spec(recipe: Recipe, step: Step) -> str:
    """The model every task stage starts from: the seed's aligned model when there is an align stage."""
    if recipe.align is None:
        return recipe.model
    return str(step.folder.parents[1] / "00-align" / "model" if step.arm else step.folder / "model")


def _load_base(recipe: Recipe, spec: str) -> Any:
    from gradsift.models import load_base_model

    return load_base_model(recipe.scoring_config().model_copy(update={"model": spec, "adapter": None}))


def _fresh_lora(recipe: Recipe, model: Any, seed: int) -> Any:
    from gradsift.models import fresh_lora

    lora = recipe.lora
    return fresh_lora(model, lora.r, lora.alpha, lora.target_modules, seed, dropout=lora.dropout)


def _bf16(train: TrainSpec, device: str) -> bool:
    import torch

    if train.bf16 is not None:
        return train.bf16
    if device.startswith("cuda"):
        return bool(torch.cuda.is_bf16_supported())
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(amx and amx())


def _sft_args(recipe: Recipe, train: TrainSpec, folder: Path, seed: int, progress: bool, **overrides: Any) -> Any:
    from trl import SFTConfig

    device = _device(recipe)
    settings = dict(
        output_dir=str(folder / "trainer"),
        num_train_epochs=train.epochs,
        learning_rate=train.learning_rate,
        per_device_train_batch_size=train.batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        max_length=train.max_length,
        warmup_steps=train.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        lr_scheduler_type=train.lr_scheduler_type,
        bf16=_bf16(train, device),
        gradient_checkpointing=train.gradient_checkpointing,
        seed=seed,
        data_seed=seed,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=device == "cpu",
        disable_tqdm=not progress,
        packing=False,
    )
    settings.update(overrides)
    return SFTConfig(**settings)


def _train(trainer: Any, folder: Path) -> dict[str, Any]:
    start = time.perf_counter()
    result = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    online_log = folder / "trainer" / ONLINE_LOG
    if online_log.is_file():  # the online mode's per-step record, kept beside the stage's other outputs
        shutil.move(online_log, folder / STAGE_ONLINE_LOG)
    shutil.rmtree(folder / "trainer", ignore_errors=True)
    return {
        "train_loss": result.training_loss,
        "losses": losses,
        "steps": trainer.state.global_step,
        "seconds": elapsed(start),
    }


def _run_align(recipe: Recipe, step: Step, progress: bool) -> None:
    from datasets import Dataset
    from trl import SFTTrainer

    assert recipe.align is not None
    tokenizer = _tokenizer(recipe)
    train = recipe.train_for(recipe.align)
    records = stage_records(recipe, recipe.align.data, step.seed)
    model = _fresh_lora(recipe, _load_base(recipe, recipe.model), step.seed)
    args = _sft_args(recipe, train, step.folder, step.seed, progress)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(records), processing_class=tokenizer)
    training = _train(trainer, step.folder)
    merged = model.merge_and_unload()
    merged.save_pretrained(step.folder / "model", safe_serialization=True)
    tokenizer.save_pretrained(step.folder / "model")
    del merged, model, trainer
    record = {"stage": "align", "index": 0, "seed": step.seed, "rows": len(records), "train": training}
    _finish_stage(recipe, step, tokenizer, record, adapter=None)


def _stage_model(recipe: Recipe, step: Step) -> Any:
    """The base (aligned) model with the arm's adapter as the previous stage left it, trainable."""
    from peft import PeftModel

    base = _load_base(recipe, _base_model_spec(recipe, step))
    if step.index == 1:
        return _fresh_lora(recipe, base, step.seed)
    return PeftModel.from_pretrained(base, str(previous_adapter(recipe, step)), is_trainable=True)


def previous_adapter(recipe: Recipe, step: Step) -> Path:
    """The adapter the arm's previous stage wrote, which this stage trains further (`UserError` if it is gone)."""
    index = step.index - 1
    folder = step.folder.parent / f"{index:02d}-{recipe.stages[index - 1].name}"
    adapter = folder / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(
            f"{str(adapter)!r} is missing: it is the adapter stage {index} of arm {step.arm!r} (seed {step.seed}) "
            f"left, which {step.stage!r} trains further. Restore it, or remove {str(folder / STAGE_FILE)!r} so that "
            "stage runs again."
        )
    return adapter


def _run_stage(recipe: Recipe, step: Step, steps: list[Step], progress: bool) -> None:
    import numpy as np
    from datasets import Dataset
    from trl import SFTTrainer

    from gradsift.integrations.trl import GradSiftSFTTrainer, select_dataset
    from gradsift.store import MANIFEST, TABLE

    stage = recipe.stages[step.index - 1]
    spec = recipe.arm(step.arm)
    train = recipe.train_for(stage)
    tokenizer = _tokenizer(recipe)
    records = stage_records(recipe, stage.data, step.seed)
    model = _stage_model(recipe, step)
    overrides = {"max_grad_norm": spec.max_grad_norm} if spec.kind == "clip" else {}
    args = _sft_args(recipe, train, step.folder, step.seed, progress, **overrides)
    config = gradsift_config_for(recipe, step.arm, train)
    record: dict[str, Any] = {"stage": stage.name, "index": step.index, "seed": step.seed, "arm": step.arm}
    record["arm_kind"] = spec.kind
    record["rows"] = len(records)
    online = spec.kind == "select" and config.mode == "online"
    start = time.perf_counter()
    if spec.kind == "select" and not online:
        cache = _scores_cache(step, recipe)
        kept, report = select_dataset(
            Dataset.from_list(records), model, tokenizer, config, sft_config=args, cache_dir=cache, progress=progress
        )
        if cache != step.folder / "scores":
            (step.folder / "scores").mkdir()
            for name in (TABLE, MANIFEST):  # the finished table and its manifest; not the shards or a lock
                shutil.copy2(cache / name, step.folder / "scores" / name)
        write_dropped(step.folder / DROPPED_FILE, report.table, report.selection)
        reuse = {"reused_scores": report.reused_scores}
        write_selection(step.folder / SELECTION_FILE, report.table, report.selection, config.selection, reuse)
        table = report.table
        record["selection"] = {
            "summary": report.summary(),
            "dropped": report.selection.counts(),
            "kept_norm_range": _kept_range(table.grad_norm, report.selection.keep),
            "kept_anchor_cos_range": _kept_range(table.anchor_cos, report.selection.keep),
        }
        dataset = kept
    elif spec.kind == "random":
        matched = _kept_by(steps, step, "gradsift")
        chosen = random_subset(recipe, step.arm, len(records), matched)
        dataset = Dataset.from_list([records[i] for i in np.flatnonzero(chosen.keep)])
        record["selection"] = {"summary": chosen.summary(), "matched_to": "gradsift" if matched else None}
    else:
        dataset = Dataset.from_list(records)
    record["kept"] = len(dataset)
    record["select_seconds"] = elapsed(start)
    if spec.kind in ("select", "random") and not online and (spec.steps or recipe.steps) == "full":
        # As many optimizer steps as `full` took on all rows (its record; the Trainer's count when it has not run):
        # the trainer cycles the kept rows until then.
        args.max_steps = _full_steps_by(steps, step) or full_arm_steps(len(records), train)
        record["max_steps"] = args.max_steps
    if recipe.trainer == "axolotl":
        del model
        record["train"] = _train_axolotl(
            recipe, step, train, dataset, config if online else None, spec, max_steps=record.get("max_steps")
        )
        if online:
            _count_online(record, step.folder / STAGE_ONLINE_LOG)
        _finish_stage(recipe, step, tokenizer, record, adapter=str(step.folder / "adapter"))
        return
    if online:
        trainer = GradSiftSFTTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer, gradsift_config=config
        )
    elif spec.kind == "kl":
        trainer = _kl_trainer_class()(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer, kl_coef=spec.kl_coef
        )
    else:
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    record["train"] = _train(trainer, step.folder)
    if online:
        _count_online(record, step.folder / STAGE_ONLINE_LOG)
    model.save_pretrained(step.folder / "adapter")
    del trainer, model
    _finish_stage(recipe, step, tokenizer, record, adapter=str(step.folder / "adapter"))


def _finish_stage(recipe: Recipe, step: Step, tokenizer: Any, record: dict[str, Any], adapter: str | None) -> None:
    """Evaluate the stage's model (base + `adapter`), measure drift, and write stage.json (the stage is finished)."""
    base = _base_model_spec(recipe, step)
    final = step.index == len(recipe.stages)
    needed = bool(recipe.eval_tasks(final)[1]) or _measures_drift(recipe)
    model = _eval_model(recipe, base, adapter) if needed else None  # one load for the evals and the drift
    record["eval"], record["eval_per_doc"] = _evaluate(recipe, model, tokenizer, step, final=final)
    record["drift"] = _drift(recipe, model, tokenizer, step)
    del model
    _write_stage(step, record)


def _count_online(record: dict[str, Any], path: Path) -> None:
    """Set the stage's kept and seen row counts from the online selection log, when there is one."""
    if path.is_file():
        entries = [json.loads(line) for line in path.read_text().splitlines()]
        record["kept"] = int(sum(e["kept"] for e in entries))
        record["online_rows"] = int(sum(e["rows"] for e in entries))


def _train_axolotl(
    recipe: Recipe,
    step: Step,
    train: TrainSpec,
    dataset: Any,
    online: GradSiftConfig | None,
    spec: ArmSpec,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """Train the stage with `axolotl train`: one config per stage, continuing the previous stage's adapter."""
    import subprocess
    import sys

    from gradsift.models import resolve_device, resolve_model_path

    rows = step.folder / "train.jsonl"
    with open(rows, "w", encoding="utf-8") as handle:
        for row in dataset:
            handle.write(json.dumps({"messages": [*row["prompt"], *row["completion"]]}, ensure_ascii=False) + "\n")
    out = step.folder / "axolotl-out"
    config: dict[str, Any] = {
        "base_model": resolve_model_path(_base_model_spec(recipe, step)),
        "datasets": [{"path": str(rows), "type": "chat_template", "field_messages": "messages"}],
        "chat_template": "tokenizer_default",
        "dataset_prepared_path": str(step.folder / "axolotl-prepared"),
        "output_dir": str(out),
        "val_set_size": 0,
        "sequence_len": train.max_length,
        "adapter": "lora",
        "lora_r": recipe.lora.r,
        "lora_alpha": recipe.lora.alpha,
        "lora_dropout": recipe.lora.dropout,
        "micro_batch_size": train.batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "num_epochs": train.epochs,
        "learning_rate": train.learning_rate,
        "warmup_ratio": train.warmup_ratio,
        "weight_decay": train.weight_decay,
        "max_grad_norm": spec.max_grad_norm if spec.kind == "clip" else train.max_grad_norm,
        "lr_scheduler": train.lr_scheduler_type,
        "optimizer": "adamw_torch",
        "gradient_checkpointing": train.gradient_checkpointing,
        "seed": step.seed,
        "save_strategy": "no",
        "logging_steps": 1,
        "bf16": _bf16(train, resolve_device(recipe.scoring_config())),
        "fp16": False,
    }
    if max_steps is not None:
        config["max_steps"] = max_steps
    if recipe.lora.target_modules == "all-linear":
        config["lora_target_linear"] = True
    else:
        config["lora_target_modules"] = recipe.lora.target_modules
    if step.index > 1:
        config["lora_model_dir"] = str(previous_adapter(recipe, step))
    if online is not None:
        config["plugins"] = ["gradsift.integrations.axolotl.GradSiftPlugin"]
        config["gradsift"] = {
            "mode": "online",
            "selection": online.selection.model_dump(exclude_defaults=True),
            "scoring": online.scoring.model_dump(exclude_defaults=True, exclude={"model", "device"}),
        }
    config.update(recipe.axolotl)
    path = step.folder / "axolotl.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    env = {**os.environ, "DO_NOT_TRACK": "1", "AXOLOTL_DO_NOT_TRACK": "1", "WANDB_MODE": "disabled"}
    start = time.perf_counter()
    command = [sys.executable, "-m", "axolotl.cli.main", "train", str(path), "--launcher", "python"]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    (step.folder / "axolotl.log").write_text(done.stdout + done.stderr, encoding="utf-8")
    if done.returncode != 0:
        log = step.folder / "axolotl.log"
        raise RuntimeError(f"`axolotl train {path}` failed (exit {done.returncode}); see {log}")
    adapter = step.folder / "adapter"
    adapter.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy(out / name, adapter / name)
    if online is not None and (out / ONLINE_LOG).is_file():
        shutil.move(out / ONLINE_LOG, step.folder / STAGE_ONLINE_LOG)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(step.folder / "axolotl-prepared", ignore_errors=True)
    return {"backend": "axolotl", "rows": len(dataset), "seconds": elapsed(start)}


def random_subset(recipe: Recipe, arm: str, rows: int, matched: int | None) -> Any:
    """A `random` arm's selection of `rows` rows: `matched` of them (the `gradsift` arm's count), else its fraction.

    A random subset has no scores, so the recipe's anchor filter (`min_anchor_cos`, meant for the scored arms) is off.
    """
    import numpy as np

    from gradsift.selection import select_rows

    selection = recipe.selection_for(arm).model_copy(update={"min_anchor_cos": None})
    zeros = np.zeros(rows)
    return select_rows(zeros, zeros, np.array(["ok"] * rows, dtype=object), selection, keep_count=matched)


def _kept_range(values: Any, keep: Any) -> list[float] | None:
    """[min, max] of a score over the kept rows with a finite value (None if there are none)."""
    import numpy as np

    kept = values[keep]
    kept = kept[np.isfinite(kept)]
    return [float(kept.min()), float(kept.max())] if len(kept) else None


def full_arm_steps(rows: int, train: TrainSpec) -> int:
    """Optimizer steps of a `full` stage over `rows` rows: the Trainer's count for `epochs` passes of its batches."""
    per_epoch = math.ceil(math.ceil(rows / train.batch_size) / train.gradient_accumulation_steps)
    return max(math.ceil(train.epochs * per_epoch), 1)


def _scores_cache(step: Step, recipe: Recipe) -> Path:
    """Where a select arm caches its scores.

    Every arm of a seed scores stage 1 with the same model (the seed's aligned weights and a fresh LoRA seeded
    alike) and rows, so they share one cache, kept in the align folder so that a new align stage discards it (the
    cache's identity covers the adapter, not the frozen aligned weights). Later stages score with the arm's own
    adapter, in the stage folder.
    """
    if step.index != 1:
        return step.folder / "scores"
    root = step.folder.parents[1] / ("00-align" if recipe.align is not None else SHARED_DIR)
    return root / "shared-scores" / f"{step.index:02d}-{step.stage}"


def _finished_beside(steps: list[Step], step: Step) -> Iterator[tuple[str, dict[str, Any]]]:
    """(arm, stage.json) of every arm that finished the same seed and stage."""
    for other in steps:
        if other.seed == step.seed and other.index == step.index and other.arm is not None and other.done():
            yield other.arm, json.loads((other.folder / STAGE_FILE).read_text())


def _full_steps_by(steps: list[Step], step: Step) -> int | None:
    """Optimizer steps a `full`-kind arm took at the same seed and stage, if one ran."""
    for _, record in _finished_beside(steps, step):
        if record.get("arm_kind") == "full" and record["train"].get("steps") is not None:
            return int(record["train"]["steps"])
    return None


def _kept_by(steps: list[Step], step: Step, arm: str) -> int | None:
    """Rows the `arm` arm kept at the same seed and stage, if it ran."""
    return next((int(record["kept"]) for name, record in _finished_beside(steps, step) if name == arm), None)


def _write_stage(step: Step, record: dict[str, Any]) -> None:
    write_json(record, step.folder / STAGE_FILE)


def _evaluate(
    recipe: Recipe, model: Any, tokenizer: Any, step: Step, final: bool
) -> tuple[dict[str, dict[str, float | None]], dict[str, dict[str, list]]]:
    """Run the stage's evals on the model (`_eval_model`: the adapter merged into a fresh copy).

    Returns {task: {metric: value}} and, for the report's per-prompt bootstrap, {task: {metric: [value per doc]}}
    (with the `doc_id` list) of the generated refusal and over-refusal tasks.
    """
    from gradsift.evaluation import judged_task_kind, run_lm_eval

    spec, tasks = recipe.eval_tasks(final)
    if not tasks:
        return {}, {}
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
            step.folder / "eval",
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


@functools.cache
def _task_manager() -> Any:
    """lm-eval's task index, built once per run: indexing every task takes seconds, and a run evaluates often."""
    from gradsift.evaluation import task_manager

    return task_manager()


def _eval_model(recipe: Recipe, base: str, adapter: str | None) -> Any:
    from gradsift.models import load_for_eval

    return load_for_eval(recipe.scoring_config().model_copy(update={"model": base, "adapter": adapter}), merge=True)


def _drift(recipe: Recipe, model: Any, tokenizer: Any, step: Step) -> dict[str, float | None]:
    """Mean per-token KL(p_model ‖ p_reference) on the align set's first benign answers (fixed prompts), against the
    pretrained model and (for a task stage) the seed's aligned model."""
    if not _measures_drift(recipe):
        return {}
    import torch

    from gradsift.data import collate, tokenize_records
    from gradsift.evaluation import response_logprobs, token_kl

    records = drift_records(recipe)
    if not records:
        logger.warning("gradsift run: the align set has no benign row (`kind: benign`); no drift measured")
        return {}
    rows = tokenize_records(records, tokenizer, DataConfig(max_length=256), progress=False)
    batch = collate(rows, tokenizer.pad_token_id, _device(recipe))
    references = {"pretrained": recipe.reference_model or recipe.model}
    if step.arm:
        references["aligned"] = str(step.folder.parents[1] / "00-align" / "model")
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
    reference = _eval_model(recipe, spec, None)
    with torch.no_grad():
        logp = response_logprobs(reference, batch)
    del reference
    if logp.numel() * logp.element_size() <= _REFERENCE_BYTES:
        _REFERENCES[key] = logp.cpu()
        while len(_REFERENCES) > 2:
            _REFERENCES.popitem(last=False)
    return logp


def _kl_trainer_class() -> type:
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
