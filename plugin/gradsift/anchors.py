"""Safety anchor sets: rows whose mean gradient ḡ_A gives every scored row its `anchor_dot` = ⟨g_i, ḡ_A⟩.

A gradient step of size η on row i changes the anchor set's loss by about −η·⟨g_i, ḡ_A⟩: a negative `anchor_dot`
means training on row i makes the anchor answers (refusals) less likely. An anchor set is any dataset in a supported
format, or `embedded:refusals`: the 96 harmful-request → refusal rows of `recipes/data/align.jsonl` (the shipped
recipes' align stage also trains `embedded:strongreject-refusals` and `embedded:harmbench-refusals`, which are data
sources, not anchor sets).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from gradsift.config import DataConfig
from gradsift.data import Source, load_source
from gradsift.errors import UserError
from gradsift.fileio import file_fingerprint
from gradsift.tokenization import TokenizedRow, tokenize_records

EMBEDDED_REFUSALS = "embedded:refusals"
EMBEDDED = {EMBEDDED_REFUSALS: "recipes/data/align.jsonl's 96 harmful requests, each with its refusal"}


def uses_anchor(config: Any) -> bool:
    """Whether a `GradSiftConfig`'s selection reads the anchor score (the `anchor` rule or `min_anchor_cos`)."""
    return reads_anchor(config.selection)


def reads_anchor(selection: Any) -> bool:
    """Whether a `SelectionConfig` reads the anchor score: the `anchor` rule or the `min_anchor_cos` filter."""
    return selection.rule == "anchor" or selection.min_anchor_cos is not None


def shipped_file(relative: str) -> Path:
    """A file under gradsift's `recipes/` folder: the repo's in a checkout, the wheel's otherwise."""
    here = Path(__file__).resolve().parent
    for root in (here.parents[1] / "recipes", here / "recipes"):
        if (root / relative).is_file():
            return root / relative
    raise FileNotFoundError(f"gradsift's recipes/{relative} was not found beside {here}; the install is incomplete.")


def anchor_source(spec: str) -> Source:
    """The anchor rows named by `spec`: `embedded:refusals`, or a file, saved dataset or hub id like any data."""
    if spec == EMBEDDED_REFUSALS:
        path = shipped_file("data/align.jsonl")
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        records = [{"messages": row["messages"]} for row in rows if row.get("kind") == "harmful"]
        digest = hashlib.sha256(f"{file_fingerprint(path)}:harmful".encode()).hexdigest()
        return Source(records=records, kind="embedded", fingerprint=digest, path=spec)
    if spec.startswith("embedded:"):
        names = ", ".join(f"{name} ({what})" for name, what in EMBEDDED.items())
        raise UserError(f"`scoring.anchor_data` {spec!r} is not a shipped anchor set; the shipped ones: {names}.")
    return load_source(spec)


def anchor_rows(spec: str | None, tokenizer: Any, data: DataConfig) -> list[TokenizedRow] | None:
    """The anchor set tokenized with `data`'s length limit, its format detected, and its loss on the answers only (the
    anchor loss is the likelihood of the anchor answers, e.g. refusals, whatever the training data's setting); None
    without one."""
    if not spec:
        return None
    source = anchor_source(spec)
    if not source.records:
        raise UserError(f"`scoring.anchor_data` {spec!r} holds no rows; pass an anchor set with rows.")
    answers_only = {"format": "auto", "completion_only_loss": True, "assistant_only_loss": True}
    return tokenize_records(source.records, tokenizer, data.model_copy(update=answers_only), progress=False)
