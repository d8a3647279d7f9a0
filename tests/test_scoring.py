"""Batched hook scoring against the batch-size-1 loop reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradsift.config import DataConfig, ScoringConfig, SelectionConfig
from gradsift.errors import UserError
from gradsift.hooks import GradNormHooks
from gradsift.models import attach_lora, load_model, prepare_full_scope
from gradsift.scoring import score_rows
from gradsift.selection import select_rows
from gradsift.tokenization import TokenizedRow, make_batches, tokenize_records

from conftest import batched_and_loop, build_model, lora_model, max_rel


@pytest.fixture
def rows(tokenizer, mixed_records):
    return tokenize_records(mixed_records, tokenizer, DataConfig())


def test_rows_have_varied_lengths_and_batches_need_padding(rows):
    lengths = [len(row.input_ids) for row in rows]
    assert len(rows) == 24 and len(set(lengths)) >= 8
    batches = make_batches(lengths, 256, 32)
    assert len(batches) > 1
    assert any(len({lengths[i] for i in batch}) > 1 for batch in batches)  # padding inside a batch


@pytest.mark.parametrize("norm_method", ["auto", "direct", "ghost"])
@pytest.mark.parametrize("perturb_b", [False, True], ids=["fresh-lora", "trained-lora"])
def test_batched_lora_matches_loop(tokenizer, rows, norm_method, perturb_b):
    model = lora_model(tokenizer, trained=perturb_b)
    batched, loop = batched_and_loop(model, rows, tokenizer, norm_method=norm_method)
    assert (loop.grad_norm > 0).all()
    assert max_rel(batched.grad_norm, loop.grad_norm) <= 1e-5
    assert max_rel(batched.loss, loop.loss) <= 1e-6
    config = SelectionConfig(rule="moderate", keep_fraction=0.25)
    keep_batched = select_rows(batched.loss, batched.grad_norm, batched.status, config).keep
    keep_loop = select_rows(loop.loss, loop.grad_norm, loop.status, config).keep
    assert keep_batched.sum() == 6
    np.testing.assert_array_equal(keep_batched, keep_loop)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied-embeddings"])
@pytest.mark.parametrize("norm_method", ["direct", "ghost"])
def test_batched_full_scope_matches_loop(tokenizer, rows, tie, norm_method):
    model = build_model(tokenizer, tie=tie)
    prepare_full_scope(model)
    batched, loop = batched_and_loop(model, rows, tokenizer, norm_method=norm_method, param_scope="all")
    assert max_rel(batched.grad_norm, loop.grad_norm) <= 1e-5
    assert max_rel(batched.loss, loop.loss) <= 1e-6


def test_tied_embedding_cross_term_is_counted(tokenizer, rows):
    """With tied weights the norm of the summed gradient is not the sum of per-layer norms: the cross term matters."""
    model = build_model(tokenizer, tie=True)
    prepare_full_scope(model)
    config = ScoringConfig(param_scope="all")
    hooks = GradNormHooks(model)
    assert len(hooks.shared) == 1
    hooks.shared.clear()  # pretend the weight is not shared: each use then counts on its own
    from gradsift.scoring import score_batch
    from gradsift.tokenization import collate

    batch = collate(rows[:4], tokenizer.pad_token_id)
    with hooks:
        _, wrong = score_batch(model, hooks, batch)
    loop = score_rows(
        model, rows[:4], config.model_copy(update={"method": "loop"}), tokenizer.pad_token_id, progress=False
    )
    assert max_rel(wrong.numpy(), loop.grad_norm) > 1e-3


def test_fresh_lora_score_is_deterministic_for_a_seed(tokenizer, rows):
    first = score_rows(lora_model(tokenizer, trained=False), rows[:6], ScoringConfig(), 3, progress=False)
    again = score_rows(lora_model(tokenizer, trained=False), rows[:6], ScoringConfig(), 3, progress=False)
    np.testing.assert_array_equal(first.grad_norm, again.grad_norm)
    other_seed = attach_lora(build_model(tokenizer), ScoringConfig(lora_r=4, lora_alpha=8, lora_seed=7))
    other = score_rows(other_seed, rows[:6], ScoringConfig(), 3, progress=False)
    assert not np.allclose(first.grad_norm, other.grad_norm)


def test_gradient_checkpointing_gives_the_same_scores(tokenizer, rows):
    model = lora_model(tokenizer)
    plain = score_rows(model, rows, ScoringConfig(), tokenizer.pad_token_id, progress=False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = score_rows(model, rows, ScoringConfig(), tokenizer.pad_token_id, progress=False)
    assert model.is_gradient_checkpointing
    assert max_rel(checkpointed.grad_norm, plain.grad_norm) <= 1e-5


def test_rows_without_response_tokens_are_marked_and_not_scored(tokenizer, rows):
    empty = TokenizedRow(input_ids=rows[0].input_ids, labels=[-100] * len(rows[0].input_ids), sample_id="x#0")
    table = score_rows(lora_model(tokenizer), [rows[1], empty, rows[2]], ScoringConfig(), 3, progress=False)
    assert table.status.tolist() == ["ok", "no_response_tokens", "ok"]
    assert np.isnan(table.grad_norm[1]) and np.isfinite(table.grad_norm[[0, 2]]).all()


@pytest.mark.parametrize("method", ["batched", "loop"])
def test_nonfinite_loss_is_marked_and_does_not_spoil_other_rows(tokenizer, rows, method):
    model = lora_model(tokenizer)
    clean = score_rows(model, rows, ScoringConfig(), tokenizer.pad_token_id, progress=False)
    poisoned_token = rows[5].input_ids[3]
    with torch.no_grad():
        model.get_input_embeddings().weight[poisoned_token] = float("nan")
    table = score_rows(model, rows, ScoringConfig(method=method), tokenizer.pad_token_id, progress=False)
    bad = np.array([poisoned_token in row.input_ids for row in rows])
    assert bad.any() and not bad.all()
    assert (table.status[bad] == "nonfinite").all()
    assert (table.status[~bad] == "ok").all()
    assert max_rel(table.grad_norm[~bad], clean.grad_norm[~bad]) <= 1e-5


def test_an_inf_in_padding_is_masked_by_a_rescore_of_its_batch(tokenizer, rows, monkeypatch):
    """Padding is not masked in the hooks (its output gradients are exactly zero); an inf there would make 0·inf a
    NaN, so such a batch is scored again with masking, and the norms still equal the loop's."""
    model = lora_model(tokenizer)
    loop = score_rows(model, rows, ScoringConfig(method="loop"), tokenizer.pad_token_id, progress=False)
    calls = {"unmasked": 0, "masked": 0}
    original = GradNormHooks._on_linear_grad

    def poison_padding(self, module, inputs, grad):
        calls["masked" if self.masked else "unmasked"] += 1
        mask = self._mask_for(inputs)
        inputs = self._batched(inputs.detach(), mask).masked_fill(~mask[..., None], float("inf"))
        original(self, module, inputs, grad)

    monkeypatch.setattr(GradNormHooks, "_on_linear_grad", poison_padding)
    config = ScoringConfig(max_tokens_per_batch=256)
    batched = score_rows(model, rows, config, tokenizer.pad_token_id, progress=False)
    assert calls["unmasked"] > 0 and calls["masked"] > 0  # batches with padding were scored twice
    assert (batched.status == "ok").all()
    assert max_rel(batched.grad_norm, loop.grad_norm) <= 1e-5


def test_bfloat16_scoring_runs_under_autocast_like_a_bf16_trainer(tokenizer, rows):
    model = lora_model(tokenizer)
    seen: list[torch.dtype] = []
    layer = model.base_model.model.model.layers[0].mlp.up_proj.base_layer
    handle = layer.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    fp32 = score_rows(model, rows, ScoringConfig(), tokenizer.pad_token_id, progress=False)
    assert set(seen) == {torch.float32}
    seen.clear()
    batched, loop = batched_and_loop(model, rows, tokenizer, dtype="bfloat16")
    handle.remove()
    assert set(seen) == {torch.bfloat16}
    assert max_rel(batched.grad_norm, loop.grad_norm) <= 0.05  # bf16 matmuls of different shapes
    assert 1e-4 < max_rel(batched.grad_norm, fp32.grad_norm) <= 0.05
    assert np.corrcoef(batched.grad_norm, fp32.grad_norm)[0, 1] > 0.99


def test_trainable_parameters_outside_linear_layers_are_rejected(tokenizer):
    model = lora_model(tokenizer)
    model.base_model.model.model.norm.weight.requires_grad_(True)
    with pytest.raises(UserError, match="model.norm.weight"):
        GradNormHooks(model)


def test_nf4_batched_matches_loop(tiny_model_dir, tokenizer, rows):
    """bitsandbytes 4-bit base + LoRA. Both paths dequantize the same NF4 weights and run fp32 matmuls, so they differ
    only by summation order over padded batches; 1e-4 leaves room for that while catching any masking error, which
    shows up at the 1e-2 level or worse (see DESIGN.md's traps)."""
    model = load_model(ScoringConfig(model=str(tiny_model_dir), quantization="nf4", lora_r=4, device="cpu"))
    linear4bit = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert linear4bit, "the base model is not 4-bit"
    generator = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.1
    batched, loop = batched_and_loop(model, rows, tokenizer)
    assert max_rel(batched.grad_norm, loop.grad_norm) <= 1e-4
    assert max_rel(batched.loss, loop.loss) <= 1e-5
    config = SelectionConfig(rule="moderate", keep_fraction=0.25)
    np.testing.assert_array_equal(
        select_rows(batched.loss, batched.grad_norm, batched.status, config).keep,
        select_rows(loop.loss, loop.grad_norm, loop.status, config).keep,
    )


def test_a_layer_called_twice_per_forward_is_refused(tokenizer, rows):
    model = lora_model(tokenizer)
    layer = model.base_model.model.model.layers[0].mlp
    original = layer.forward
    layer.forward = lambda x: original(x) + original(x) * 0  # the same LoRA linears run twice
    with pytest.raises(UserError, match="called more than once per forward pass"):
        score_rows(model, rows[:2], ScoringConfig(), tokenizer.pad_token_id, progress=False)


def test_kept_per_sample_gradients_equal_each_rows_own_gradient(tokenizer, rows):
    from gradsift.scoring import per_sample_loss, score_batch
    from gradsift.tokenization import collate

    model = lora_model(tokenizer)
    model.eval()
    batch_rows = rows[:6]
    batch = collate(batch_rows, tokenizer.pad_token_id, torch.device("cpu"))
    with GradNormHooks(model, keep_grads=True) as hooks:
        _, norms = score_batch(model, hooks, batch)
        grads = hooks.take_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    assert set(grads) == {id(p) for p in params}
    worst = 0.0
    for i, row in enumerate(batch_rows):
        alone = collate([row], tokenizer.pad_token_id, torch.device("cpu"))
        logits = model(input_ids=alone["input_ids"], attention_mask=alone["attention_mask"]).logits
        reference = torch.autograd.grad(per_sample_loss(logits, alone["labels"])[0][0], params)
        for param, ref in zip(params, reference):
            worst = max(worst, float((grads[id(param)][i] - ref).abs().max() / ref.abs().max()))
        norm = torch.sqrt(sum(g[i].double().pow(2).sum() for g in grads.values()))
        assert float(norm) == pytest.approx(float(norms[i]), rel=1e-6)
    assert worst <= 1e-5


def test_keeping_gradients_of_a_tied_embedding_is_refused(tokenizer):
    model = build_model(tokenizer, tie=True)
    prepare_full_scope(model)
    with pytest.raises(UserError, match="shared or embeddings: .*embed_tokens"):
        GradNormHooks(model, keep_grads=True)


@pytest.mark.parametrize("with_bias", [False, True])
def test_frozen_head_loss_matches_autograd_cross_entropy(with_bias):
    from gradsift.frozen_head import FrozenHeadLoss

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(11, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 16, generator=generator, dtype=torch.float64)
    bias = torch.randn(40, generator=generator, dtype=torch.float64) if with_bias else None
    targets = torch.randint(0, 40, (11,), generator=generator)
    upstream = torch.rand(11, generator=generator, dtype=torch.float64)

    ours = FrozenHeadLoss.apply(hidden, weight, bias, targets, 3)  # 4 chunks, the last one short
    (ours.double() * upstream).sum().backward()
    ours_grad = hidden.grad.clone()
    hidden.grad = None
    reference = torch.nn.functional.cross_entropy(
        torch.nn.functional.linear(hidden, weight, bias), targets, reduction="none"
    )
    (reference * upstream).sum().backward()
    # The head's logits are taken in float32 (as the loss path does for a bfloat16 model): float32 tolerances.
    assert torch.allclose(ours.double(), reference, rtol=1e-6, atol=1e-6)
    assert torch.allclose(ours_grad, hidden.grad, rtol=1e-5, atol=1e-6)


def test_frozen_head_path_is_used_only_where_it_gives_the_models_logits(tokenizer, rows):
    from transformers import LlamaForCausalLM

    from gradsift.frozen_head import find_frozen_head
    from gradsift.tokenization import collate

    batch = collate(rows[:4], tokenizer.pad_token_id, torch.device("cpu"))
    assert find_frozen_head(lora_model(tokenizer), batch) is not None  # LoRA: the head is frozen
    full = build_model(tokenizer)
    prepare_full_scope(full)
    assert find_frozen_head(full, batch) is None  # a trainable head is measured through its hook

    class ScaledLogits(LlamaForCausalLM):  # post-processes its logits, as Gemma or Granite do
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2.0
            return out

    scaled = ScaledLogits(build_model(tokenizer).config).eval()
    scaled = attach_lora(scaled, ScoringConfig(lora_r=4, lora_alpha=8))
    assert find_frozen_head(scaled, batch) is None
    batched, loop = batched_and_loop(scaled, rows, tokenizer)
    assert max_rel(batched.grad_norm, loop.grad_norm) <= 1e-5
    assert max_rel(batched.loss, loop.loss) <= 1e-5


def user_peft_model(tokenizer, dropout):
    """A user's own PeftModel: LoRA dropout and attention dropout at `dropout`, a trained adapter (lora_B != 0)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    config = build_model(tokenizer).config
    config.attention_dropout = dropout
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    generator = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.1
    return model


@pytest.mark.parametrize("method", ["batched", "loop"])
def test_dropout_is_off_while_scoring_even_under_gradient_checkpointing(tokenizer, rows, method):
    """The QLoRA set-up (`prepare_model_for_kbit_training` turns checkpointing on, LoRA dropout 0.05) must not make
    scores noisy: every dropout is off, so the scores equal the dropout-free model's."""
    reference = user_peft_model(tokenizer, dropout=0.0)
    model = user_peft_model(tokenizer, dropout=0.1)
    for (name, param), (_, same) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(param, same), name
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # as a trainer leaves it
    config = ScoringConfig(method=method, max_tokens_per_batch=256)
    first = score_rows(model, rows, config, tokenizer.pad_token_id, progress=False)
    again = score_rows(model, rows, config, tokenizer.pad_token_id, progress=False)
    expected = score_rows(reference, rows, config, tokenizer.pad_token_id, progress=False)
    np.testing.assert_array_equal(first.grad_norm, again.grad_norm)
    np.testing.assert_array_equal(first.loss, again.loss)
    np.testing.assert_allclose(first.grad_norm, expected.grad_norm, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(first.loss, expected.loss, rtol=1e-6, atol=1e-6)


def test_scoring_still_checkpoints_and_restores_every_training_flag(tokenizer, rows):
    """Checkpointed layers still recompute in the backward (transformers checkpoints only layers in train mode), yet
    run their forward with `training` off; every module's own flag is back afterwards."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    model = user_peft_model(tokenizer, dropout=0.1)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    model.base_model.model.model.layers[1].mlp.eval()  # a mixed state, restored module by module
    before = {name: module.training for name, module in model.named_modules()}
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert len(layers) == 2
    checkpoints, runs, flags = [], [], []

    def counting(layer, checkpoint):  # counts what needs gradients (not the one-off no-grad check of the LM head)
        def run(function, *args, **kwargs):
            if torch.is_grad_enabled():
                checkpoints.append(layer)

            def counted(*inner, **inner_kwargs):
                if torch.is_grad_enabled():
                    runs.append(layer)
                return function(*inner, **inner_kwargs)

            return checkpoint(counted, *args, **kwargs)

        return run

    for layer in layers:
        layer._gradient_checkpointing_func = counting(layer, layer._gradient_checkpointing_func)
        for module in (layer, layer.self_attn):
            module.register_forward_hook(lambda module, args, output: flags.append(module.training))
    config = ScoringConfig(max_tokens_per_batch=256)
    num_batches = len(make_batches([len(row.input_ids) for row in rows], 256, 32))
    for scored in (1, 2):  # a second scoring pass finds checkpointing as the first left it
        score_rows(model, rows, config, tokenizer.pad_token_id, progress=False)
        for layer in layers:
            assert checkpoints.count(layer) == scored * num_batches
            assert runs.count(layer) == 2 * scored * num_batches  # the forward, and its recomputation in the backward
    assert flags and not any(flags)
    assert {name: module.training for name, module in model.named_modules()} == before


def test_nf4_scores_on_a_cpu_are_the_training_steps_numbers(tiny_model_dir, tokenizer, rows):
    """In eval mode on a CPU, bitsandbytes repacks 4-bit weights for a bfloat16 inference kernel (0.8 % off a training
    step's norms on a CPU with AVX512-BF16); scoring keeps the kernel that training uses."""
    from gradsift.scoring import score_one

    model = load_model(ScoringConfig(model=str(tiny_model_dir), quantization="nf4", lora_r=4, device="cpu"))
    generator = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.1
    model.train()  # every dropout is 0 here: the training step's own numbers
    expected = np.array([score_one(model, row, tokenizer.pad_token_id) for row in rows[:6]])
    model.eval()
    table = score_rows(model, rows[:6], ScoringConfig(method="loop"), tokenizer.pad_token_id, progress=False)
    weights = [p for p in model.parameters() if type(p).__name__ == "Params4bit"]
    assert weights and not any(getattr(p.quant_state, "packing_format_for_cpu", False) for p in weights)
    np.testing.assert_allclose(table.loss, expected[:, 0], rtol=1e-6)
    np.testing.assert_allclose(table.grad_norm, expected[:, 1], rtol=1e-6)


def test_auto_token_budget_is_the_devices_measured_one_and_a_number_wins(tokenizer, rows, monkeypatch):
    import gradsift.scoring as scoring
    from gradsift.config import AUTO_TOKEN_BUDGETS, DEFAULT_TOKEN_BUDGET

    budgets = []
    real = scoring.make_batches
    monkeypatch.setattr(
        scoring, "make_batches", lambda lengths, budget, size: budgets.append(budget) or real(lengths, budget, size)
    )
    model = lora_model(tokenizer)
    auto = score_rows(model, rows, ScoringConfig(), tokenizer.pad_token_id, progress=False)
    small = score_rows(model, rows, ScoringConfig(max_tokens_per_batch=40), tokenizer.pad_token_id, progress=False)
    assert budgets == [AUTO_TOKEN_BUDGETS["cpu"], 40]
    assert ScoringConfig().token_budget("cuda") == DEFAULT_TOKEN_BUDGET == 4096  # not swept on a GPU yet
    # The budget changes the batches (at 40 tokens nearly one row each), not the scores.
    assert max_rel(auto.grad_norm, small.grad_norm) < 1e-5 and max_rel(auto.loss, small.loss) < 1e-5
