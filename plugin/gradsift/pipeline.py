"""The one path from tokenized rows to scores (cached, resumable) to a keep mask. Every caller goes through here."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from gradsift.anchors import anchor_rows, uses_anchor
from gradsift.config import GradSiftConfig, ScoringConfig
from gradsift.data import require_rows
from gradsift.distributed import Team, assign_shards
from gradsift.errors import UserError
from gradsift.locking import folder_lock
from gradsift.models import model_fingerprint, resolved_settings, tokenizer_fingerprint
from gradsift.scoring import anchor_gradient, score_rows
from gradsift.selection import Selection, apply_selection
from gradsift.store import ScoreStore, read_table
from gradsift.table import STATUS_OK, ScoreTable
from gradsift.tokenization import TokenizedRow, rows_fingerprint

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
    anchor: Sequence[TokenizedRow] | None = None,
) -> dict[str, Any]:
    """Collect what identifies a scoring run: model, adapter, tokenizer, data, tokenized rows, scoring config and the
    tokenized anchor set (None without one).

    With a `model` object (a caller's live model), its fingerprint hashes its config, its trainable weights and a
    sample of its frozen ones; with none, the model is identified from its files by `scoring.model`. The scoring
    config is identified by its resolved device type, dtype and quantization (`auto` differs between CPU and GPU),
    which the manifest also records as `scoring_resolved`.
    """
    resolved = resolved_settings(config.scoring, model)
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
        scoring_config=config.scoring.model_copy(update=resolved).fingerprint(),
        scoring_resolved=resolved,
        anchor_fingerprint=rows_fingerprint(anchor) if anchor else None,
    )
    return result


# Values sampled from each frozen tensor. Hashing all the weights of a 7B model (14 GB) on every run would take longer
# than scoring a small dataset; a strided sample of every tensor tells two checkpoints of one architecture apart (a
# fine-tune or another base moves nearly every weight) in milliseconds: a few hundred small copies.
FROZEN_SAMPLE_SIZE = 4096


def _object_fingerprint(model: Any) -> str:
    """Hash a live model: its config, its adapters' configs, every weight's name, dtype, shape and device type, the
    trainable weights in full, a strided sample of each frozen weight and buffer, and 4-bit quantization states."""
    digest = hashlib.sha256(str(getattr(model, "config", "")).encode())
    # The adapter's config too: LoRA alpha (its scaling) changes every norm without changing a trainable weight.
    # Sorted, sets included: a set's order changes from one process to the next.
    adapters = {name: config.to_dict() for name, config in (getattr(model, "peft_config", None) or {}).items()}
    digest.update(json.dumps(adapters, sort_keys=True, default=_sorted_or_str).encode())
    for name, param in model.named_parameters():
        digest.update(f"{name}:{param.dtype}:{tuple(param.shape)}:{param.device.type}:{param.requires_grad}".encode())
        if param.requires_grad:
            digest.update(param.detach().float().cpu().numpy().tobytes())
        else:
            digest.update(_sampled_bytes(param))
            for part in _quant_state_parts(param):
                digest.update(part)
    for name, buffer in model.named_buffers():  # e.g. GPTQ's packed weights and scales are buffers
        digest.update(f"{name}:{buffer.dtype}:{tuple(buffer.shape)}".encode())
        digest.update(_sampled_bytes(buffer))
    return digest.hexdigest()[:16]


def _sampled_bytes(tensor: Any) -> bytes:
    """The raw bytes of at most `FROZEN_SAMPLE_SIZE` evenly strided elements of `tensor` (all of a small one)."""
    import torch

    if tensor.device.type == "meta":  # offloaded: no values here, its name, dtype and shape are hashed
        return b""
    flat = tensor.detach().reshape(-1)
    if flat.numel() > FROZEN_SAMPLE_SIZE:
        flat = flat[:: flat.numel() // FROZEN_SAMPLE_SIZE][:FROZEN_SAMPLE_SIZE]
    return flat.cpu().contiguous().view(torch.uint8).numpy().tobytes()


def _quant_state_parts(param: Any) -> list[bytes]:
    """A bitsandbytes 4-bit weight's quantization state (absmax scales, type, block size, original shape), or none."""
    state = getattr(param, "quant_state", None)
    if state is None or not hasattr(state, "as_dict"):
        return []
    parts = []
    for key, value in sorted(state.as_dict(packed=False).items()):
        parts.append(key.encode())
        parts.append(_sampled_bytes(value) if hasattr(value, "device") else str(value).encode())
    return parts


def _sorted_or_str(value: Any) -> Any:
    return sorted(map(str, value)) if isinstance(value, (set, frozenset)) else str(value)


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
    team: Team | None = None,
    anchor: Sequence[TokenizedRow] | None = None,
    refusals: Any = None,
) -> ScoreResult:
    """Score `rows` into `folder`, reusing a finished run of the same identity and resuming from finished shards.

    `model` is a model or a zero-argument callable that loads one; it is called only if something is left to score.
    `describe` adds entries to the manifest (e.g. the data config). With `allow_scoring=False` only a finished
    cache is accepted, else `ScoresMissing` is raised.
    Shards are consecutive slices of the rows sorted by length (longest first), so a resumed run scores exactly the
    shards a full run would have, whatever the number of processes.
    With a `team` of several processes (`gradsift.distributed.launched_team`), rank 0 starts the run, each rank scores
    its share of the unfinished shards (balanced by tokens) and writes them, and rank 0 merges every shard from the
    folder; every rank returns the merged table. Every rank must see the same `folder`.
    With `anchor` rows, each process computes the anchor set's mean gradient ḡ_A once, after loading the model, and
    every row gets `anchor_dot` and `anchor_cos` (`fingerprints` must then come from `fingerprints_for(anchor=...)`).
    With `refusals` (`refusal_answers`), every row also gets `refusal_logprob` (`gradsift.refusal_probe`).
    """
    team = team or Team()
    started = time.perf_counter()
    store = ScoreStore(folder, fingerprints)
    cached = store.cached()
    if cached is not None:
        if team.is_main:
            logger.info("Reusing cached scores in %s (same model, data and scoring config).", folder)
        return ScoreResult(cached, reused=True, rows_scored=0, seconds=time.perf_counter() - started)
    if not allow_scoring:
        raise ScoresMissing(f"No finished scores for this model, data and scoring config in {folder}.")
    with contextlib.ExitStack() as lock:
        # Rank 0 holds the folder's lock from its first write to its last; the other ranks write only shards.
        team.on_main(lambda: _lock_and_prepare(store, lock))
        run = ShardRun(rows, config, store, team, started)
        return _score_unfinished(run, model, pad_token_id, progress, describe, (anchor, refusals))


def _lock_and_prepare(store: ScoreStore, lock: contextlib.ExitStack) -> None:
    store.check_writable()  # before the lock creates the folder
    lock.enter_context(folder_lock(store.folder))
    store.prepare()


@dataclass
class ShardRun:
    """One scoring of `rows` into `store`'s folder, as every rank follows it: the shards (consecutive slices of the
    rows sorted by length, longest first, so a resumed run scores exactly the shards a full run would), the shards an
    earlier run finished, and the unfinished ones each rank scores. `finished` and `merged` are rank 0's."""

    rows: Sequence[TokenizedRow]
    config: ScoringConfig
    store: ScoreStore
    team: Team
    started: float
    shards: list[list[int]] = field(init=False)
    done: list[int] = field(default_factory=list)
    owned: list[list[int]] = field(default_factory=list)
    finished: dict[int, ScoreTable] = field(default_factory=dict)
    merged: ScoreTable | None = None

    def __post_init__(self) -> None:
        order = sorted(range(len(self.rows)), key=lambda i: (-len(self.rows[i].input_ids), i))
        size = self.config.shard_size
        self.shards = [order[k : k + size] for k in range(0, len(order), size)]

    @property
    def todo(self) -> list[int]:
        return sorted(set(range(len(self.shards))) - set(self.done))

    def rows_in(self, numbers: Sequence[int]) -> int:
        return sum(len(self.shards[k]) for k in numbers)

    def seconds(self) -> float:
        return time.perf_counter() - self.started


def _score_unfinished(
    run: ShardRun, model: Any, pad_token_id: int, progress: bool, describe: dict[str, Any] | None, extra: tuple
) -> ScoreResult:
    """Score what is left, under the folder's lock: the shards are written to the folder (or its `.rescore/`)."""
    store, team = run.store, run.team
    # `prepare` may have completed a rescore of this identity that was killed while being swapped in.
    if team.on_main(lambda: store.cached() is not None):
        return ScoreResult(_read_merged(store), reused=True, rows_scored=0, seconds=run.seconds())
    # Rank 0's view of the finished shards, taken before any rank writes a new one.
    work, run.done = team.on_main(lambda: _begin(run, describe))
    store.use(work)
    _log_start(run, work)
    tokens = {k: sum(len(run.rows[i].input_ids) for i in run.shards[k]) for k in run.todo}
    run.owned = assign_shards(tokens, team.world_size)
    mine = run.owned[team.rank]
    bar = _progress_bar(team, [len(run.shards[k]) for k in mine], run.rows_in(run.done), progress)
    tables = team.on_every_rank(
        lambda: _score_shards(run.rows, run.shards, mine, run.config, store, model, pad_token_id, bar, *extra)
    )
    bar.close()
    if team.world_size > 1:  # one line per rank, so the launcher's log shows the split
        logger.info("rank %d of %d scored %d shards (%d rows) in %.1f s", team.rank, team.world_size, len(mine),
                    run.rows_in(mine), run.seconds())  # fmt: skip
    team.on_main(lambda: _merge(run, tables))
    table = run.merged if run.merged is not None else _read_merged(store)
    return ScoreResult(table, reused=False, rows_scored=run.rows_in(run.todo), seconds=run.seconds())


def _begin(run: ShardRun, describe: dict[str, Any] | None) -> tuple[str, list[int]]:
    """Rank 0: start (or resume) the run in the store; keep its finished shards; return the work folder's name and
    their numbers for every rank."""
    extra = {"num_rows": len(run.rows), "shard_size": run.config.shard_size, "num_shards": len(run.shards)}
    run.finished = run.store.begin({**extra, "scoring": run.config.model_dump(), **(describe or {})})
    return run.store.work_name, sorted(run.finished)


def _log_start(run: ShardRun, work: str) -> None:
    if not run.team.is_main:
        return
    if work:
        logger.info(
            "%s holds finished scores of other options; they stay until this run completes (it works in %s).",
            run.store.folder,
            run.store.work,
        )
    if run.done:
        logger.info("Resuming: %d of %d shards already scored in %s.", len(run.done), len(run.shards), run.store.work)


def _merge(run: ShardRun, tables: dict[int, ScoreTable]) -> None:
    """Rank 0: every shard (its own, the other ranks' from the folder, the earlier run's) into the finished table."""
    for rank, numbers in enumerate(run.owned):
        tables.update({k: _read_shard(run.store, k, rank) for k in numbers if k not in tables})
    tables.update(run.finished)
    shards = run.shards
    table = ScoreTable.concat([tables[k] for k in range(len(shards))]) if shards else ScoreTable.empty([], [])
    summary = {
        "counts": dict(Counter(table.status.tolist())),
        "seconds": round(run.seconds(), 3),
        "world_size": run.team.world_size,
        "shards": _shard_records(shards, run.owned, run.done),
    }
    run.store.finish(table, summary)
    run.merged = table


def _shard_records(shards: list[list[int]], owned: list[list[int]], done: list[int]) -> list[dict[str, Any]]:
    """Return, per shard, the rank that scored it in this run or `resumed: true` (for the manifest)."""
    records = [{"shard": k, "rows": len(shards[k]), "rank": r} for r, numbers in enumerate(owned) for k in numbers]
    records += [{"shard": k, "rows": len(shards[k]), "resumed": True} for k in done]
    return sorted(records, key=lambda record: record["shard"])


def _progress_bar(team: Team, sizes: list[int], resumed_rows: int, progress: bool) -> Any:
    """One bar, on rank 0: over the whole dataset when alone, over its own shards when the work is split."""
    if team.world_size == 1:
        total, initial, desc = sum(sizes) + resumed_rows, resumed_rows, "scoring"
    else:
        total, initial, desc = sum(sizes), 0, f"scoring (rank 0 of {team.world_size})"
    return tqdm(total=total, initial=initial, desc=desc, unit="row", disable=not (progress and team.is_main and sizes))


def _score_shards(
    rows: Sequence[TokenizedRow],
    shards: list[list[int]],
    numbers: list[int],
    config: ScoringConfig,
    store: ScoreStore,
    model: Any,
    pad_token_id: int,
    bar: Any,
    anchor: Sequence[TokenizedRow] | None = None,
    refusals: Any = None,
) -> dict[int, ScoreTable]:
    """Score the shards `numbers`, writing each when done (the unit of resume); load the model if needed."""
    tables: dict[int, ScoreTable] = {}
    if not numbers:
        return tables
    if callable(model) and not hasattr(model, "parameters"):
        model = model()
    mean_anchor = anchor_gradient(model, anchor, config, pad_token_id) if anchor else None
    for k in numbers:
        shard_rows = [rows[i] for i in shards[k]]
        tables[k] = score_rows(model, shard_rows, config, pad_token_id, index=shards[k], bar=bar, anchor=mean_anchor)
        if refusals is not None:
            tables[k].refusal_logprob = refusal_column(model, shard_rows, tables[k], config, refusals, pad_token_id)
        store.write_shard(k, tables[k])
    return tables


def refusal_answers(config: ScoringConfig, tokenizer: Any) -> Any:
    """The refusals scoring asks each row's request (`refusal_probe.RefusalAnswers`), or None when it asks none."""
    from gradsift.refusal_probe import REFUSALS, RefusalAnswers

    if not config.probes_refusal():
        return None
    return RefusalAnswers(tokenizer, config.refusal_texts or REFUSALS)


def refusal_column(
    model: Any, rows: Sequence[TokenizedRow], table: ScoreTable, config: ScoringConfig, refusals: Any, pad: int
) -> Any:
    """`refusal_logprob` of the scored rows (NaN for a row whose status is not `ok`), in the scoring dtype."""
    import numpy as np

    from gradsift.model_mode import compute_autocast
    from gradsift.refusal_probe import best_refusal_logprobs
    from gradsift.scoring import device_of

    ok = np.flatnonzero(table.status == STATUS_OK)
    column = np.full(len(rows), np.nan)
    if len(ok):
        device = device_of(model)
        with compute_autocast(config, device):
            budget = config.token_budget(device.type)
            values = best_refusal_logprobs(model, [rows[i] for i in ok], refusals, pad, budget, config.max_batch_size)
        column[ok] = values
        if np.isnan(values).any():
            logger.warning(
                "gradsift: %d scored row(s) have no refusal_logprob: their loss covers them from the first token, so "
                "there is no request before the answer to ask (set completion_only_loss / assistant_only_loss)",
                int(np.isnan(values).sum()),
            )
    return column


def _read_shard(store: ScoreStore, number: int, rank: int) -> ScoreTable:
    path = store.shard_path(number)
    if not path.is_file():
        raise UserError(
            f"Shard {number}, scored by rank {rank}, is missing: {path} does not exist. Every process must see the "
            "same score folder; on several machines, put --out on a shared filesystem."
        )
    return read_table(path)


def _read_merged(store: ScoreStore) -> ScoreTable:
    table = store.cached()
    if table is None:
        raise UserError(
            f"Rank 0 merged the scores, but {store.folder} holds no finished scores here. Every process must see the "
            "same score folder; on several machines, put --out on a shared filesystem."
        )
    return table


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
    require_rows(rows)
    if uses_anchor(config) and not config.scoring.anchor_data:  # before a scoring pass whose scores would not do
        raise UserError(
            f"`selection.rule` {config.selection.rule!r} with `selection.min_anchor_cos` "
            f"{config.selection.min_anchor_cos} ranks rows by the anchor score: set `scoring.anchor_data` (e.g. "
            "embedded:refusals)."
        )
    if config.selection.max_refusal_logprob is not None and not config.scoring.probes_refusal():
        raise UserError(
            f"`selection.max_refusal_logprob` {config.selection.max_refusal_logprob} filters on each row's "
            "`refusal_logprob`, which this scoring does not compute: set `scoring.refusal_probe: true` (or "
            "`scoring.anchor_data`), or remove the filter."
        )
    live_model = model if model is not None and hasattr(model, "parameters") else None
    anchor = anchor_rows(config.scoring.anchor_data, tokenizer, config.data)
    refusals = refusal_answers(config.scoring, tokenizer)
    fingerprints = fingerprints_for(
        config,
        tokenizer,
        rows,
        data_path=data_path,
        data_fingerprint=data_fingerprint,
        model=live_model,
        anchor=anchor,
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
        anchor=anchor,
        refusals=refusals,
    )
    selection = apply_selection(result.table, config)
    logger.info("gradsift: %s", selection.summary())
    return result, selection


def partial_loader(load: Callable[[ScoringConfig], Any], config: ScoringConfig) -> Callable[[], Any]:
    """Return a zero-argument loader, so the model is loaded only when something is left to score."""
    return lambda: load(config)
