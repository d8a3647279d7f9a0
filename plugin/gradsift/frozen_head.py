"""The per-row response-token losses of a batch's forward, without full-vocabulary logits of every position.

Where the LM head is a frozen plain linear layer (LoRA), the decoder's hidden states at the response tokens go through
`FrozenHeadLoss`, a fused head-and-cross-entropy in chunks of tokens. Otherwise the model is asked for its logits at
the response positions only (`logits_to_keep`), or at every position where it does not take that argument.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from gradsift.data import IGNORE_INDEX
from gradsift.model_mode import scoring_mode

logger = logging.getLogger(__name__)


class FrozenHeadLoss(torch.autograd.Function):
    """Per-token cross-entropy of `hidden @ weight.T (+ bias)` for a frozen head, in chunks of tokens.

    The forward computes each chunk's logits once, its loss and `∂loss/∂hidden = (softmax − onehot) @ weight`, and
    keeps only that `[tokens, hidden]` gradient: peak memory is one chunk of logits, and the backward is a scaling.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens):  # type: ignore[override]
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        for start in range(0, hidden.shape[0], chunk_tokens):
            end = start + chunk_tokens
            logits = nn.functional.linear(hidden[start:end], weight, bias).float()
            log_z = torch.logsumexp(logits, dim=-1)
            target = targets[start:end]
            losses[start:end] = log_z - logits.gather(1, target[:, None]).squeeze(1)
            if grad_hidden is not None:
                probs = logits.sub_(log_z[:, None]).exp_()
                probs[torch.arange(len(target), device=probs.device), target] -= 1
                grad_hidden[start:end] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
        ctx.save_for_backward(grad_hidden)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):  # type: ignore[override]
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_losses[:, None].to(grad_hidden.dtype), None, None, None, None


# Tokens per chunk of `FrozenHeadLoss`: about 256 MiB of float32 logits whatever the vocabulary.
HEAD_CHUNK_ELEMENTS = 2**26


def find_frozen_head(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[nn.Module, nn.Linear] | None:
    """The decoder and a frozen plain linear head whose output is the model's logits, or None.

    Checked once per model: a model whose config post-processes its logits (Gemma's softcapping, Cohere's and Granite's
    scaling) keeps the `logits_to_keep` path, and so does any other whose logits differ from the head's on a few tokens
    of a real batch, in eval mode (a cap barely moves small logits, so the config is read first).
    """
    cached = getattr(model, "_gradsift_frozen_head", None)
    if cached is not None:
        return cached or None
    found: tuple[nn.Module, nn.Linear] | tuple = ()
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    backbone = getattr(inner, "base_model", inner)
    if (
        type(head) is nn.Linear
        and backbone is not inner
        and not any(p.requires_grad for p in head.parameters())
        and not _logits_post_processed(getattr(inner, "config", None))
        and _head_matches(model, backbone, head, batch)
    ):
        found = (backbone, head)
    model._gradsift_frozen_head = found
    return found or None


def _logits_post_processed(config: Any) -> bool:
    """Whether a model config caps or scales the head's output (Gemma 2/3, Cohere, Granite)."""
    if getattr(config, "final_logit_softcapping", None) is not None:
        return True
    return any(getattr(config, key, None) not in (None, 1, 1.0) for key in ("logit_scale", "logits_scaling"))


def _head_matches(model: nn.Module, backbone: nn.Module, head: nn.Linear, batch: dict[str, torch.Tensor]) -> bool:
    width = int(min(8, batch["attention_mask"][0].sum()))
    inputs = {"input_ids": batch["input_ids"][:1, :width], "use_cache": False}
    try:
        with scoring_mode(model), torch.no_grad():
            logits = model(**inputs).logits[0].float()
            ours = head(backbone(**inputs).last_hidden_state[0]).float()
    except Exception as error:  # noqa: BLE001 - any failure means: use the model's own forward
        logger.debug("gradsift: the decoder-and-head path is not usable (%s)", error)
        return False
    # The same matmul on the same hidden states: equal up to rounding, whatever post-processing hides in small logits.
    return logits.shape == ours.shape and bool((logits - ours).abs().max() <= 1e-5 * (1 + logits.abs().max()))


def frozen_head_losses(
    head: tuple[nn.Module, nn.Linear], batch: dict[str, torch.Tensor], targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row mean response-token losses and counts through `FrozenHeadLoss`, from the decoder's hidden states at the
    response tokens only (`head`: `find_frozen_head`'s answer)."""
    backbone, linear = head
    hidden = backbone(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state
    selected = targets != IGNORE_INDEX
    rows, columns = selected.nonzero(as_tuple=True)
    chunk = max(1, HEAD_CHUNK_ELEMENTS // linear.out_features)
    token_loss = FrozenHeadLoss.apply(
        hidden[:, :-1][rows, columns], linear.weight, linear.bias, targets[rows, columns], chunk
    )
    counts = selected.sum(dim=1)
    sums = torch.zeros(targets.shape[0], dtype=token_loss.dtype, device=targets.device).index_add(0, rows, token_loss)
    return sums / counts, counts


def forward_logits(model: nn.Module, batch: dict[str, torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
    """The model's logits at `positions` (`logits_to_keep`), or at every position for a model that ignores it."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    if getattr(model, "_gradsift_no_logits_to_keep", False):
        return model(**inputs).logits
    try:
        return model(**inputs, logits_to_keep=positions).logits
    except TypeError as error:  # an architecture without `logits_to_keep`
        if "logits_to_keep" not in str(error):
            raise
        model._gradsift_no_logits_to_keep = True
        return model(**inputs).logits


def loss_at(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row mean cross-entropy of `logits` [B, K, V] against aligned `targets` [B, K] (-100: no loss)."""
    selected = targets != IGNORE_INDEX
    rows, columns = selected.nonzero(as_tuple=True)
    token_loss = nn.functional.cross_entropy(logits[rows, columns].float(), targets[rows, columns], reduction="none")
    counts = selected.sum(dim=1)
    sums = torch.zeros(targets.shape[0], dtype=token_loss.dtype, device=targets.device).index_add(0, rows, token_loss)
    return sums / counts, counts
