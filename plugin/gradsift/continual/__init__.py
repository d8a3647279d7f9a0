"""Continual recipes: a YAML task sequence run stage by stage, once per arm and seed, with evals after each stage.

schema.py    the recipe's specs, what the built-in arm names mean, the checks between fields
loading.py   `load_recipe`: every problem of a file, each with its YAML path, before anything loads
rows.py      a stage's rows (data paths, templates, shuffling) and the drift prompts
layout.py    `RunLayout`: every path of a run folder; what a resumed run may empty
backends.py  the recipe's train settings as TRL's `SFTConfig` and as an axolotl config, side by side
arms.py      the random arm's matched subset, step matching, shared stage-1 scores, the `kl` trainer, the `ewc`
             arm's anchors and the `olora` arm's adapters
penalties.py the `ewc` and `olora` loss terms, the Fisher, and the trainer that adds them
evals.py     lm-eval and drift after each stage; `--rejudge`
runner.py    the plan and the run
"""

from gradsift.continual.layout import STAGE_FILE, RunLayout, Step, check_run_folder, iter_stage_files, run_metadata
from gradsift.continual.loading import load_recipe
from gradsift.continual.schema import BUILTIN_ARMS, ArmSpec, Recipe, RecipeError

__all__ = [
    "BUILTIN_ARMS",
    "STAGE_FILE",
    "ArmSpec",
    "Recipe",
    "RecipeError",
    "RunLayout",
    "Step",
    "check_run_folder",
    "iter_stage_files",
    "load_recipe",
    "run_metadata",
]
