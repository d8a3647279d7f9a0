"""`GradSiftPlugin`: score axolotl's own tokenized training rows, keep the selected ones, fix up the step count.

`axolotl preprocess` scores (and caches the scores next to the prepared dataset); `axolotl train` reuses the cached
scores, or scores on first use when there are none. With several processes and no cached scores, training stops:
one line on stderr gives the exact `axolotl preprocess <config>` to run first (ranks waiting on a long scoring pass
would hit the distributed timeout), every process exits with status 2 and the launcher reports the failed workers.
Training under several processes then reuses those scores.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NoReturn

from axolotl.integrations.base import BasePlugin
from axolotl.utils.logging import get_logger

from gradsift.integrations.axolotl.args import AxolotlGradSiftConfig
from gradsift.tokenization import TokenizedRow, assign_sample_ids

# axolotl shows INFO only from loggers under "axolotl"; its own integrations log under axolotl.integrations.
LOG = get_logger("axolotl.integrations.gradsift")


class GradSiftPlugin(BasePlugin):
    """Gradient-based sample selection for axolotl: add it under `plugins:` and configure it under `gradsift:`."""

    def __init__(self) -> None:
        super().__init__()
        self.raw_block: dict[str, Any] | None = None

    def get_input_args(self) -> str:
        return "gradsift.integrations.axolotl.args.GradSiftArgs"

    def register(self, cfg: dict) -> None:
        # axolotl later dumps its config with exclude_none, which would turn an explicit `loss_sigma: null` back
        # into the default; keep the block as written.
        block = cfg.get("gradsift")
        self.raw_block = _plain(block) if block is not None else None

    def load_datasets(self, cfg: Any, preprocess: bool = False) -> Any:
        """Load with axolotl's own loader, score, select, and return the kept rows with a recomputed step count."""
        if cfg.get("gradsift") is None:
            return None
        _cpu_device_map(cfg)
        warn_bf16(cfg)
        config = resolve_config(cfg, self.raw_block)
        if config.mode == "online":  # the trainer selects inside each step; the dataset stays whole
            return None
        from axolotl.common.datasets import TrainDatasetMeta
        from axolotl.common.datasets import load_datasets as axolotl_load_datasets
        from axolotl.loaders import load_tokenizer

        from gradsift.errors import UserError
        from gradsift.models import load_model
        from gradsift.pipeline import ScoresMissing, score_and_select
        from gradsift.selection import kept_indices
        from gradsift.store import DROPPED_FILE, SELECTION_FILE, write_dropped, write_selection

        meta = axolotl_load_datasets(cfg=cfg)
        dataset = meta.train_dataset
        tokenizer = load_tokenizer(cfg)
        rows = rows_from_dataset(dataset)
        folder = cache_dir(cfg, config)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        vocab_size = len(tokenizer)
        try:
            result, selection = score_and_select(
                rows,
                lambda: load_model(config.scoring, vocab_size=vocab_size),
                tokenizer,
                config,
                folder,
                progress=_is_main_process(),
                allow_scoring=world_size == 1,
            )
        except ScoresMissing:
            _stop(
                UserError(
                    f"gradsift has no cached scores in {folder} and this run has {world_size} processes: scoring in "
                    "one of them would make the others hit the distributed timeout. Score in one process first, "
                    f"with `{preprocess_command(cfg)}`, then run this training command again (it reuses the scores)."
                )
            )
        table = result.table
        keep = kept_indices(selection, table)
        if _is_main_process():
            write_dropped(
                folder / DROPPED_FILE,
                table,
                selection,
                lambda i: {"text": tokenizer.decode(dataset[i]["input_ids"])},
            )
            reuse = {"reused_scores": result.reused, "rows_scored": result.rows_scored}
            write_selection(folder / SELECTION_FILE, table, selection, config.selection, reuse)
        verb = "reused cached scores" if result.reused else f"scored {result.rows_scored:,} rows"
        LOG.info("gradsift: %s; %s (details in %s)", verb, selection.summary(), folder)
        kept = dataset.select(keep.tolist()).flatten_indices()  # flatten: axolotl counts tokens from the raw table
        if preprocess:
            return TrainDatasetMeta(train_dataset=kept, eval_dataset=meta.eval_dataset, total_num_steps=None)
        return TrainDatasetMeta(
            train_dataset=kept, eval_dataset=meta.eval_dataset, total_num_steps=total_steps(cfg, kept)
        )

    def get_trainer_cls(self, cfg: Any) -> type | None:
        """In online mode, axolotl's own trainer class with gradsift's per-step selection mixed in."""
        if cfg.get("gradsift") is None:
            return None
        config = resolve_config(cfg, self.raw_block)
        if config.mode != "online":
            return None
        from axolotl.core.trainers.base import AxolotlTrainer

        from gradsift.online import OnlineSelectionMixin

        LOG.info("gradsift: online selection in every step (%s window)", config.online.window)
        return type("GradSiftAxolotlTrainer", (OnlineSelectionMixin, AxolotlTrainer), {"gradsift_config": config})

    def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
        """Record what the trainer will train on (rows, sample ids, steps) next to the scores, for auditing."""
        if cfg.get("gradsift") is None or not _is_main_process():
            return
        from gradsift.store import write_json

        config = resolve_config(cfg, self.raw_block)
        if config.mode == "online":
            return
        rows = rows_from_dataset(trainer.train_dataset)
        write_json(
            {"rows": len(rows), "sample_ids": [row.sample_id for row in rows], "max_steps": trainer.args.max_steps},
            cache_dir(cfg, config) / "train.json",
        )
        LOG.info("gradsift: training on %d selected rows for %d steps", len(rows), trainer.args.max_steps)


def resolve_config(cfg: Any, raw_block: dict[str, Any] | None) -> AxolotlGradSiftConfig:
    """Validate the `gradsift:` block; scoring options it leaves unset follow the axolotl config."""
    block = dict(raw_block if raw_block is not None else _plain(cfg.get("gradsift")) or {})
    defaults: dict[str, Any] = {"model": cfg.base_model, "trust_remote_code": bool(cfg.get("trust_remote_code"))}
    if cfg.get("lora_model_dir"):
        defaults["adapter"] = cfg.lora_model_dir
    if cfg.get("adapter") in ("lora", "qlora"):
        for key in ("lora_r", "lora_alpha"):
            if cfg.get(key):
                defaults[key] = cfg[key]
        if cfg.get("lora_target_linear"):
            defaults["lora_target_modules"] = "all-linear"
        elif cfg.get("lora_target_modules"):
            defaults["lora_target_modules"] = list(cfg.lora_target_modules)
    return AxolotlGradSiftConfig.model_validate({**block, "scoring": {**defaults, **(block.get("scoring") or {})}})


def cache_dir(cfg: Any, config: AxolotlGradSiftConfig) -> Path:
    """Where the scores live: `gradsift.cache_dir`, else `<dataset_prepared_path>/gradsift`."""
    if config.cache_dir:
        return Path(config.cache_dir)
    return Path(cfg.get("dataset_prepared_path") or "last_run_prepared") / "gradsift"


def rows_from_dataset(dataset: Any) -> list[TokenizedRow]:
    """Turn axolotl's tokenized rows (`input_ids`, `labels`) into gradsift rows with sample ids."""
    rows = [
        TokenizedRow(input_ids=list(ids), labels=list(labels))
        for ids, labels in zip(dataset["input_ids"], dataset["labels"])
    ]
    assign_sample_ids(rows)
    return rows


def total_steps(cfg: Any, dataset: Any) -> int:
    """Recompute axolotl's token counts, packing efficiency and step count for the kept rows."""
    from axolotl.utils.trainer import calculate_total_num_steps

    cfg.total_num_tokens = None
    cfg.total_supervised_tokens = None
    cfg.sample_packing_eff_est = None
    steps = calculate_total_num_steps(cfg, dataset)
    return min(steps, cfg.max_steps) if cfg.get("max_steps") else steps


def preprocess_command(cfg: Any, argv: list[str] | None = None) -> str:
    """The command that scores this config in one process: axolotl's preprocess on the config file this run was given,
    with the same config overrides (`--key value` after the config path, as `axolotl train` passes them on)."""
    import shlex
    import sys

    path = cfg.get("axolotl_config_path")
    if not path:
        return "axolotl preprocess <your config.yaml>"
    args = sys.argv[1:] if argv is None else argv
    overrides = args[1:] if args and args[0] == str(path) else []
    return shlex.join(["axolotl", "preprocess", str(path), *overrides])


def _stop(error: Exception) -> NoReturn:
    """End every process on a user's mistake: its message as one line on stderr from the main process (every rank
    reaches the same mistake on the same data), then status 2 in every process, without a traceback. The other ranks
    wait for that line first, so that a launcher that stops the rest once one process has ended cannot cut it off."""
    import sys

    import torch.distributed as dist

    if _is_main_process():
        print(f"gradsift: {error}", file=sys.stderr, flush=True)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    raise SystemExit(2)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def warn_bf16(cfg: Any) -> None:
    """One warning when the config trains under bfloat16 on a CPU without it natively (`gradsift.hardware`)."""
    import torch

    from gradsift.hardware import warn_slow_bf16

    device = "cuda" if torch.cuda.is_available() and cfg.get("device") != "cpu" else "cpu"
    warn_slow_bf16(cfg.get("bf16") is True, device, "axolotl's `bf16: true`")


def _cpu_device_map(cfg: Any) -> None:
    """Several processes on a machine without an accelerator: axolotl maps each rank's model to the device index
    LOCAL_RANK, which names no device there. Map it to the CPU, where `cfg.device` says it runs (the model loads after
    the datasets, so this is in time)."""
    if (
        cfg.get("device") == "cpu"
        and isinstance(cfg.get("device_map"), dict)
        and int(os.environ.get("WORLD_SIZE", "1")) > 1
    ):
        cfg.device_map = {"": "cpu"}
