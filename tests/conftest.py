"""Fixtures: a tiny random Llama and a byte-level BPE chat tokenizer trained on the spot, with no hub access."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# axolotl's telemetry would otherwise block interpreter exit trying to flush to the network.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
# Every test run of an align stage trains it: a shared cache of aligned models would let one test's model stand in for
# another's (tests/test_continual_runner.py tests the cache in a folder of its own).
os.environ["GRADSIFT_ALIGN_CACHE"] = "off"

import pytest  # noqa: E402
import torch  # noqa: E402

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Classify the sentiment: I loved this film. positive",
    "Is the sky blue on a clear day? yes",
    "Explain photosynthesis in one sentence. Plants turn light, water and carbon dioxide into sugar and oxygen.",
    "Write a short poem about the sea. Waves fold over waves, the grey sea keeps its own time.",
    "Translate to French: good morning. bonjour",
    "How many legs does a spider have? eight",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction: ### Input: ### Response: user assistant system",
]


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_shape(tokenizer) -> dict:
    """The tiny decoder every architecture in the tests shares: 2 layers of width 64, grouped-query attention."""
    return dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def build_model(tokenizer, seed: int = 0, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**tiny_shape(tokenizer), tie_word_embeddings=tie)).eval()


def with_trained_lora(model, r: int = 4, seed: int = 1):
    """A LoRA adapter as after training: lora_B != 0 (seeded), so lora_A has a gradient too."""
    from gradsift.config import ScoringConfig
    from gradsift.models import attach_lora

    model = attach_lora(model, ScoringConfig(lora_r=r, lora_alpha=8))
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.1
    return model


def lora_model(tokenizer, tie: bool = False, r: int = 4, seed: int = 0, trained: bool = True):
    """The tiny Llama with a LoRA adapter: trained (`with_trained_lora`, seed + 1) or fresh (lora_B = 0)."""
    if trained:
        return with_trained_lora(build_model(tokenizer, seed=seed, tie=tie), r=r, seed=seed + 1)
    from gradsift.config import ScoringConfig
    from gradsift.models import attach_lora

    return attach_lora(build_model(tokenizer, seed=seed, tie=tie), ScoringConfig(lora_r=r, lora_alpha=8))


def batched_and_loop(model, rows, tokenizer, **overrides):
    """Score `rows` with the batched hooks and with the batch-size-1 loop reference, same config otherwise."""
    from gradsift.config import ScoringConfig
    from gradsift.scoring import score_rows

    config = ScoringConfig(max_tokens_per_batch=256, **overrides)
    batched = score_rows(model, rows, config, tokenizer.pad_token_id, progress=False)
    loop = score_rows(
        model, rows, config.model_copy(update={"method": "loop"}), tokenizer.pad_token_id, progress=False
    )
    return batched, loop


def max_rel(a, b):
    import numpy as np

    return float(np.max(np.abs(a - b) / np.abs(b)))


def sft_config(tmp_path, **overrides):
    """TRL settings for one exact SGD step on the CPU (no warm-up, clipping or decay), as the trainer tests compare
    trained weights with a hand-made step; `overrides` set the rest."""
    from trl import SFTConfig

    settings = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        gradient_accumulation_steps=1,
        max_steps=1,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=0.0,
        weight_decay=0.0,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        max_length=64,
        seed=0,
        dataloader_drop_last=False,
    )
    settings.update(overrides)
    return SFTConfig(**settings)


def write_recipe(folder: Path, data: dict, name: str = "recipe.yaml") -> Path:
    """`data` as a recipe YAML file in `folder`."""
    import yaml

    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def recipe_dict(**extra) -> dict:
    """A recipe that validates without a model or lm-eval's task index (no task named, no align)."""
    data = {
        "name": "tiny",
        "model": "never-loaded",
        "stages": [{"name": "sentiment", "data": {"synthetic": "sentiment", "size": 8}}],
        "arms": ["full"],
        "evals": {"after_each_stage": {"tasks": [], "domain": False}},
        "drift_prompts": 0,
    }
    data.update(extra)
    return data


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny Llama saved as a local model folder (safetensors + tokenizer), as users pass with `--model DIR`."""
    path = tmp_path_factory.mktemp("tiny-llama")
    build_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tiny_model(tokenizer):
    return build_model(tokenizer)


@pytest.fixture
def mixed_records():
    """Rows of varied lengths, in prompt/completion form, some with terse answers."""
    prompts = [
        ("Classify the sentiment: I loved this film.", "positive"),
        ("Is the sky blue on a clear day?", "yes"),
        ("What is the capital of France?", "The capital of France is Paris."),
        ("Explain photosynthesis in one sentence.", "Plants turn light, water and carbon dioxide into sugar."),
        ("Write a short poem about the sea.", "Waves fold over waves, the grey sea keeps its own time, and so do I."),
        ("Translate to French: good morning.", "bonjour"),
        ("How many legs does a spider have?", "eight"),
        ("Describe the sea.", "The sea is grey and wide; waves fold over waves all day and all night long."),
    ]
    rows = []
    for i in range(24):
        prompt, completion = prompts[i % len(prompts)]
        rows.append({"prompt": f"{prompt} ({i})", "completion": completion + (" Really." * (i % 3))})
    return rows
