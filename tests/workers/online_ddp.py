"""Train a few online-selection steps, alone or as one rank of `torchrun` (gloo, CPU); run by tests/test_online_ddp.py.

Rank 0 writes the trained LoRA weights (`lora.safetensors`), whether `reuse` was chosen (`info.json`) and the online
selection log (`online.jsonl`, one record per step over the whole global window) into `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import datasets
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from gradsift.config import GradSiftConfig
from gradsift.integrations.trl import GradSiftSFTTrainer
from gradsift.models import fresh_lora

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest
from conftest import sft_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--update", default="auto")
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = fresh_lora(AutoModelForCausalLM.from_pretrained(args.model), 4, 8, "all-linear", seed=1)
    generator = torch.Generator().manual_seed(2)  # a LoRA B that is not zero, so every LoRA weight has a gradient
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()]
    sft = sft_config(  # the trainer tests' exact SGD settings, three steps, batches in dataset order
        Path(args.out),
        output_dir=args.out,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.accumulation,
        max_steps=args.steps,
        train_sampling_strategy="sequential",  # the global batches are then the same however many ranks
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        disable_tqdm=True,
    )
    config = GradSiftConfig(
        mode="online",
        selection={"keep_fraction": 0.5},
        online={"update": args.update, "log_file": "online.jsonl"},
    )
    trainer = GradSiftSFTTrainer(
        model=model,
        args=sft,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        gradsift_config=config,
    )
    trainer.train()
    if int(os.environ.get("RANK", "0")) == 0:
        lora = trainer.accelerator.unwrap_model(trainer.model)
        weights = {name: p.detach().contiguous() for name, p in lora.named_parameters() if p.requires_grad}
        save_file(weights, str(Path(args.out) / "lora.safetensors"))
        info = {"reuse": trainer.gradsift_reuse, "world_size": sft.world_size, "steps": trainer.state.global_step}
        (Path(args.out) / "info.json").write_text(json.dumps(info))


if __name__ == "__main__":
    main()
