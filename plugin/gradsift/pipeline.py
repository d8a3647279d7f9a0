"""The one path from tokenized rows to scores (cached, resumable) to a keep mask. Every caller goes through here."""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from gradsift.config import GradSiftConfig, ScoringConfig
from gradsift.data import TokenizedRow, rows_fingerprint
from gradsift.models import model_fingerprint, tokenizer_fingerprint
from gradsift.scoring import ScoreTable, score_rows
from gradsift.selection import Selection, select_rows
from gradsift.store import ScoreStore

logger = logging.getLogger(__name__)


class ScoresMissing(RuntimeError):
    """Raised when scoring is not allowed here (e.g. one of several processes) and no finished scores exist."""


@dataclass
class ScoreResult:
    """Scores of every row, and whether they came from the cache."""

    table: ScoreTable
    reused: bool
    rows_scored: int
    seconds: float

    def status_counts(self) -> dict[str, int]:
        """Return the number of rows per status."""
        return dict(Counter(self.table.status.tolist()))


def fingerprints_for(
    config: GradSiftConfig,
    tokenizer: Any,
    rows: Sequence[TokenizedRow],
    *,
    data_path: str | None = None,
    data_fingerprint: str | None = None,
    model: Any = None,
) -> dict[str, Any]:
    """Collect what identifies a scoring run: model, adapter, tokenizer, data, tokenized rows and scoring config.

    With a `model` object (a caller's live model), its fingerprint hashes its trainable weights and its config; with
    none, the model is identified from its files by `scoring.model`.
    """
    if model is None:
        result: dict[str, Any] = model_fingerprint(config.scoring.model, config.scoring.adapter)
    else:
        result = {
            "model": getattr(model, "name_or_path", type(model).__name__),
            "model_fingerprint": _object_fingerprint(model),
        }
    result.update(
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        data_path=data_path,
        data_fingerprint=data_fingerprint,
        rows_fingerprint=rows_fingerprint(rows),
        scoring_config=config.scoring.fingerprint(),
    )
    return result


def _object_fingerprint(model: Any) -> str:
    digest = hashlib.sha256(str(getattr(model, "config", "")).encode())
    for name, param in model.named_parameters():
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def score_cached(
    rows: Sequence[TokenizedRow],
    config: ScoringConfig,
    folder: str | Path,
    fingerprints: dict[str, Any],
    model: Any,
    pad_token_id: int,
    *,
    progress: bool = True,
    describe: dict[str, Any] | None = None,
    allow_scoring: bool = True,
) -> ScoreResult:
    """Score `rows` into `folder`, reusing a finished run of the same identity and resuming from finished shards.

    `model` is a model or a zero-argument callable that loads one; it is called only if something is left to score.
    `describe` adds entries to the manifest (e.g. the data config). With `allow_scoring=False` only a finished
    cache is accepted, else `ScoresMissing` is raised.
    Shards are consecutive slices of the rows sorted by length (longest first), so a resumed run scores exactly the
    shards a full run would have.
    """
    started = time.perf_counter()
    store = ScoreStore(folder, fingerprints)
    cached = store.cached()
    if cached is not None:
        logger.info("Reusing cached scores in %s (same model, data and scoring config).", folder)
        return ScoreResult(cached, reused=True, rows_scored=0, seconds=time.perf_counter() - started)
    if not allow_scoring:
        raise ScoresMissing(f"No finished scores for this model, data and scoring config in {folder}.")
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i].input_ids), i))
    shards = [order[k : k + config.shard_size] for k in range(0, len(order), config.shard_size)]
    finished = store.begin(
        {
            "num_rows": len(rows),
            "shard_size": config.shard_size,
            "num_shards": len(shards),
            "scoring": config.model_dump(),
            **(describe or {}),
        }
    )
    if finished:
        logger.info("Resuming: %d of %d shards already scored in %s.", len(finished), len(shards), folder)
    todo = [k for k in range(len(shards)) if k not in finished]
    tables = dict(finished)
    if todo:
        if callable(model) and not hasattr(model, "parameters"):
            model = model()
        bar = tqdm(
            total=len(rows),
            initial=sum(len(shards[k]) for k in finished),
            desc="scoring",
            unit="row",
            disable=not progress,
        )
        for k in todo:
            shard_rows = [rows[i] for i in shards[k]]
            tables[k] = score_rows(model, shard_rows, config, pad_token_id, index=shards[k], bar=bar)
            store.write_shard(k, tables[k])
        bar.close()
    table = ScoreTable.concat([tables[k] for k in range(len(shards))]) if shards else ScoreTable.empty([], [])
    elapsed = time.perf_counter() - started
    scored = sum(len(shards[k]) for k in todo)
    store.finish(table, {"counts": dict(Counter(table.status.tolist())), "seconds": round(elapsed, 3)})
    return ScoreResult(table, reused=False, rows_scored=scored, seconds=elapsed)


def score_and_select(
    rows: Sequence[TokenizedRow],
    model: Any,
    tokenizer: Any,
    config: GradSiftConfig,
    cache_dir: str | Path,
    *,
    data_path: str | None = None,
    data_fingerprint: str | None = None,
    progress: bool = True,
    allow_scoring: bool = True,
) -> tuple[ScoreResult, Selection]:
    """Score `rows` (cached in `cache_dir`) and apply `config.selection`. Logs the one-line summary.

    `model` may be a loaded model, a callable that loads one, or None to load `config.scoring.model` when needed.
    """
    if not rows:
        raise ValueError("The dataset is empty: there are no rows to score.")
    live_model = model if model is not None and hasattr(model, "parameters") else None
    fingerprints = fingerprints_for(
        config, tokenizer, rows, data_path=data_path, data_fingerprint=data_fingerprint, model=live_model
    )
    if model is None:
        from gradsift.models import load_model

        model = partial_loader(load_model, config.scoring)
    result = score_cached(
        rows,
        config.scoring,
        cache_dir,
        fingerprints,
        model,
        tokenizer.pad_token_id,
        progress=progress,
        describe={"data": config.data.model_dump()},
        allow_scoring=allow_scoring,
    )
    selection = apply_selection(result.table, config)
    logger.info("gradsift: %s", selection.summary())
    return result, selection


def apply_selection(table: ScoreTable, config: GradSiftConfig, keep_count: int | None = None) -> Selection:
    """Apply `config.selection` to a score table."""
    return select_rows(
        table.loss,
        table.grad_norm,
        table.status,
        config.selection,
        num_response_tokens=table.num_response_tokens,
        keep_count=keep_count,
    )


def partial_loader(load: Callable[[ScoringConfig], Any], config: ScoringConfig) -> Callable[[], Any]:
    """Return a zero-argument loader, so the model is loaded only when something is left to score."""
    return lambda: load(config)


def kept_indices(selection: Selection, table: ScoreTable) -> np.ndarray:
    """Return the dataset positions of the kept rows, in dataset order."""
    return np.sort(table.index[selection.keep])
