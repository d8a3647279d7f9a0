"""One mapping of a recipe's train settings to both backends: TRL's `SFTConfig` and the axolotl config of a stage."""

from __future__ import annotations

import pytest

from gradsift.continual import RunLayout, Step, load_recipe
from gradsift.continual.backends import TRAIN_KEYS, axolotl_config, sft_args
from gradsift.continual.schema import TrainSpec

from conftest import recipe_dict, write_recipe

TRAIN = {
    "epochs": 3.0,
    "learning_rate": 2.0e-4,
    "batch_size": 5,
    "gradient_accumulation_steps": 3,
    "max_length": 77,
    "warmup_ratio": 0.1,
    "weight_decay": 0.01,
    "max_grad_norm": 0.7,
    "lr_scheduler_type": "cosine",
    "gradient_checkpointing": True,
    "bf16": False,
}


def test_the_mapping_names_every_train_setting():
    assert [field for field, _, _ in TRAIN_KEYS] == list(TrainSpec.model_fields)
    assert set(TRAIN) == set(TrainSpec.model_fields)


@pytest.mark.parametrize("arm, grad_norm", [("full", 0.7), ("clip", 0.5)])
def test_trl_and_axolotl_get_the_same_train_settings_and_the_clip_arms_norm(tmp_path, tiny_model_dir, arm, grad_norm):
    data = recipe_dict(model=str(tiny_model_dir), device="cpu", train=TRAIN, arms=[arm])
    recipe = load_recipe(write_recipe(tmp_path, data))
    train, spec = recipe.train_for(recipe.stages[0]), recipe.arm(arm)
    step = Step(0, arm, 1, "sentiment", RunLayout(tmp_path / "run"))
    trl = sft_args(recipe, train, spec, step.folder, step.seed, progress=False)
    axolotl = axolotl_config(recipe, step, train, spec, tmp_path / "rows.jsonl", None, None, None)
    expected = {**TRAIN, "max_grad_norm": grad_norm}
    for field, trl_name, axolotl_name in TRAIN_KEYS:
        assert getattr(trl, trl_name) == axolotl[axolotl_name] == expected[field], field
