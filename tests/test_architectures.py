"""Batched scoring against the batch-size-1 loop on tiny random models of the architectures people fine-tune.

Each has something Llama lacks: Qwen2's q/k/v biases and sliding-window layers, Qwen3's q/k norms, Mistral's sliding
window, Gemma 2's logit and attention soft-capping, Gemma's scaled (and tied) embeddings, Phi-3's fused qkv and
gate/up projections.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from torch import nn

from gradsift.config import DataConfig, ScoringConfig
from gradsift.errors import UserError
from gradsift.frozen_head import find_frozen_head
from gradsift.hooks import GradNormHooks
from gradsift.models import attach_lora, load_model, prepare_full_scope
from gradsift.scoring import score_rows
from gradsift.tokenization import collate, tokenize_records

from conftest import batched_and_loop, build_model, max_rel, tiny_shape, with_trained_lora

# Windows of 8 tokens: shorter than every row, so sliding-window masks meet right padding in the batches.
ARCHITECTURES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 8}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "sliding_window": 8}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16, "sliding_window": 8}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
}


def build_architecture(name, tokenizer, seed=0):
    config_class, model_class, extra = ARCHITECTURES[name]
    config = getattr(transformers, config_class)(**tiny_shape(tokenizer), **extra)
    torch.manual_seed(seed)
    return getattr(transformers, model_class)(config).eval()


@pytest.fixture(scope="module")
def rows(tokenizer):
    records = [
        {"prompt": f"{prompt} ({i})", "completion": completion + " Really." * (i % 3)}
        for i, (prompt, completion) in enumerate(
            [
                ("Classify the sentiment: I loved this film.", "positive"),
                ("What is the capital of France?", "The capital of France is Paris."),
                ("Write a short poem about the sea.", "Waves fold over waves, the grey sea keeps its own time."),
                ("How many legs does a spider have?", "eight"),
            ]
            * 3
        )
    ]
    return tokenize_records(records, tokenizer, DataConfig())


def test_rows_are_longer_than_the_sliding_window_and_batches_need_padding(rows):
    lengths = sorted(len(row.input_ids) for row in rows)
    assert lengths[0] > 8 and lengths[-1] > lengths[0]


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
@pytest.mark.parametrize("param_scope", ["lora", "all"])
def test_batched_matches_loop(tokenizer, rows, name, param_scope):
    model = build_architecture(name, tokenizer)
    if param_scope == "lora":
        model = with_trained_lora(model)
    else:
        prepare_full_scope(model)
    batched, loop = batched_and_loop(model, rows, tokenizer, param_scope=param_scope)
    assert (batched.status == "ok").all() and (loop.grad_norm > 0).all()
    assert max_rel(batched.grad_norm, loop.grad_norm) <= 1e-5
    assert max_rel(batched.loss, loop.loss) <= 1e-6


def test_a_soft_capped_head_is_never_bypassed(tokenizer, rows):
    """A tiny random Gemma 2's logits are too small for its cap (30) to move them beyond 1e-3, yet the cap changes the
    norms at 1e-4: the fused frozen-head path, which has no cap, must not be taken because the logits look alike."""
    model = with_trained_lora(build_architecture("gemma2", tokenizer))
    assert model.config.final_logit_softcapping == 30.0
    batch = collate(rows[:4], tokenizer.pad_token_id, torch.device("cpu"))
    assert find_frozen_head(model, batch) is None
    assert find_frozen_head(with_trained_lora(build_architecture("qwen3", tokenizer)), batch) is not None


def test_nf4_batched_matches_loop(tmp_path, tokenizer, rows):
    """Qwen2 (biased q/k/v projections) in bitsandbytes 4-bit, with the tolerances of the Llama nf4 test."""
    build_architecture("qwen2", tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = load_model(ScoringConfig(model=str(tmp_path), quantization="nf4", lora_r=4, device="cpu"))
    assert [m for m in model.modules() if type(m).__name__ == "Linear4bit"], "the base model is not 4-bit"
    generator = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.1
    batched, loop = batched_and_loop(model, rows, tokenizer)
    assert max_rel(batched.grad_norm, loop.grad_norm) <= 1e-4
    assert max_rel(batched.loss, loop.loss) <= 1e-5


class DoubledEmbedding(nn.Embedding):
    def forward(self, input_ids):
        return super().forward(input_ids) * 2


class CappedEmbedding(nn.Embedding):
    embed_scale = 2.0  # named like Gemma's, but the forward is not a plain scaling

    def forward(self, input_ids):
        return torch.tanh(super().forward(input_ids)) * self.embed_scale


@pytest.mark.parametrize("embedding_class", [DoubledEmbedding, CappedEmbedding])
def test_an_embedding_that_transforms_its_rows_is_refused_with_the_architecture_named(
    tokenizer, rows, embedding_class
):
    model = build_model(tokenizer)
    plain = model.get_input_embeddings()
    embedding = embedding_class(plain.num_embeddings, plain.embedding_dim, plain.padding_idx)
    embedding.weight = plain.weight
    model.set_input_embeddings(embedding)
    prepare_full_scope(model)
    with pytest.raises(
        UserError, match="LlamaForCausalLM's embedding layer .*Embedding transforms its looked-up rows"
    ):
        score_rows(model, rows[:4], ScoringConfig(param_scope="all"), tokenizer.pad_token_id, progress=False)
    # The loop, its reference, measures it; and a LoRA does not touch the embedding.
    loop = score_rows(
        model, rows[:4], ScoringConfig(param_scope="all", method="loop"), tokenizer.pad_token_id, progress=False
    )
    assert np.isfinite(loop.grad_norm).all()
    lora = attach_lora(model, ScoringConfig(lora_r=4))
    GradNormHooks(lora)
