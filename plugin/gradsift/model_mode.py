"""The mode a model runs in while it is scored: dropout off with gradient checkpointing kept, and the trainer's
bfloat16 autocast where `scoring.dtype` resolves to it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
from torch import nn

from gradsift.config import ScoringConfig

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def scoring_mode(model: nn.Module) -> Iterator[None]:
    """Run with every dropout off, yet keep gradient checkpointing where the model has it; restore every flag after.

    A user's model may carry dropout (a PeftModel's `lora_dropout`, attention dropout), and transformers checkpoints a
    layer only when it is in train mode (`GradientCheckpointingLayer`: `gradient_checkpointing and training`). So the
    whole model goes to eval mode, and only the checkpointed layers are flagged as training, for their `__call__` to
    choose checkpointing; their forward, and its recomputation in the backward, run with `training` off again.
    """
    flags = {module: module.training for module in model.modules()}
    model.eval()
    for module in model.modules():
        if _is_bnb_4bit(module):
            # In eval mode on a CPU, bitsandbytes repacks 4-bit weights for a bfloat16 inference kernel, which computes
            # other numbers than training does and fails on biased layers; its flag changes nothing else.
            module.training = True
    layers = _checkpointed_layers(model)
    if not layers and getattr(model, "is_gradient_checkpointing", False):
        logger.warning(
            "gradsift: this model checkpoints outside transformers' GradientCheckpointingLayer (old-style or remote "
            "code); scoring runs it in eval mode, without gradient checkpointing, so that dropout is off."
        )
    checkpoints = {layer: layer._gradient_checkpointing_func for layer in layers}
    for layer, checkpoint in checkpoints.items():
        layer.training = True
        layer._gradient_checkpointing_func = partial(_checkpoint_in_eval, layer, checkpoint)
    try:
        yield
    finally:
        for layer, checkpoint in checkpoints.items():
            layer._gradient_checkpointing_func = checkpoint
        _restore_training_flags(flags)


def _is_bnb_4bit(module: nn.Module) -> bool:
    return any(c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes") for c in type(module).__mro__)


def _checkpointed_layers(model: nn.Module) -> list[nn.Module]:
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # a transformers without per-layer checkpointing
        return []
    return [
        module
        for module in model.modules()
        if isinstance(module, GradientCheckpointingLayer)
        and module.gradient_checkpointing
        and "_gradient_checkpointing_func" in vars(module)
    ]


def _checkpoint_in_eval(layer: nn.Module, checkpoint: Any, function: Any, *args: Any, **kwargs: Any) -> Any:
    """Checkpoint `function` (the layer's forward) with the layer's own `training` flag off whenever it runs."""
    return checkpoint(partial(_run_in_eval, layer, function), *args, **kwargs)


def _run_in_eval(layer: nn.Module, function: Any, *args: Any, **kwargs: Any) -> Any:
    # Some layers apply dropout in their own forward (`dropout(x, p, training=self.training)`, as Falcon's does).
    was_training = layer.training
    layer.training = False
    try:
        return function(*args, **kwargs)
    finally:
        layer.training = was_training


def _restore_training_flags(flags: dict[nn.Module, bool]) -> None:
    for module, training in flags.items():
        module.training = training


def compute_autocast(config: ScoringConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bfloat16 autocast when `scoring.dtype` resolves to bfloat16 (the default on a CUDA GPU), else nothing.

    A QLoRA model keeps its norms, embeddings and head in float32 (`prepare_model_for_kbit_training`), and trainers
    run it under autocast (`bf16: true`); scoring does the same, so its numerics and speed are the training step's.
    Per-sample norms are still computed in float32 by the hooks.
    """
    from gradsift.models import resolve_dtype

    if resolve_dtype(config, device.type) is not torch.bfloat16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
