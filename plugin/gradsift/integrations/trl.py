"""TRL integration: filter a dataset before `SFTTrainer`, or select inside every step with `GradSiftSFTTrainer`.

```python
kept, report = select_dataset(dataset, model, tokenizer, GradSiftConfig(), sft_config=sft_config)
trainer = SFTTrainer(model=model, args=sft_config, train_dataset=kept, processing_class=tokenizer)
```
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from trl import SFTTrainer

from gradsift.config import DataConfig, GradSiftConfig
from gradsift.data import load_source
from gradsift.hardware import warn_slow_bf16
from gradsift.models import scoring_view
from gradsift.online import OnlineSelectionMixin
from gradsift.pipeline import ScoreResult, score_and_select
from gradsift.selection import Selection, kept_indices
from gradsift.store import dropped_entries
from gradsift.table import ScoreTable
from gradsift.tokenization import tokenize_records

logger = logging.getLogger(__name__)

__all__ = ["GradSiftSFTTrainer", "SelectionReport", "data_config_for", "select_dataset"]


@dataclass
class SelectionReport:
    """What `select_dataset` did: every row's scores, the selection with its reasons, and the kept positions."""

    table: ScoreTable
    selection: Selection
    kept_indices: np.ndarray
    reused_scores: bool

    def summary(self) -> str:
        """The one-line summary, e.g. `kept 2,000/10,000 (20.0%); dropped 6,792 far_from_median, ...`."""
        return self.selection.summary()

    def dropped(self) -> list[dict[str, Any]]:
        """Each dropped row's position, sample id, reason, scores and status (as in `dropped.jsonl`)."""
        return dropped_entries(self.table, self.selection)


def data_config_for(config: DataConfig, sft_config: Any | None) -> DataConfig:
    """Take `max_length` and the loss flags from an `SFTConfig`, so that the scored tokens are the trained tokens."""
    if sft_config is None:
        return config
    completion_only = sft_config.completion_only_loss
    return config.model_copy(
        update={
            "max_length": sft_config.max_length if sft_config.max_length is not None else 10**9,
            "completion_only_loss": True if completion_only is None else bool(completion_only),
            "assistant_only_loss": bool(sft_config.assistant_only_loss),
        }
    )


def select_dataset(
    dataset: Any,
    model: Any,
    tokenizer: Any,
    config: GradSiftConfig | None = None,
    sft_config: Any | None = None,
    *,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[Any, SelectionReport]:
    """Score `dataset` and return its kept rows in the dataset's own format, with a `SelectionReport`.

    Args:
        dataset: a `datasets.Dataset` (prompt/completion, conversational or not, or `messages` rows) or a file path.
        model: a PEFT model (scored on its trainable parameters), a plain model (scored under a temporary fresh LoRA,
            removed afterwards), or None to load `config.scoring.model`.
        tokenizer: the tokenizer `SFTTrainer` will use.
        config: gradsift's config; `config.data` is overridden by `sft_config` where they overlap.
        sft_config: the `SFTConfig` of the training run: its `max_length`, `completion_only_loss` and
            `assistant_only_loss` decide which tokens are scored.
        cache_dir: where to cache scores (reused when model, data and scoring config match); a temporary folder if
            None.
        progress: show a progress bar.
    """
    config = config or GradSiftConfig()
    if sft_config is not None:
        warn_slow_bf16(
            getattr(sft_config, "bf16", False), sft_config.device, "The SFTConfig's `bf16=True` (TRL's default)"
        )
    config = config.model_copy(update={"data": data_config_for(config.data, sft_config)})
    source = load_source(dataset, split=config.data.split)
    rows = tokenize_records(source.records, tokenizer, config.data, progress=progress)
    with tempfile.TemporaryDirectory(prefix="gradsift-") as scratch:
        folder = Path(cache_dir) if cache_dir is not None else Path(scratch)
        if model is None:
            result, selection = _score(rows, None, tokenizer, config, folder, source, progress)
        else:
            with scoring_view(model, config.scoring) as scoring_model:
                result, selection = _score(rows, scoring_model, tokenizer, config, folder, source, progress)
    keep = kept_indices(selection, result.table)
    logger.info("gradsift: %s", selection.summary())
    kept = source.dataset.select(keep.tolist()) if source.dataset is not None else _from_records(source, keep)
    return kept, SelectionReport(result.table, selection, keep, result.reused)


def _score(rows, model, tokenizer, config, folder, source, progress) -> tuple[ScoreResult, Selection]:
    return score_and_select(
        rows,
        model,
        tokenizer,
        config,
        folder,
        data_path=source.path,
        data_fingerprint=source.fingerprint,
        progress=progress,
    )


def _from_records(source: Any, keep: np.ndarray) -> Any:
    import datasets

    return datasets.Dataset.from_list([source.records[i] for i in keep])


class GradSiftSFTTrainer(OnlineSelectionMixin, SFTTrainer):
    """TRL's `SFTTrainer` with the paper's online selection (Algorithm 1) in every training step.

    Pass `gradsift_config=GradSiftConfig(mode="online", selection=SelectionConfig(keep_fraction=0.2))`; every other
    argument is `SFTTrainer`'s. Each step's kept fraction and norm quantiles are logged, and a per-step record goes to
    `<output_dir>/gradsift_online.jsonl`.
    """
