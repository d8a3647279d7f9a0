"""Where a recipe's data path points: a file or folder beside the recipe or the current folder, a packaged source,
or a hub dataset id."""

from __future__ import annotations

from pathlib import Path

from gradsift.data import looks_like_file
from gradsift.errors import UserError
from gradsift.packaged import is_packaged


def _data_roots(base: Path) -> list[Path]:
    """Where a relative data path is looked for: the recipe's folder, the current one, and for a recipe shipped with
    gradsift (`recipes/*.yaml` in a checkout or the wheel) the folder holding its `recipes/`, where its data lies."""
    roots = [base.resolve(), Path.cwd()]
    package = Path(__file__).resolve().parents[1]  # gradsift/
    if roots[0] in (package.parents[1] / "recipes", package / "recipes"):  # a checkout's, the wheel's
        roots.append(roots[0].parent)
    return list(dict.fromkeys(roots))


def resolve_path(path: str, base: Path) -> Path | str:
    """A recipe's data path: a file or folder (absolute, or relative to `base` or the current folder), a packaged
    source (`embedded:<name>`, returned as it is), or a hub id.

    A path that can only mean a file (`gradsift.data.looks_like_file`) and exists nowhere raises `UserError`: it never
    silently becomes a hub dataset id.
    """
    if is_packaged(path):
        return path  # `embedded:<name>`: read by `gradsift.packaged`, never a file or a hub id
    candidate = Path(path).expanduser()
    roots = [] if candidate.is_absolute() else _data_roots(base)
    for found in [candidate] if candidate.is_absolute() else [root / candidate for root in roots]:
        if found.exists():
            return found
    if candidate.is_absolute() or looks_like_file(path):
        where = f" (looked in {' and '.join(map(str, roots))})" if roots else ""
        raise UserError(
            f"{path!r} does not exist{where}. Fix the path; a hub dataset id has one `/`, e.g. `org/name`."
        )
    return path  # a hub dataset id
