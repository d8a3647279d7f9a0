"""The `kl` arm's loss: the SFT loss plus kl_coef · KL(model ‖ adapter-disabled model) per response token."""

from __future__ import annotations

import datasets
import torch
from trl import SFTConfig

from gradsift.continual import load_recipe
from gradsift.continual.arms import kl_trainer_class

from conftest import lora_model
from conftest import recipe_dict as recipe
from conftest import write_recipe as write


def test_the_kl_arm_adds_the_mean_token_kl_to_the_adapter_free_model(tmp_path, tokenizer, mixed_records):
    model = lora_model(tokenizer)
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, use_cpu=True, report_to=[])
    trainer = kl_trainer_class()(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(mixed_records[:4]),
        processing_class=tokenizer,
        kl_coef=0.5,
    )
    inputs = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        loss = trainer.compute_loss(model, inputs)
        # The obvious computation, position by position over the response tokens, with torch's own KL.
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1].double()
        with model.disable_adapter():
            ref = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1].double()
        mask = inputs["labels"][:, 1:] != -100
        kl = torch.nn.functional.kl_div(ref.log_softmax(-1), logits.log_softmax(-1), log_target=True, reduction="none")
        targets = inputs["labels"][:, 1:][mask]
        nll = torch.nn.functional.cross_entropy(logits[mask], targets)
    assert kl.sum(-1)[mask].sum() > 0
    expected = nll + 0.5 * kl.sum(-1)[mask].sum() / mask.sum()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-6)


def test_the_random_arm_ignores_the_recipes_anchor_filter(tmp_path):
    from gradsift.continual.arms import random_subset

    arms = {"random": {}, "gradsift": {}}
    loaded = load_recipe(
        write(
            tmp_path, recipe(arms=arms, scoring={"anchor_data": "embedded:refusals"}, selection={"min_anchor_cos": 0})
        )
    )
    assert loaded.selection_for("gradsift").min_anchor_cos == 0  # the scored arm filters
    assert random_subset(loaded, "random", 20, 5).num_kept == 5  # the random arm has no scores to filter
    assert random_subset(loaded, "random", 20, None).num_kept == 4  # keep_fraction 0.2 of 20


def test_the_anchor_pass_runs_in_shared_stage_one_scores_and_later_only_where_the_selection_reads_it(tmp_path):
    from gradsift.continual.schema import gradsift_config_for

    arms = {"gradsift": {}, "anchor": {}, "floor": {"selection": {"min_anchor_cos": 0.0}}}
    loaded = load_recipe(write(tmp_path, recipe(arms=arms, scoring={"anchor_data": "embedded:refusals"})))
    train = loaded.train_for(loaded.stages[0])
    anchor_data = {
        (arm, index): gradsift_config_for(loaded, arm, train, index).scoring.anchor_data
        for arm in arms
        for index in (1, 2)
    }
    assert anchor_data == {
        ("gradsift", 1): "embedded:refusals",  # stage 1's scores are shared with the arms that read the anchor
        ("gradsift", 2): None,
        ("anchor", 1): "embedded:refusals",
        ("anchor", 2): "embedded:refusals",
        ("floor", 1): "embedded:refusals",
        ("floor", 2): "embedded:refusals",
    }
