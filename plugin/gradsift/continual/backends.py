"""The training backends of a recipe: TRL in-process, or one `axolotl train` per stage, fed from one mapping.

A recipe's `train:` settings mean the same under either backend; `TRAIN_KEYS` names each in TRL's `SFTConfig` and in
axolotl's config side by side, and the `clip` arm's gradient-clipping override is applied once, in `train_values`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from gradsift.config import ONLINE_LOG, GradSiftConfig
from gradsift.continual.layout import RunLayout, Step
from gradsift.continual.schema import ArmSpec, Recipe, TrainSpec

# (TrainSpec field, SFTConfig argument, axolotl key): the same setting under each backend's name.
TRAIN_KEYS = (
    ("epochs", "num_train_epochs", "num_epochs"),
    ("learning_rate", "learning_rate", "learning_rate"),
    ("batch_size", "per_device_train_batch_size", "micro_batch_size"),
    ("gradient_accumulation_steps", "gradient_accumulation_steps", "gradient_accumulation_steps"),
    ("max_length", "max_length", "sequence_len"),
    ("warmup_ratio", "warmup_steps", "warmup_ratio"),  # SFTConfig: a float in [0, 1) is a ratio of the total steps
    ("weight_decay", "weight_decay", "weight_decay"),
    ("max_grad_norm", "max_grad_norm", "max_grad_norm"),
    ("lr_scheduler_type", "lr_scheduler_type", "lr_scheduler"),
    ("bf16", "bf16", "bf16"),
    ("gradient_checkpointing", "gradient_checkpointing", "gradient_checkpointing"),
)


def device(recipe: Recipe) -> str:
    from gradsift.models import resolve_device

    return resolve_device(recipe.scoring_config())


def tokenizer(recipe: Recipe) -> Any:
    from gradsift.models import load_tokenizer

    return load_tokenizer(recipe.model)  # with a pad token (EOS when the model has none)


def base_model_spec(recipe: Recipe, step: Step) -> str:
    """The model every task stage starts from: the seed's aligned model when there is an align stage."""
    return recipe.model if recipe.align is None else str(step.layout.aligned_model(step.seed))


def load_base(recipe: Recipe, spec: str) -> Any:
    from gradsift.models import load_base_model

    return load_base_model(recipe.scoring_config().model_copy(update={"model": spec, "adapter": None}))


def fresh_lora(recipe: Recipe, model: Any, seed: int) -> Any:
    from gradsift.models import fresh_lora as attach

    lora = recipe.lora
    return attach(model, lora.r, lora.alpha, lora.target_modules, seed, dropout=lora.dropout)


def bf16(train: TrainSpec, device: str) -> bool:
    """`train.bf16` where the device computes bfloat16 natively (else float32, logged once), and for null bf16 where
    it is the default choice (`gradsift.hardware.fast_bf16`: CUDA bf16, CPU AMX)."""
    from gradsift import hardware

    if train.bf16 is not None:
        return hardware.bf16_allowed(train.bf16, device, "train.bf16")
    return hardware.fast_bf16(device)


def train_values(train: TrainSpec, spec: ArmSpec | None, device: str) -> dict[str, Any]:
    """The stage's training settings by `TrainSpec` field: bf16 resolved for the device, and a `clip` arm's norm."""
    values = train.model_dump()
    values["bf16"] = bf16(train, device)
    if spec is not None and spec.kind == "clip":
        values["max_grad_norm"] = spec.max_grad_norm
    return values


def sft_args(recipe: Recipe, train: TrainSpec, spec: ArmSpec | None, folder: Path, seed: int, progress: bool) -> Any:
    """TRL's `SFTConfig` for a stage trained in `folder` (`spec` None: the align stage)."""
    from trl import SFTConfig

    where = device(recipe)
    values = train_values(train, spec, where)
    settings = {trl: values[field] for field, trl, _ in TRAIN_KEYS}
    settings.update(
        output_dir=str(folder / "trainer"),
        seed=seed,
        data_seed=seed,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=where == "cpu",
        disable_tqdm=not progress,
        packing=False,
    )
    return SFTConfig(**settings)


def train(trainer: Any, folder: Path) -> dict[str, Any]:
    """Run a TRL trainer; keep the online log beside the stage's outputs and drop the trainer's own folder."""
    start = time.perf_counter()
    result = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    online_log = folder / "trainer" / ONLINE_LOG
    if online_log.is_file():  # the online mode's per-step record, kept beside the stage's other outputs
        shutil.move(online_log, RunLayout.online_log(folder))
    shutil.rmtree(folder / "trainer", ignore_errors=True)
    return {
        "train_loss": result.training_loss,
        "losses": losses,
        "steps": trainer.state.global_step,
        "seconds": elapsed(start),
    }


def axolotl_config(
    recipe: Recipe,
    step: Step,
    train: TrainSpec,
    spec: ArmSpec,
    rows: Path,
    online: GradSiftConfig | None,
    max_steps: int | None,
    previous_adapter: Path | None,
) -> dict[str, Any]:
    """The axolotl config of a stage: the recipe's train settings under axolotl's names, the stage's files."""
    from gradsift.models import resolve_model_path

    values = train_values(train, spec, device(recipe))
    config: dict[str, Any] = {
        "base_model": resolve_model_path(base_model_spec(recipe, step)),
        "datasets": [{"path": str(rows), "type": "chat_template", "field_messages": "messages"}],
        "chat_template": "tokenizer_default",
        "dataset_prepared_path": str(step.folder / "axolotl-prepared"),
        "output_dir": str(step.folder / "axolotl-out"),
        "val_set_size": 0,
        "adapter": "lora",
        "lora_r": recipe.lora.r,
        "lora_alpha": recipe.lora.alpha,
        "lora_dropout": recipe.lora.dropout,
        **{axolotl: values[field] for field, _, axolotl in TRAIN_KEYS},
        "optimizer": "adamw_torch",
        "seed": step.seed,
        "save_strategy": "no",
        "logging_steps": 1,
        "fp16": False,
    }
    if max_steps is not None:
        config["max_steps"] = max_steps
    if recipe.lora.target_modules == "all-linear":
        config["lora_target_linear"] = True
    else:
        config["lora_target_modules"] = recipe.lora.target_modules
    if previous_adapter is not None:
        config["lora_model_dir"] = str(previous_adapter)
    if online is not None:
        config["plugins"] = ["gradsift.integrations.axolotl.GradSiftPlugin"]
        config["gradsift"] = {
            "mode": "online",
            "selection": online.selection.model_dump(exclude_defaults=True),
            "scoring": online.scoring.model_dump(exclude_defaults=True, exclude={"model", "device"}),
        }
    config.update(recipe.axolotl)
    return config


def train_axolotl(
    recipe: Recipe,
    step: Step,
    train: TrainSpec,
    dataset: Any,
    online: GradSiftConfig | None,
    spec: ArmSpec,
    max_steps: int | None = None,
    previous_adapter: Path | None = None,
) -> dict[str, Any]:
    """Train the stage with `axolotl train`: one config per stage, continuing the previous stage's adapter."""
    import subprocess
    import sys

    rows = step.folder / "train.jsonl"
    with open(rows, "w", encoding="utf-8") as handle:
        for row in dataset:
            handle.write(json.dumps({"messages": [*row["prompt"], *row["completion"]]}, ensure_ascii=False) + "\n")
    config = axolotl_config(recipe, step, train, spec, rows, online, max_steps, previous_adapter)
    out = Path(config["output_dir"])
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
    adapter = RunLayout.adapter(step.folder)
    adapter.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy(out / name, adapter / name)
    if online is not None and (out / ONLINE_LOG).is_file():
        shutil.move(out / ONLINE_LOG, RunLayout.online_log(step.folder))
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(step.folder / "axolotl-prepared", ignore_errors=True)
    return {"backend": "axolotl", "rows": len(dataset), "seconds": elapsed(start)}


def elapsed(start: float) -> float:
    return round(time.perf_counter() - start, 2)
