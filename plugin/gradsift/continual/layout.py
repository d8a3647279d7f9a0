"""Every path of a run folder, in one place: `RunLayout`, the `Step` a plan is made of, and the rules that keep a run
inside what gradsift wrote.

    <out>/recipe.json                              the recipe as run (its `gradsift_version` marks a run folder)
    <out>/seed-<s>/00-align/                       model/ (merged), stage.json, eval/, shared-scores/
    <out>/seed-<s>/_shared/shared-scores/          stage 1's scores shared by the arms, when there is no align stage
    <out>/seed-<s>/<arm>/<NN>-<stage>/             adapter/, scores/, dropped.jsonl, selection.json, eval/,
                                                   online.jsonl, ewc.safetensors, ewc-end.safetensors (`ewc`),
                                                   stage.json (written last: the stage is finished)
    <out>/replaced/<UTC time>-<id>/seed-<s>/...    stages `--rerun-from` moved aside, and the eval/ folders of
                                                   stages evaluated again, in their places in the layout

Every stage folder carries `.gradsift-stage` from its start. A killed run resumes at the first stage without
`stage.json`, emptying that stage's folder first; gradsift empties only a folder it can tell is its own (the marker,
or, for a folder of a run older than the marker, nothing but names a stage writes) and writes only into an `<out>`
that is new, empty or a run folder.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradsift import __version__
from gradsift.errors import UserError
from gradsift.fileio import usual_mode, write_json
from gradsift.store import DROPPED_FILE, SELECTION_FILE

logger = logging.getLogger(__name__)

STAGE_FILE = "stage.json"
RUN_FILE = "recipe.json"
ALIGN_DIR = "00-align"
# Per seed, what several arms share (stage 1's scores) when there is no align folder to keep it in; not an arm.
SHARED_DIR = "_shared"
SHARED_SCORES = "shared-scores"
# Where `--rerun-from` moves the stages it retrains, and a re-evaluated stage its old eval/: never deleted.
REPLACED_DIR = "replaced"
# A stage evaluated again writes its new eval/ here first, renamed into place when complete.
EVAL_NEW = "eval.new"
# Written when a stage starts: the stage folder is gradsift's, so a resumed run may empty it.
STAGE_MARK = ".gradsift-stage"
# A stage's copy of the online mode's per-step record.
STAGE_ONLINE_LOG = "online.jsonl"
# An `ewc` arm's stage: the anchors (θ*, Fisher) its penalty held (`gradsift.continual.penalties`), and with
# `ewc_every_stage` the one estimated at its end, for the next stage.
EWC_FILE = "ewc.safetensors"
EWC_END_FILE = "ewc-end.safetensors"
# Everything a stage writes at its top level. An unfinished stage folder of a run older than STAGE_MARK is emptied
# only if it holds nothing else (and `atomic_path`'s temporary files).
STAGE_NAMES = frozenset(
    {
        STAGE_FILE,
        "adapter",
        "model",
        "scores",
        SHARED_SCORES,
        "eval",
        EVAL_NEW,
        DROPPED_FILE,
        SELECTION_FILE,
        STAGE_ONLINE_LOG,
        EWC_FILE,
        EWC_END_FILE,
        "trainer",
        "train.jsonl",
        "axolotl.yaml",
        "axolotl.log",
        "axolotl-out",
        "axolotl-prepared",
    }
)
_TEMPORARY = re.compile(r"\..+\.tmp")
_STAGE_DIR = re.compile(r"(\d+)-.+")


@dataclass(frozen=True)
class RunLayout:
    """The paths of the run folder `root`. Nothing here creates or reads a file but `finished_stages`."""

    root: Path

    @property
    def recipe_file(self) -> Path:
        return self.root / RUN_FILE

    def seed_dir(self, seed: int) -> Path:
        return self.root / f"seed-{seed}"

    def align_dir(self, seed: int) -> Path:
        return self.seed_dir(seed) / ALIGN_DIR

    def aligned_model(self, seed: int) -> Path:
        """The seed's align stage merged into the weights: what every task stage of the seed starts from."""
        return self.align_dir(seed) / "model"

    def arm_dir(self, seed: int, arm: str) -> Path:
        return self.seed_dir(seed) / arm

    def stage_dir(self, seed: int, arm: str | None, index: int, stage: str) -> Path:
        """A stage's folder: `00-align` for the align stage (`arm` None), else `<arm>/<NN>-<stage>`."""
        return self.align_dir(seed) if arm is None else self.arm_dir(seed, arm) / f"{index:02d}-{stage}"

    def shared_scores(self, seed: int, index: int, stage: str, *, aligned: bool) -> Path:
        """The cache of a stage's scores that every arm of the seed shares: in the align folder when there is one,
        so that a new align stage discards it (the cache's identity covers the adapter, not the aligned weights)."""
        holder = self.align_dir(seed) if aligned else self.seed_dir(seed) / SHARED_DIR
        return holder / SHARED_SCORES / f"{index:02d}-{stage}"

    @staticmethod
    def stage_file(stage_dir: Path) -> Path:
        return stage_dir / STAGE_FILE

    @staticmethod
    def adapter(stage_dir: Path) -> Path:
        return stage_dir / "adapter"

    @staticmethod
    def scores(stage_dir: Path) -> Path:
        return stage_dir / "scores"

    @staticmethod
    def online_log(stage_dir: Path) -> Path:
        return stage_dir / STAGE_ONLINE_LOG

    @staticmethod
    def eval_dir(stage_dir: Path) -> Path:
        return stage_dir / "eval"

    def finished_stages(self, *, links: bool = False) -> Iterator[tuple[int, str | None, int, Path]]:
        """(seed, arm or None for align, stage index, stage folder) of every finished stage, in folder order.

        Only the run's own layout is read (`seed-N/00-align`, `seed-N/<arm>/NN-<stage>`). A folder that is a link is
        followed only with `links` (reading a run, e.g. a report over seeds linked in from elsewhere), never by what
        writes into the stages (`--rejudge`).
        """

        def folders(parent: Path, pattern: str = "*") -> list[Path]:
            return sorted(p for p in parent.glob(pattern) if p.is_dir() and (links or not p.is_symlink()))

        for seed_dir in folders(self.root, "seed-*"):
            seed = int(seed_dir.name.split("-", 1)[1])
            align = seed_dir / ALIGN_DIR
            if (links or not align.is_symlink()) and self.stage_file(align).is_file():
                yield seed, None, 0, align
            for arm_dir in folders(seed_dir):
                if arm_dir.name in (ALIGN_DIR, SHARED_DIR):
                    continue
                for stage_dir in folders(arm_dir):
                    match = _STAGE_DIR.fullmatch(stage_dir.name)
                    if match and self.stage_file(stage_dir).is_file():
                        yield seed, arm_dir.name, int(match.group(1)), stage_dir

    def last_finished_stage(self, seed: int, arm: str) -> Path | None:
        """The arm's last finished stage folder in the seed (links followed: this only reads), or None."""
        found = [d for s, a, _, d in self.finished_stages(links=True) if s == seed and a == arm]
        return found[-1] if found else None


def iter_stage_files(run_dir: Path) -> Iterator[tuple[int, str | None, int, dict[str, Any]]]:
    """(seed, arm, stage index, stage.json) of every finished stage under a run folder (links followed)."""
    for seed, arm, index, stage_dir in RunLayout(run_dir).finished_stages(links=True):
        yield seed, arm, index, json.loads(RunLayout.stage_file(stage_dir).read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Step:
    """One stage of one arm and seed (the align stage: `arm` None, `index` 0) in the run folder `layout`."""

    seed: int
    arm: str | None
    index: int  # 0 for align, 1.. for task stages
    stage: str
    layout: RunLayout

    @property
    def folder(self) -> Path:
        return self.layout.stage_dir(self.seed, self.arm, self.index, self.stage)

    def done(self) -> bool:
        return RunLayout.stage_file(self.folder).is_file()


def replaced_dir(root: Path) -> Path:
    """A new folder `<root>/replaced/<UTC time>-<id>/` for what a run moves aside (never an existing one)."""
    import tempfile

    parent = root / REPLACED_DIR
    parent.mkdir(parents=True, exist_ok=True)
    made = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%dT%H%M%SZ-", time.gmtime()), dir=parent))
    usual_mode(made)
    return made


def check_run_folder(out: Path) -> None:
    """Raise `UserError` unless `out` is new, empty or a folder `gradsift run` wrote (it holds gradsift's recipe.json).

    A run writes into, and empties unfinished stage folders under, its folder: never one of the user's.
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file, not a run folder. Choose an empty or new --out folder.")
    from gradsift.locking import LOCK_NAME

    if not out.is_dir() or all(p.name == LOCK_NAME for p in out.iterdir()):
        return
    if run_metadata(out) is None:
        raise UserError(
            f"--out {str(out)!r} is not a gradsift run folder (it holds files but no recipe.json written by "
            "`gradsift run`), and a run writes and deletes inside its folder: choose an empty or new --out."
        )


def run_metadata(run_dir: Path) -> dict[str, Any] | None:
    """The recipe.json of a folder written by `gradsift run` (marked with `gradsift_version`, or with the keys a run
    wrote before that mark), or None when the folder has no such file."""
    try:
        meta = json.loads(RunLayout(run_dir).recipe_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(meta, dict) and ("gradsift_version" in meta or {"name", "stages", "arms", "recipe"} <= set(meta)):
        return meta
    return None


def clean_stage(folder: Path) -> None:
    """Start a stage in an empty folder marked as gradsift's, removing what an interrupted run of it left.

    An existing folder is emptied only if gradsift can tell it wrote it: it carries `STAGE_MARK`, or (a stage folder
    of a run older than the mark) holds nothing but names a stage writes. Anything else raises `UserError`, and
    nothing is deleted.
    """
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise UserError(
            f"{str(folder)!r} is where this stage's folder goes, but it is a file or a link, which gradsift did not "
            "write: move it away, or choose another --out."
        )
    if folder.is_dir():
        names = sorted(p.name for p in folder.iterdir())
        foreign = [n for n in names if n not in STAGE_NAMES and n != STAGE_MARK and not _TEMPORARY.fullmatch(n)]
        if names and STAGE_MARK not in names and foreign:
            raise UserError(
                f"{str(folder)!r} holds files gradsift did not write ({', '.join(foreign[:5])}), and an unfinished "
                "stage restarts in an emptied folder: move them away, or choose another --out."
            )
        if names:
            logger.info("gradsift run: %s was left unfinished; starting it again", folder)
            shutil.rmtree(folder)
    folder.mkdir(parents=True)
    mark = {"gradsift_version": __version__, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json(mark, folder / STAGE_MARK)
