"""A recipe's schema: the specs of its parts and what the built-in arm names mean (`load_recipe` adds the checks
between fields, `gradsift.continual.checks`).

A recipe names a base model, an optional `align` stage (trained once per seed, merged into the weights, shared by
every arm), an ordered list of task stages, the selection config and the arms to compare. `gradsift.continual.loading`
reads and validates the file; `gradsift.continual.runner` runs it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    PrivateAttr,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from gradsift.anchors import reads_anchor
from gradsift.config import (
    ONLINE_LOG,
    DataConfig,
    EvalConfig,
    GradSiftConfig,
    ScoringConfig,
    SelectionConfig,
    StrictModel,
)
from gradsift.continual.paths import resolve_path
from gradsift.errors import UserError
from gradsift.packaged import is_packaged
from gradsift.synthetic import TASKS as SYNTHETIC_TASKS

# Built-in arms named as their kind (`Recipe.arm`).
NAMED_KINDS = ("full", "random", "clip", "kl", "ewc", "olora", "clean")
BUILTIN_ARMS = (*NAMED_KINDS, "gradsift", "high", "low", "anchor")
PENALTY_KINDS = ("ewc", "olora")  # kinds whose loss adds a term on the weights (`gradsift.continual.penalties`)
LOSS_KINDS = ("kl", *PENALTY_KINDS)  # kinds that add to TRL's loss, so they need `trainer: trl`
STEPPED_KINDS = ("select", "random")  # kinds that train on a subset, whose optimizer steps `steps` decides
EWC_LAMBDA = 1.0e5  # the penalty at plain fine-tuning's end near the task loss, on the testbed (README)
# Keys of a stage's axolotl config that place its files in the stage folder or chain the stages: never from `axolotl:`.
AXOLOTL_OWNED = ("base_model", "datasets", "dataset_prepared_path", "output_dir", "lora_model_dir")
# Names that become one path segment: the recipe's (`runs/<name>`), a stage's (`<NN>-<name>`) and an arm's.
_SEGMENT = re.compile(r"[A-Za-z0-9_.-]+")
ARM_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")


def _segment(value: str, what: str) -> str:
    if not _SEGMENT.fullmatch(value) or value in (".", ".."):
        raise ValueError(
            f"{what} becomes a folder name, so it is letters, digits, `_`, `.` and `-`, and not `.` or `..`; "
            f"got {value!r}"
        )
    return value


class LoraSpec(StrictModel):
    """The one LoRA adapter every task stage trains further."""

    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"


class TrainSpec(StrictModel):
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


class DataSpec(StrictModel):
    """A stage's rows: a synthetic task of `gradsift.synthetic`, or a file, packaged source or hub dataset."""

    synthetic: str | None = None
    path: str | None = Field(
        None,
        description="A .jsonl/.json/.parquet file or saved dataset folder (relative: to the recipe's folder, else "
        "the current one), a packaged source (`embedded:alpaca-gpt4-demo`, with `split`), or a hub dataset id.",
    )
    size: int | None = Field(
        None, ge=1, description="Rows to take (the first `size` after a seeded shuffle and `offset`)."
    )
    offset: int = Field(
        0,
        ge=0,
        description="Rows of the seeded shuffle to pass over before taking `size`: two stages that read one source "
        "with offsets 0 and the first one's `size` train disjoint rows of it (a file, packaged source or hub "
        "dataset; not a synthetic task).",
    )
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
        if self.synthetic is not None and self.offset:
            raise ValueError(
                f"got offset {self.offset}; `offset` passes over rows of a file or dataset, and a synthetic task "
                "generates its rows; remove `offset`"
            )
        if (self.prompt_template is None) != (self.completion_template is None):
            raise ValueError("give both `prompt_template` and `completion_template`, or neither")
        return self


class StageSpec(StrictModel):
    name: str
    data: list[DataSpec] = Field(
        min_length=1,
        description="One source, or a list of sources mixed into one stage (each shuffled by the seed and cut to its "
        "own `size`, then the mix shuffled), e.g. benign instructions with a few harmful rows among them.",
    )
    train: dict[str, Any] = Field(default_factory=dict, description="Overrides of the recipe's `train:`.")
    eval_task: str | None = Field(
        None, description="lm-eval task measuring this stage's domain; default for synthetic data: its own task."
    )

    @field_validator("name")
    @classmethod
    def _folder_name(cls, value: str) -> str:
        if value == "align":  # `--rerun-from align` names the align stage
            raise ValueError("`align` names the align stage (`align:`); give this task stage another name")
        return _segment(value, "a stage name (in `<NN>-<name>`)")

    @field_validator("data", mode="before")
    @classmethod
    def _one_or_more(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict) else value

    def domain_task(self) -> str | None:
        if self.eval_task is not None:
            return self.eval_task
        synthetic = {spec.synthetic for spec in self.data}
        return f"gradsift_domain_{self.data[0].synthetic}" if len(synthetic) == 1 and self.data[0].synthetic else None

    def size(self) -> int | None:
        """The rows the stage's sources give together (None: one takes all its rows)."""
        sizes = [spec.size for spec in self.data]
        return None if None in sizes else sum(s for s in sizes if s is not None)


class AlignSpec(StrictModel):
    """The align stage: trained once per seed (or once: `seed`) on its sources' rows, merged into the weights, shared
    by every arm."""

    data: list[DataSpec] = Field(
        min_length=1,
        description="One source, or a list of sources whose rows are trained together (each shuffled by the seed and "
        "cut to its own `size`), e.g. harmful requests with refusals beside ordinary instructions with answers.",
    )
    train: dict[str, Any] = Field(default_factory=dict)
    seed: int | None = Field(
        None,
        description="The seed the align stage trains with; null: each run seed's own. A fixed seed starts every run "
        "seed from one aligned model, as the paper starts every seed from one released instruct model (trained "
        "once and reused from the align cache; with the cache off each seed trains the same model again).",
    )
    cache: bool = Field(
        True,
        description="Reuse an aligned model an earlier run trained alike (same base model, rows, settings, seed, "
        "device and library versions; `gradsift.continual.align_cache`), and keep this one for later runs.",
    )

    @field_validator("data", mode="before")
    @classmethod
    def _one_or_more(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict) else value


class ArmSpec(StrictModel):
    """One way of training the stages. Built-in names need no spec; a named spec defines a new arm."""

    kind: Literal[("select", *NAMED_KINDS)] = "select"  # type: ignore[valid-type]  # every kind, from the one list
    selection: dict[str, Any] = Field(default_factory=dict, description="Overrides of the recipe's `selection:`.")
    mode: Literal["offline", "online"] | None = None
    max_grad_norm: float = Field(0.5, gt=0, description="`clip`: gradient clipping norm (the paper: 0.5).")
    kl_coef: float = Field(0.1, gt=0, description="`kl`: weight of KL(model ‖ aligned model) per response token.")
    ewc_lambda: float = Field(EWC_LAMBDA, gt=0, description="`ewc`: λ of the penalty λ/2 · Σ F (θ − θ*)².")
    fisher_rows: int = Field(128, ge=1, description="`ewc`: rows (a seeded sample) the Fisher is estimated on.")
    ewc_every_stage: bool = Field(False, description="`ewc`: also anchor at the end of each task stage.")
    olora_lambda1: float = Field(0.5, ge=0, description="`olora`: weight of Σ ‖A_prev A_newᵀ‖² (O-LoRA's 0.5).")
    olora_lambda2: float = Field(0.0, ge=0, description="`olora`: weight of ‖A_new‖² (O-LoRA's 0).")
    clean_label: str = Field(
        "benign",
        description="`clean`: train only the rows whose label (`label_column`, compared as text) is this value: the "
        "ceiling a filter of contaminated data can reach. A stage whose rows carry no label trains every row.",
    )
    match: str | None = Field(
        None,
        description="`random`: the offline `select` arm whose kept row count this subset takes, at each seed and "
        "stage (a size-matched baseline for that rule). Default: `gradsift`'s count where it is an offline arm that "
        "finished the stage, else the arm's `keep_fraction`.",
    )
    steps: Literal["kept", "full"] | None = Field(
        None,
        description="`select` / `random` arms: `kept` trains the stage's epochs over the kept rows (the paper's "
        "protocol); `full` trains as many optimizer steps as the `full` arm does on all rows (the kept rows "
        "repeated), so that a difference to `full` is not just fewer steps. Default: the recipe's `steps`.",
    )


class EvalSpec(EvalConfig):
    """`gradsift eval`'s settings (`EvalConfig`) for the evals after a stage, plus the stages' domain tasks."""

    tasks: list[str] = Field(default_factory=list, description="lm-eval tasks beside the stages' domain tasks.")
    domain: Literal[True, False, "seen"] = Field(
        True,
        description="Also evaluate every stage's domain task (the accuracy matrix); `seen`: after a task stage only "
        "the domain tasks of the stages trained so far (the matrix's lower triangle: ACC, BWT and forgetting are "
        "whole, the interference matrix and max drop lose what a stage did to tasks not yet trained; the align "
        "stage still evaluates every task, the start each is read against).",
    )
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

    generation_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None,
        description="dtype the answers are generated in (the evaluated model cast to it); null: the model's loading "
        "dtype (`scoring.dtype`). The drift is measured before the cast. bfloat16 generates about 20% faster on a "
        "CPU with bf16 instructions; float16 is meant for GPUs; a quantized model keeps its compute dtype.",
    )

    def domain_docs(self) -> int | None:
        """Documents per domain task."""
        return self.domain_limit if self.domain_limit is not None else self.limit

    def domain_apart(self) -> bool:
        """Whether the domain tasks run on their own (their own document count or answer length)."""
        return self.domain_limit is not None or self.domain_max_gen_toks is not None

    def domain_answer_length(self) -> int | None:
        """The domain tasks' answer length (null: each task's own)."""
        return self.domain_max_gen_toks if self.domain_apart() else self.max_gen_toks


class EvalsSpec(StrictModel):
    after_each_stage: EvalSpec = Field(default_factory=EvalSpec)
    final: EvalSpec | None = Field(
        None,
        description="After the last stage and of the aligned model (every arm's start), instead of "
        "`after_each_stage`.",
    )


def arm_dict(value: Any) -> Any:
    """`arms: [full, random, gradsift]` is short for built-in arms without options."""
    return {name: {} for name in value} if isinstance(value, list) else value


class Recipe(StrictModel):
    """A recipe's schema. `gradsift.continual.load_recipe` reads one from a file and adds the checks between its
    fields (`gradsift.continual.checks`); validating this model alone checks each field by itself."""

    name: str = Field(description="The run's name; the default run folder is `runs/<name>`.")
    model: str
    reference_model: str | None = Field(None, description="Pretrained reference for drift; default: `model`.")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    lora: LoraSpec = Field(default_factory=LoraSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    align: AlignSpec | None = None
    stages: list[StageSpec] = Field(min_length=1)
    scoring: ScoringConfig = Field(
        default_factory=ScoringConfig, description="gradsift `scoring:` options; `model` and `device` default to the "
        "recipe's.",
    )  # fmt: skip
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
    label_column: str | None = Field(
        "kind",
        description="A column of the stages' rows that labels them (e.g. `kind: harmful|benign`): never trained, "
        "carried into each stage's `dropped.jsonl`, and, for a stage mixing two or more labels, counted in its "
        "`selection.json` and record and per arm in the report; what the `clean` arm keeps by. null: none.",
    )
    drift_prompts: int = Field(
        16, ge=0, description="Benign align-set rows (`kind: benign`, or not a refusal) for the KL drift measure."
    )
    # Where relative data paths start (the recipe file's folder), and the indices of the stages that failed their
    # schema and were replaced by stand-ins while `load_recipe` collects the other problems.
    _base: Path | None = PrivateAttr(None)
    _invalid_stages: frozenset[int] = PrivateAttr(frozenset())

    def read_from(self, folder: Path) -> None:
        """Make `folder` (the recipe file's) where relative data paths start."""
        self._base = folder

    def mark_stand_ins(self, stages: frozenset[int]) -> None:
        """Mark the stages that failed their schema and hold stand-ins (`load_recipe`, collecting problems)."""
        self._invalid_stages = stages

    @property
    def base_dir(self) -> Path:
        """Where relative data paths start: the recipe file's folder, else the current one."""
        return self._base or Path.cwd()

    @field_validator("name")
    @classmethod
    def _folder_name(cls, value: str) -> str:
        return _segment(value, "the recipe name (the default run folder `runs/<name>`)")

    @field_validator("label_column")
    @classmethod
    def _label_name(cls, value: str | None) -> str | None:
        from gradsift.store import DROPPED_FIELDS

        if value in DROPPED_FIELDS:
            raise ValueError(
                f"{value!r} names a field gradsift writes for each dropped row ({', '.join(DROPPED_FIELDS)}); name "
                "the label column otherwise"
            )
        return value

    @field_serializer("scoring")
    def _scoring_as_written(self, scoring: ScoringConfig) -> dict[str, Any]:
        return scoring.model_dump(mode="json", exclude_unset=True)  # recipe.json keeps the keys the recipe set

    @field_validator("arms", mode="before")
    @classmethod
    def _arm_list(cls, value: Any) -> Any:
        return arm_dict(value)

    def arm(self, name: str) -> ArmSpec:
        """The arm's spec: a built-in name's meaning, with what its spec sets on top (`random: {steps: full}`)."""
        spec = self.arms[name]
        if name not in BUILTIN_ARMS:
            return spec
        fraction = {"keep_fraction": self.selection.keep_fraction}
        ruled = {"random": "random", "high": "select", "low": "select", "anchor": "select"}  # rule: kind
        rules = {rule: ArmSpec(kind=kind, selection={"rule": rule, **fraction}) for rule, kind in ruled.items()}
        named = {kind: ArmSpec(kind=kind) for kind in NAMED_KINDS if kind not in rules}
        builtin = {**named, **rules, "gradsift": ArmSpec(kind="select")}[name]
        update = {field: getattr(spec, field) for field in spec.model_fields_set}
        if "selection" in update:
            update["selection"] = {**builtin.selection, **spec.selection}
        return builtin.model_copy(update=update)

    def is_offline_select(self, arm: str) -> bool:
        """Whether `arm` selects once per stage from offline scores (a `select` arm not in `mode: online`)."""
        spec = self.arm(arm)
        return spec.kind == "select" and (spec.mode or self.mode) != "online"

    def selection_for(self, arm: str) -> SelectionConfig:
        """The arm's selection: the recipe's `selection:` with the arm's overrides; a `random` arm's rule is
        `random` unless it sets one (which `checks.arm_selections` then refuses)."""
        spec = self.arm(arm)
        kind = {"rule": "random"} if spec.kind == "random" else {}
        return SelectionConfig(**{**self.selection.model_dump(), **kind, **spec.selection})

    def train_for(self, stage: StageSpec | AlignSpec) -> TrainSpec:
        return TrainSpec(**{**self.train.model_dump(), **stage.train})

    def scoring_config(self) -> ScoringConfig:
        scoring = {"model": self.model, "device": self.device, **self.scoring.model_dump(exclude_unset=True)}
        anchor = self.scoring.anchor_data
        if anchor and not is_packaged(anchor):  # a path, from the recipe's folder like its data
            scoring["anchor_data"] = str(resolve_path(anchor, self.base_dir))
        return ScoringConfig(**scoring)

    def align_seed(self, seed: int) -> int:
        """The seed run seed `seed`'s align stage trains with (`align.seed`, else `seed`)."""
        return self.align.seed if self.align is not None and self.align.seed is not None else seed

    def final_evals_at(self, index: int) -> bool:
        """Whether stage `index` (0: the align stage) runs `evals.final`: the last task stage, and the align stage,
        every arm's starting point, so that each report row of the final stage has the aligned model's number to be
        read against. The others run `evals.after_each_stage`."""
        return index == 0 or index == len(self.stages)

    def eval_tasks(self, index: int) -> tuple[EvalSpec, list[str]]:
        """The eval settings and lm-eval tasks of stage `index` (0: the align stage)."""
        final = self.final_evals_at(index)
        spec = self.evals.final if final and self.evals.final is not None else self.evals.after_each_stage
        tasks = list(spec.tasks)
        if spec.domain:
            stages = self.stages[:index] if spec.domain == "seen" and index > 0 else self.stages
            tasks += [t for t in (stage.domain_task() for stage in stages) if t and t not in tasks]
        return spec, tasks

    def valid_stages(self) -> Iterator[tuple[int, StageSpec]]:
        """(index, stage) of the stages that passed their schema: all of them, outside `load_recipe`."""
        return ((i, stage) for i, stage in enumerate(self.stages) if i not in self._invalid_stages)


class RecipeError(UserError):
    """Every problem found in a recipe, each with its YAML path, separated by `;` (one per line)."""


def error_lines(error: ValidationError, prefix: str = "", raw: Any = None) -> list[str]:
    """One `yaml.path: message` per pydantic error, under `prefix` (the key the validated mapping sits at). With
    `raw` (what was validated), a path says what was written: a source given as one mapping, not a list of one, has
    no list index (`stages.1.data`, not `stages.1.data.0`)."""
    lines = []
    for item in error.errors():
        loc = written_loc(item["loc"], raw) if raw is not None else item["loc"]
        where = ".".join(str(part) for part in (prefix, *loc) if part != "") or "(top level)"
        message = str(item["msg"]).removeprefix("Value error, ")
        received = item.get("input")
        shown = "" if item["type"] in ("missing", "value_error") else f" (got {received!r})"
        if item["type"] == "extra_forbidden":
            message = "not a recipe key; check the spelling against the recipe schema in the README"
        lines.append(f"{where}: {message}{shown}")
    return lines


def written_loc(loc: tuple[Any, ...], raw: Any) -> tuple[Any, ...]:
    """`loc` less the list indices a one-or-more field added where `raw` holds a mapping, not a list."""
    out: list[Any] = []
    node = raw
    for part in loc:
        if isinstance(part, int) and isinstance(node, dict):
            continue  # the field turned this one mapping into a list of one
        out.append(part)
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            node = None
    return tuple(out)


def gradsift_config_for(recipe: Recipe, arm: str, train: TrainSpec, stage_index: int = 1) -> GradSiftConfig:
    """The gradsift config an arm's stage scores and selects with (the online mode logs to `ONLINE_LOG`).

    The anchor pass runs where its columns are read. Stage 1's scores are shared by every select arm of a seed, so
    they carry the anchor columns whenever the recipe names `scoring.anchor_data`; a later stage scores with the arm's
    own adapter and takes the anchor pass only when the arm's selection reads it (the `anchor` rule or
    `min_anchor_cos`). The refusal probe runs only where a selection reads it (`max_refusal_logprob`): at stage 1
    where any select arm does (the scores stay shared), at a later stage where this arm does.
    """
    spec = recipe.arm(arm)
    selection = recipe.selection_for(arm)
    scoring = recipe.scoring_config()
    if stage_index > 1 and not reads_anchor(selection):
        scoring = scoring.model_copy(update={"anchor_data": None})
    readers = (
        [selection]
        if stage_index > 1
        else [recipe.selection_for(a) for a in recipe.arms if recipe.arm(a).kind == "select"]
    )
    scoring = scoring.model_copy(update={"refusal_probe": any(s.max_refusal_logprob is not None for s in readers)})
    return GradSiftConfig(
        mode=spec.mode or recipe.mode,
        data=DataConfig(max_length=train.max_length),
        scoring=scoring,
        selection=selection,
        online={"log_file": ONLINE_LOG},
    )
