"""TRL: `select_dataset` before `SFTTrainer` trains exactly the kept rows, tokenized as gradsift scored them."""

from __future__ import annotations

import datasets
import pytest
import torch
from trl import SFTTrainer

from gradsift.config import DataConfig, GradSiftConfig, SelectionConfig
from gradsift.integrations.trl import data_config_for, select_dataset
from gradsift.tokenization import tokenize_records

from conftest import build_model, lora_model, sft_config


def chat_rows(records):
    return [
        {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
        for r in records
    ]


@pytest.mark.parametrize("form", ["prompt_completion", "messages"])
def test_sft_trainer_trains_exactly_the_kept_rows(tmp_path, tokenizer, mixed_records, form):
    records = mixed_records if form == "prompt_completion" else chat_rows(mixed_records)
    dataset = datasets.Dataset.from_list(records)
    args = sft_config(tmp_path)
    config = GradSiftConfig(selection=SelectionConfig(keep_fraction=0.25))
    model = lora_model(tokenizer)
    kept, report = select_dataset(dataset, model, tokenizer, config, sft_config=args, progress=False)
    assert kept.column_names == dataset.column_names  # the dataset's own format
    assert len(kept) == 6 == report.selection.num_kept
    assert kept.to_list() == [records[i] for i in report.kept_indices]

    trainer = SFTTrainer(model=model, args=args, train_dataset=kept, processing_class=tokenizer)
    trained = trainer.train_dataset
    ours = tokenize_records(kept.to_list(), tokenizer, data_config_for(DataConfig(), args))
    # TRL tokenized the kept rows into exactly the tokens gradsift scored, with the same loss mask.
    assert [list(ids) for ids in trained["input_ids"]] == [row.input_ids for row in ours]
    if "completion_mask" in trained.column_names:
        for mask, row in zip(trained["completion_mask"], ours):
            assert [label != -100 for label in row.labels] == [bool(m) for m in mask]
    trainer.train()
    assert trainer.state.global_step == 1


def test_select_dataset_leaves_a_plain_model_as_it_was(tokenizer, mixed_records):
    model = build_model(tokenizer)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    select_dataset(datasets.Dataset.from_list(mixed_records), model, tokenizer, progress=False)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not any("lora" in name for name, _ in model.named_parameters())
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) and param.requires_grad == flags[name]
