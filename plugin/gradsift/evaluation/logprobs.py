"""Log-probabilities of the response tokens, and the per-token KL between two models' next-token distributions
(the drift measure and the `kl` arm)."""

from __future__ import annotations

from typing import Any


def response_logprobs(model: Any, batch: dict[str, Any]) -> Any:
    """`logprobs_at_responses` of the model's logits on a collated batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logprobs_at_responses(logits, batch["labels"])


def logprobs_at_responses(logits: Any, labels: Any) -> Any:
    """log p(· | prefix) over the vocabulary at every response token (where `labels[:, 1:]` is not ignored), float32,
    one row per token: what the KL drift and the `kl` arm compare."""
    import torch

    from gradsift.data import IGNORE_INDEX

    return torch.log_softmax(logits[:, :-1][labels[:, 1:] != IGNORE_INDEX].float(), dim=-1)


def token_kl(logp: Any, reference: Any) -> Any:
    """KL(p ‖ q) per token from log-probabilities over the vocabulary (rows: tokens): Σ_v p_v (log p_v − log q_v)."""
    return (logp.exp() * (logp - reference)).sum(-1)
