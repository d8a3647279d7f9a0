"""Configuration models: the single source of truth for every gradsift option and its default.

The same `GradSiftConfig` drives the CLI (each field is a `--kebab-case` flag), the axolotl plugin (under the
nested YAML key `gradsift:`), the TRL helpers and the recipes.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from gradsift.errors import UserError

# Every data format, with the columns its rows need: the one list of formats. `DataConfig.format` takes these names or
# `auto`; `gradsift.data` checks a row of each (`ROW_CHECKS`), `gradsift.tokenization` tokenizes it (`TOKENIZERS`).
FORMAT_COLUMNS = {
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "alpaca": ("instruction", "output"),
    "tokenized": ("input_ids", "labels"),
}
DataFormat = Literal[("auto", *FORMAT_COLUMNS)]  # type: ignore[valid-type]  # the same Literal, from the one list


# `scoring.max_tokens_per_batch: auto` per device type: the fastest budget of a sweep with the embedded model on the
# testbed's rows (`python bench/budget_bench.py`, recorded in bench/README.md). Batches past the CPU's caches lose
# more than fewer, larger matmuls gain. Device types not swept yet keep the budget the earlier figures used.
AUTO_TOKEN_BUDGETS = {"cpu": 1024}
DEFAULT_TOKEN_BUDGET = 4096

# The online mode's per-step record, under the trainer's output_dir (the default of `online.log_file`).
ONLINE_LOG = "gradsift_online.jsonl"


class StrictModel(BaseModel):
    """The base of every gradsift config and recipe model: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class DataConfig(StrictModel):
    """How rows are read and tokenized, so that the scored tokens are the tokens training sees."""

    format: DataFormat = Field(
        "auto",
        description="Row format. `auto` detects it from the columns: `prompt`+`completion`, `messages`, "
        "`instruction`+`output` (alpaca), or `input_ids`+`labels` (pre-tokenized).",
    )
    max_length: int = Field(
        1024,
        ge=1,
        description="Tokens kept per row (the start is kept, like TRL); longer rows are marked `truncated`.",
    )
    split: str = Field(
        "train",
        description="Split to read from a hub dataset id, a saved dataset folder with splits, or a packaged source "
        "(`embedded:alpaca-gpt4-demo`: `align`, `dev`, `test` or `train`; `embedded:gsm8k`, `embedded:medmcqa`: "
        "`train`, `dev` or `test`).",
    )
    completion_only_loss: bool = Field(
        True, description="prompt/completion and alpaca rows: loss on the completion only (TRL's default)."
    )
    assistant_only_loss: bool = Field(
        True, description="`messages` rows: loss on assistant turns only (each with its end-of-turn token)."
    )


class ModelConfig(StrictModel):
    """A model to load, and how: scoring, `gradsift eval` and `gradsift judge` share these settings."""

    model: str | None = Field(
        None,
        description="The model: a hub id, a local folder, or `embedded:smollm2-135m-instruct`.",
    )
    adapter: str | None = Field(
        None,
        description="An existing PEFT adapter folder applied to the model (scoring: instead of a fresh LoRA, e.g. "
        "last stage's).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Compute dtype. `auto` = bfloat16 on a CUDA GPU that computes it natively (not a T4 or V100, "
        "where it is emulated), else float32.",
    )
    quantization: Literal["auto", "nf4", "none"] = Field(
        "auto",
        description="Base-model quantization. `auto` = nf4 (bitsandbytes 4-bit, QLoRA) on a CUDA GPU, none on CPU "
        "(bitsandbytes' CPU 4-bit path is a slow fallback).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="`auto` = cuda when available, else cpu.")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub. Off unless you set it.")

    def label(self, field: str) -> str:
        """How a message names one of these settings: the flag, here (a subclass names its config key)."""
        return f"`--{field.replace('_', '-')}`"


class ScoringConfig(ModelConfig):
    """Which model scores the rows, and how per-sample losses and gradient norms are computed."""

    def label(self, field: str) -> str:
        return f"`scoring.{field}`"

    param_scope: Literal["lora", "all"] = Field(
        "lora",
        description="Parameters whose gradient norm is measured: `lora` (the adapter) or `all` (every weight of the "
        "model's linear and embedding layers; unquantized models only).",
    )
    lora_r: int = Field(16, ge=1, description="Rank of the fresh scoring LoRA.")
    lora_alpha: float = Field(32.0, gt=0, description="Alpha of the fresh scoring LoRA (scaling = alpha / r).")
    lora_target_modules: list[str] | str = Field(
        "all-linear", description="Modules the fresh LoRA wraps: a list of names or `all-linear`."
    )
    lora_seed: int = Field(
        0, description="Seed of the fresh LoRA's initialisation (its A matrices are the projection)."
    )
    method: Literal["batched", "loop"] = Field(
        "batched", description="`batched` (hooks, one backward per batch) or `loop` (batch size 1, the reference)."
    )
    norm_method: Literal["auto", "direct", "ghost"] = Field(
        "auto",
        description="Per-layer norm computation: `direct` (materialise g_iᵀa_i), `ghost` (Gram identity), or `auto` "
        "(the cheaper one per layer and batch).",
    )
    max_tokens_per_batch: int | Literal["auto"] = Field(
        "auto",
        description="Token budget of one batch (rows × longest row, padding included); `auto`: the fastest budget "
        "measured for the device type (1024 on a CPU, 4096 elsewhere).",
    )
    max_batch_size: int = Field(32, ge=1, description="Most rows in one batch.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward to save memory.")
    shard_size: int = Field(256, ge=1, description="Rows per result shard; a killed run resumes from finished shards.")
    anchor_data: str | None = Field(
        None,
        description="A safety anchor set (a data file, saved dataset, hub id, or `embedded:refusals`: the shipped "
        "harmful requests with refusals). Each row then also gets `anchor_dot` = ⟨g_i, ḡ_A⟩ with the anchor set's "
        "mean gradient, and `anchor_cos`, from the same pass. null = none.",
    )

    refusal_probe: bool | None = Field(
        None,
        description="Also give each row `refusal_logprob`: the log-probability that the model opens its answer to the "
        "row's request with a refusal (the best, over `refusal_texts`, of their first 3 tokens' summed "
        "log-probability; forward only), for finding harmful rows. null: with `anchor_data`.",
    )
    refusal_texts: list[str] | None = Field(
        None,
        min_length=1,
        description="The refusals `refusal_probe` asks; one of fewer than 3 tokens does not count (null: gradsift's "
        "six, `gradsift.harmful_sets.PROBE_REFUSALS`).",
    )

    @field_validator("refusal_texts")
    @classmethod
    def _texts(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(not text.strip() for text in value):
            raise ValueError(
                'a refusal text is empty; give the refusal the model would write, e.g. "I can\'t help with that."'
            )
        return value

    def probes_refusal(self) -> bool:
        """Whether scoring computes `refusal_logprob` (`refusal_probe`, null: with `anchor_data`)."""
        return self.refusal_probe if self.refusal_probe is not None else self.anchor_data is not None

    @field_validator("max_tokens_per_batch", mode="before")
    @classmethod
    def _budget(cls, value: Any) -> Any:
        """One error for a bad budget, not one per member of `int | "auto"`."""
        if value == "auto":
            return value
        if isinstance(value, str) and value.strip().isdigit():  # lax like the other whole-number options
            value = int(value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        raise PydanticCustomError("token_budget", "input should be a whole number of tokens ≥ 1 or 'auto'")

    def token_budget(self, device_type: str) -> int:
        """The token budget of one batch on a device type (`cpu`, `cuda`, ...): the number set, or for `auto` the
        measured one (`AUTO_TOKEN_BUDGETS`)."""
        if self.max_tokens_per_batch != "auto":
            return self.max_tokens_per_batch
        return AUTO_TOKEN_BUDGETS.get(device_type, DEFAULT_TOKEN_BUDGET)

    def fingerprint(self) -> str:
        """Return a hash of the fields that change the scores (not how fast they are computed).

        Take it of a resolved copy (`gradsift.models.resolved_settings`): `auto` dtype and quantization score in
        float32 on a CPU but in bfloat16 and nf4 on a GPU, and the device type changes the numerics too.
        """
        # The anchor set is identified by its tokenized rows (the manifest's `anchor_fingerprint`), not by its path.
        speed = {"model", "adapter", "max_tokens_per_batch", "max_batch_size", "anchor_data"}
        fields = self.model_dump(exclude=speed | {"refusal_probe", "refusal_texts"})
        if self.probes_refusal():  # a cache scored without the column is not these scores (and one with it is)
            from gradsift.harmful_sets import OPENING_TOKENS, PROBE_REFUSALS

            fields["refusal_probe"] = {"texts": self.refusal_texts or list(PROBE_REFUSALS), "tokens": OPENING_TOKENS}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


class SelectionConfig(StrictModel):
    """Which rows to keep, given their losses and gradient norms. See the rule table in the README."""

    rule: Literal["moderate", "drop_top", "band", "threshold", "random", "high", "low", "anchor", "all"] = Field(
        "moderate",
        description="`moderate` (the paper: loss filter, then the rows nearest the median norm), `drop_top`, `band`, "
        "`threshold`, `random`, `high`, `low`, `anchor` (the highest `anchor_dot`: needs `scoring.anchor_data`), "
        "`all` (every row the filters leave: `min_anchor_cos`, `max_refusal_logprob`).",
    )
    keep_fraction: float = Field(
        0.2, gt=0, le=1, description="Fraction of rows kept by `moderate`, `random`, `high`, `low` and `anchor` (ρ)."
    )
    loss_sigma: float | None = Field(
        1.0, gt=0, description="`moderate` keeps rows with |loss − mean| ≤ loss_sigma·std first; null disables it."
    )
    window: int | None = Field(
        None,
        ge=1,
        description="`moderate` selects inside blocks of this many shuffled rows (the paper's batch); null = all.",
    )
    drop_fraction: float | None = Field(
        None, gt=0, lt=1, description="`drop_top`: fraction of highest-norm rows dropped."
    )
    lower_quantile: float | None = Field(None, ge=0, le=1, description="`band`: lower norm quantile kept.")
    upper_quantile: float | None = Field(None, ge=0, le=1, description="`band`: upper norm quantile kept.")
    max_grad_norm: float | None = Field(None, gt=0, description="`threshold`: rows with a larger norm are dropped.")
    min_grad_norm: float | None = Field(None, ge=0, description="`threshold`: rows with a smaller norm are dropped.")
    length_strata: int | None = Field(
        None,
        ge=1,
        description="Apply the rule inside this many response-length bins: equal lengths share a bin, bins are "
        "contiguous in length and as equal in row count as the ties allow.",
    )
    min_anchor_cos: float | None = Field(
        None,
        ge=-1,
        le=1,
        description="With any rule: first drop rows whose `anchor_cos` is below this (their gradient points away "
        "from the anchor set's); needs `scoring.anchor_data`. null = off.",
    )
    max_refusal_logprob: float | None = Field(
        None,
        description="With any rule: first drop rows whose `refusal_logprob` is above this (the model would open its "
        "answer to their request with a refusal with probability above e^this: a harmful request, most likely); "
        "needs the refusal probe (`scoring.refusal_probe`, on with `scoring.anchor_data`). null = off.",
    )
    seed: int = Field(0, description="Seed of the window shuffle and of `random`.")

    @model_validator(mode="after")
    def _check_rule_parameters(self) -> SelectionConfig:
        needed = {
            "drop_top": ("drop_fraction",),
            "band": ("lower_quantile", "upper_quantile"),
            "threshold": ("max_grad_norm",),
        }.get(self.rule, ())
        missing = [name for name in needed if getattr(self, name) is None]
        if missing:
            keys = ", ".join(f"`selection.{name}`" for name in missing)
            raise ValueError(
                f"`selection.rule` {self.rule!r} needs {keys}; got none. "
                f"Set it, e.g. --{missing[0].replace('_', '-')} 0.1."
            )
        if self.window is not None and self.rule != "moderate":
            raise ValueError(
                f"`selection.window` only applies to the `moderate` rule; got rule {self.rule!r} with window "
                f"{self.window}. Remove `selection.window` or use rule moderate."
            )
        if self.rule == "band" and self.lower_quantile >= self.upper_quantile:
            raise ValueError(
                f"`selection.lower_quantile` must be below `selection.upper_quantile`; got {self.lower_quantile} and "
                f"{self.upper_quantile}."
            )
        if self.rule == "threshold" and self.min_grad_norm is not None and self.min_grad_norm >= self.max_grad_norm:
            raise ValueError(
                f"`selection.min_grad_norm` must be below `selection.max_grad_norm`; got {self.min_grad_norm} and "
                f"{self.max_grad_norm}."
            )
        return self


class OnlineConfig(StrictModel):
    """The paper's online mode (Algorithm 1): select inside every training step with the current model."""

    window: Literal["step", "micro_batch"] = Field(
        "step",
        description="`step`: select across all micro-batches of one optimizer step (the paper's batch); "
        "`micro_batch`: select inside each micro-batch.",
    )
    update: Literal["auto", "reuse", "recompute"] = Field(
        "auto",
        description="`reuse`: build the step's gradient from the kept rows' per-sample gradients of the scoring pass "
        "(no second forward and backward; single process, token cross-entropy loss, linear trainable layers such as "
        "LoRA); `recompute`: a second forward and backward on the kept rows; `auto`: reuse when possible.",
    )
    reuse_max_gb: float = Field(
        4.0,
        gt=0,
        description="`auto` recomputes instead of reusing when one selection window's per-sample gradients (rows × "
        "trainable parameters × 4 bytes) exceed this many GiB.",
    )
    anchor_refresh_steps: int | None = Field(
        None,
        ge=1,
        description="With `scoring.anchor_data`: take the anchor set's mean gradient again, with the current model, "
        "every this many optimizer steps; null = at the start of each epoch.",
    )
    log_file: str | None = Field(
        ONLINE_LOG,
        description="Per-step record (kept and dropped sample ids, norm quantiles) under the trainer's output_dir; "
        "null disables it.",
    )


class EvalConfig(StrictModel):
    """What lm-eval runs: `gradsift eval`, and a recipe's `evals.*` (which add the stages' domain tasks)."""

    tasks: list[str] = Field(
        default_factory=lambda: ["gradsift_safety_offline"],
        description="lm-eval tasks or groups (comma-separated on the command line).",
    )
    limit: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="Documents per task (lm-eval's `--limit`; a fraction of each task if below 1); null: all.",
    )
    batch_size: int = Field(8, ge=1, description="lm-eval batch size.")
    max_gen_toks: int | None = Field(
        None, ge=1, description="Answer length of every generation task; null: each task's own."
    )
    seed: int | None = Field(
        None,
        ge=0,
        description="lm-eval's random seeds (Python, numpy, torch, few-shot); null: 0, or a recipe's run seed.",
    )


class GradSiftConfig(StrictModel):
    """Everything gradsift needs: how to read the data, how to score it, and which rows to keep."""

    mode: Literal["offline", "online"] = Field(
        "offline",
        description="`offline`: score the dataset once and train on the kept rows; `online`: select inside every "
        "training step with the current model (the paper's Algorithm 1; trainers only).",
    )
    data: DataConfig = Field(default_factory=DataConfig)
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    online: OnlineConfig = Field(default_factory=OnlineConfig)


SECTIONS: dict[str, type[StrictModel]] = {
    "data": DataConfig,
    "scoring": ScoringConfig,
    "selection": SelectionConfig,
    "online": OnlineConfig,
}
# Sections the `gradsift` command exposes as flags (`online` applies to trainers only).
CLI_SECTIONS = ("data", "scoring", "selection")


def format_validation_error(error: ValidationError, prefix: str = "") -> str:
    """Turn a pydantic error into lines that name the full key, the value received and the fix."""
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in (prefix, *item["loc"]) if part != "")
        received = item.get("input")
        if item["type"] == "extra_forbidden":
            section = ".".join(key.split(".")[:-1])
            allowed = _allowed_keys(section)
            hint = f" Allowed keys: {', '.join(allowed)}." if allowed else ""
            lines.append(f"`{key}` is not a gradsift option.{hint}")
        elif item["type"] in ("value_error", "assertion_error"):
            message = str(item["msg"]).removeprefix("Value error, ")
            lines.append(message)
        else:
            default = _default_for(item["loc"])
            fix = f" Use a valid value, e.g. the default {default!r}." if default is not None else ""
            lines.append(f"`{key}`: {item['msg'][0].lower()}{item['msg'][1:]}; got {received!r}.{fix}")
    return "\n".join(lines)


def _default_for(loc: tuple) -> Any:
    """The default of the field at a pydantic error location, if it names one."""
    names = [part for part in loc if isinstance(part, str)]
    if len(names) >= 2 and names[-2] in SECTIONS:
        field = SECTIONS[names[-2]].model_fields.get(names[-1])
        return None if field is None else field.default
    return None


def _allowed_keys(section: str) -> list[str]:
    name = section.split(".")[-1] if section else ""
    if name in SECTIONS:
        return sorted(SECTIONS[name].model_fields)
    if name in ("", "gradsift"):
        return sorted(GradSiftConfig.model_fields)
    return []


def load_config(data: dict[str, Any] | None) -> GradSiftConfig:
    """Validate a nested mapping into a `GradSiftConfig`, raising a `UserError` that names every bad key at once."""
    try:
        return GradSiftConfig.model_validate(data or {})
    except ValidationError as error:
        raise UserError(format_validation_error(error)) from None


def options_markdown(sections: tuple[str, ...] = tuple(SECTIONS)) -> str:
    """Return the README's option tables, generated from the schema (so docs and defaults cannot disagree)."""
    out = []
    for section in sections:
        out.append(f"**`{section}`** ({SECTIONS[section].__doc__.splitlines()[0].rstrip('.')})\n")
        out.append("| key | flag | default | meaning |\n|---|---|---|---|")
        for name, field in SECTIONS[section].model_fields.items():
            default = "null" if field.default is None else json.dumps(field.default)
            flag = f"`--{name.replace('_', '-')}`" if section in CLI_SECTIONS else "(trainers)"
            description = (field.description or "").replace("|", "\\|")
            out.append(f"| `{section}.{name}` | {flag} | `{default}` | {description} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def sync_readme(path: str, begin: str = "<!-- options:begin -->", end: str = "<!-- options:end -->") -> bool:
    """Rewrite the generated option tables between the markers of a README; return whether it changed."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    new = f"{head}{begin}\n{options_markdown()}{end}{tail}"
    if new != text:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(new)
    return new != text
