"""The paper's two continual-learning baselines as loss penalties on the task stages' LoRA training.

**EWC** (Kirkpatrick et al. 2017): the loss adds `λ/2 · Σ_k Σ_p F_k,p (θ_p − θ*_k,p)²` over the trainable parameters
p and the anchors k. An anchor is a point the training is held near, with the diagonal Fisher information there: the
task stages' starting point (the aligned model with the seed's fresh LoRA, its Fisher on the align stage's rows) and,
with `ewc_every_stage`, the end of each earlier task stage (its Fisher on that stage's rows). The Fisher is the
empirical one, the mean of squared per-sample gradients of each row's mean response-token loss, computed exactly,
one row's backward at a time (gradsift's hooks measure gradient norms, not element-wise squares). At the starting
point every LoRA B is zero, so every A has zero gradient and zero Fisher there: that anchor holds the B matrices, and
with them the weight update B·A.

**O-LoRA** (Wang et al. 2023, "Orthogonal Subspace Learning for Language Model Continual Learning"): each task stage
trains a new LoRA while the earlier stages' LoRAs stay frozen and active; the loss adds
`λ1 · Σ_prev Σ_layers ‖A_prev A_newᵀ‖²` (the paper's orthogonality term, peft's A being r × d_in) and
`λ2 · Σ_layers ‖A_new‖²`. The model after stage k is the base plus the sum of the k adapters.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradsift.errors import UserError
from gradsift.fileio import atomic_path

logger = logging.getLogger(__name__)

NEW_ADAPTER = "default"  # the name of the adapter an `olora` stage trains (peft saves it at the folder's top level)


@dataclass
class Anchor:
    """An EWC anchor: the parameters θ* to stay near, and the diagonal Fisher F weighting each one, by name."""

    name: str
    theta: dict[str, Any]
    fisher: dict[str, Any]
    rows: int  # the rows the Fisher was estimated on

    def to(self, device: Any) -> Anchor:
        """The anchor with its tensors on `device` (once, not at every step)."""
        move = lambda tensors: {key: value.to(device) for key, value in tensors.items()}  # noqa: E731
        return Anchor(self.name, move(self.theta), move(self.fisher), self.rows)


def fisher_diagonal(
    model: Any, records: Sequence[dict[str, Any]], tokenizer: Any, max_length: int, progress: bool = False
) -> tuple[dict[str, Any], int]:
    """The empirical diagonal Fisher of `model`'s trainable parameters: mean over `records` of each row's squared
    gradient of its mean response-token loss (one backward per row, in eval mode), and the rows it is the mean of.
    Rows without a response token within `max_length` are left out; `UserError` if none is left."""
    import torch
    from tqdm.auto import tqdm

    from gradsift.config import DataConfig
    from gradsift.scoring import per_sample_loss
    from gradsift.tokenization import collate, tokenize_records

    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    fisher = {name: torch.zeros_like(param, dtype=torch.float32) for name, param in named}
    rows = tokenize_records(list(records), tokenizer, DataConfig(max_length=max_length), progress=False)
    device = next(model.parameters()).device
    training = model.training
    model.eval()
    counted = 0
    try:
        for row in tqdm(rows, desc="EWC Fisher", unit="row", disable=not progress):
            batch = collate([row], tokenizer.pad_token_id, device)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss, count = per_sample_loss(logits, batch["labels"])
            if int(count[0]) == 0 or not bool(torch.isfinite(loss[0])):
                continue
            grads = torch.autograd.grad(loss[0], [param for _, param in named], allow_unused=True)
            for (name, _), grad in zip(named, grads):
                if grad is not None:
                    fisher[name] += grad.detach().float() ** 2
            counted += 1
    finally:
        model.train(training)
    if not counted:
        raise UserError(
            f"The EWC Fisher set ({len(rows)} rows) has no row with a response token within {max_length} tokens; "
            "raise that stage's `max_length` (`train:`, or the stage's or align stage's own `train:`)."
        )
    logger.info("EWC Fisher: %d rows of %d had a response token", counted, len(rows))
    return {name: value / counted for name, value in fisher.items()}, counted


def anchor_here(
    model: Any, name: str, records: Sequence[dict[str, Any]], tokenizer: Any, max_length: int, progress: bool = False
) -> Anchor:
    """An anchor at `model`'s current trainable parameters, its Fisher on `records`."""
    theta = {key: param.detach().float().clone() for key, param in model.named_parameters() if param.requires_grad}
    fisher, rows = fisher_diagonal(model, records, tokenizer, max_length, progress)
    return Anchor(name, theta, fisher, rows)


def save_anchors(anchors: Sequence[Anchor], path: Path) -> None:
    """Write the anchors to one safetensors file, atomically (`<anchor>/theta/<param>`, `<anchor>/fisher/<param>`)."""
    from safetensors.torch import save_file

    tensors = {}
    for anchor in anchors:
        for key in anchor.theta:
            tensors[f"{anchor.name}/theta/{key}"] = anchor.theta[key].contiguous()
            tensors[f"{anchor.name}/fisher/{key}"] = anchor.fisher[key].contiguous()
    meta = {"anchors": json.dumps([{"name": a.name, "rows": a.rows} for a in anchors])}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_anchors(path: Path) -> list[Anchor]:
    """The anchors `save_anchors` wrote to `path`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        listed = json.loads(handle.metadata()["anchors"])
        keys = list(handle.keys())
        anchors = []
        for entry in listed:
            parts: dict[str, dict[str, Any]] = {"theta": {}, "fisher": {}}
            for key in keys:
                anchor, kind, param = key.split("/", 2)
                if anchor == entry["name"]:
                    parts[kind][param] = handle.get_tensor(key)
            anchors.append(Anchor(entry["name"], parts["theta"], parts["fisher"], int(entry["rows"])))
    return anchors


def ewc_penalty(model: Any, anchors: Sequence[Anchor], lam: float) -> Any:
    """`λ/2 · Σ_k Σ_p F_k,p (θ_p − θ*_k,p)²` at `model`'s parameters (0 without anchors; anchors on its device)."""
    import torch

    params = dict(model.named_parameters())
    device = next(model.parameters()).device
    total = torch.zeros((), device=device)
    for anchor in anchors:
        for key, fisher in anchor.fisher.items():
            if key not in params:
                raise ValueError(f"EWC anchor {anchor.name!r} holds {key!r}, which the model does not have")
            param = params[key]
            total = total + (fisher * (param.float() - anchor.theta[key]) ** 2).sum()
    return lam / 2 * total


def ewc_term(anchors: Sequence[Anchor], lam: float) -> Callable[[Any], Any]:
    """`ewc_penalty` as a function of the model, the anchors moved to the model's device once."""
    placed: dict[Any, list[Anchor]] = {}

    def term(model: Any) -> Any:
        device = next(model.parameters()).device
        if device not in placed:
            placed[device] = [anchor.to(device) for anchor in anchors]
        return ewc_penalty(model, placed[device], lam)

    return term


def olora_penalty(model: Any, lambda1: float, lambda2: float) -> Any:
    """`λ1 · Σ_prev Σ_layers ‖A_prev A_newᵀ‖² + λ2 · Σ_layers ‖A_new‖²` over the model's LoRA layers, the new adapter
    being `NEW_ADAPTER` and every other adapter of the layer a previous stage's."""
    import torch
    from peft.tuners.lora import LoraLayer

    total = torch.zeros((), device=next(model.parameters()).device)
    for module in model.modules():
        if not isinstance(module, LoraLayer) or NEW_ADAPTER not in module.lora_A:
            continue
        new = module.lora_A[NEW_ADAPTER].weight.float()
        for name in sorted(set(module.lora_A.keys()) - {NEW_ADAPTER}):
            previous = module.lora_A[name].weight.float()
            total = total + lambda1 * (previous @ new.T).pow(2).sum()
        total = total + lambda2 * new.pow(2).sum()
    return total


def olora_model(model: Any, previous: Sequence[Path]) -> Any:
    """`model` (a PeftModel with a fresh trainable adapter `NEW_ADAPTER`) with the earlier stages' adapters loaded
    beside it, frozen and active: its forward adds every adapter's update, and only the new one trains."""
    if not previous:
        return model
    names = []
    for index, path in enumerate(previous, start=1):
        name = f"stage-{index}"
        model.load_adapter(str(path), adapter_name=name, is_trainable=False)
        names.append(name)
    model.base_model.set_adapter([NEW_ADAPTER, *names])  # every adapter active together (this marks all trainable)
    for key, param in model.named_parameters():
        param.requires_grad = f".{NEW_ADAPTER}." in key and "lora_" in key
    return model


def penalty_trainer_class() -> type:
    """`SFTTrainer` whose loss adds `penalty(model)` once per optimizer step (the `ewc` and `olora` arms)."""
    from trl import SFTTrainer

    class PenaltySFTTrainer(SFTTrainer):
        def __init__(self, *args: Any, penalty: Callable[[Any], Any], **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.penalty = penalty

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
            penalty = self.penalty(self.accelerator.unwrap_model(model))
            # Trainer.training_step divides the loss by the accumulation steps unless the loss was already
            # normalised over the whole step's tokens (transformers 5.x); either way the step counts the penalty once.
            divided = (
                not self.model_accepts_loss_kwargs or num_items_in_batch is None
            ) and self.compute_loss_func is None
            if not divided:
                penalty = penalty / self.current_gradient_accumulation_steps
            loss = loss + penalty.to(loss.dtype)
            return (loss, outputs) if return_outputs else loss

    return PenaltySFTTrainer
