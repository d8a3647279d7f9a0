"""Aligned models kept across runs: an align stage trained once is reused by any later run that would train it alike.

The key is the sha256 of everything that made the model: the base model's fingerprint (every byte of a local
folder), the align rows in training order, the training settings (bf16 resolved for the device), the LoRA settings,
the seed, the device (the CPU's instruction set and thread count, or the GPU's name and CUDA version), the loading
dtype, the versions of the libraries that train and gradsift's own source files. Training on one CPU is
deterministic for a seed, so there a reused model is the model the run would have trained; on a GPU it is one
trained alike. An entry is a folder `<key>/` holding `model/` (the merged weights and tokenizer) and `align.json`
(the training record), written under a temporary name and renamed into place when complete, so a killed run never
leaves half an entry.

The cache lives in `$GRADSIFT_ALIGN_CACHE`, else `~/.cache/gradsift/aligned`; `GRADSIFT_ALIGN_CACHE=off` (or a
recipe's `align.cache: false`) turns it off. An entry holds a full copy of the merged model (about 0.5 GB for
SmolLM2-135M in float32, 15 GB for a 7B model in bfloat16); gradsift never removes one: delete the folder to reclaim
the space.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from gradsift.fileio import write_json

logger = logging.getLogger(__name__)

ENTRY_RECORD = "align.json"
ENTRY_MODEL = "model"
_VERSIONED = ("gradsift", "torch", "transformers", "peft", "trl", "accelerate", "datasets", "tokenizers")


def cache_root() -> Path | None:
    """The cache folder, or None when `GRADSIFT_ALIGN_CACHE` is `off`."""
    value = os.environ.get("GRADSIFT_ALIGN_CACHE", "")
    if value.lower() in ("off", "0", "false", "no"):
        return None
    return Path(value).expanduser() if value else Path.home() / ".cache" / "gradsift" / "aligned"


def align_key(identity: dict[str, Any]) -> str:
    """The entry's name: the sha256 of `identity` (what made the model), the library versions and gradsift's source
    (an editable install keeps its version number while its code changes)."""
    versions = {}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "missing"
    identity = {**identity, "versions": versions, "gradsift_source": source_digest()}
    text = json.dumps(identity, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@functools.cache
def source_digest() -> str:
    """The sha256 of gradsift's source files, read once a process (at a run's first align stage): every seed of a
    run is keyed by the code the run loaded, even when the files are edited while it runs."""
    package = Path(__file__).resolve().parents[1]
    source = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        source.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return source.hexdigest()


def fetch(key: str, model_dir: Path) -> dict[str, Any] | None:
    """Copy a cached aligned model to `model_dir` and return its training record; None when there is no entry."""
    root = cache_root()
    entry = root / key if root is not None else None
    if entry is None or not (entry / ENTRY_RECORD).is_file():
        return None
    shutil.copytree(entry / ENTRY_MODEL, model_dir)
    logger.info("gradsift run: the aligned model is reused from %s (trained alike by an earlier run)", entry)
    return json.loads((entry / ENTRY_RECORD).read_text(encoding="utf-8"))


def store(key: str, model_dir: Path, training: dict[str, Any]) -> None:
    """Keep `model_dir` and its training record as the entry `key` (complete, or not at all)."""
    root = cache_root()
    if root is None or (root / key / ENTRY_RECORD).is_file():
        return
    staging = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=root))
        shutil.copytree(model_dir, staging / ENTRY_MODEL)
        write_json(training, staging / ENTRY_RECORD)
        staging.rename(root / key)
    except OSError as error:  # a full disk or a concurrent writer: the run goes on without the cache
        logger.warning("gradsift run: the aligned model was not cached in %s (%s)", root, error)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
