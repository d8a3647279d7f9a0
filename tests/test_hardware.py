"""bfloat16 only where the CPU computes it natively: the one decision (`gradsift.hardware`) and who follows it."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest
import torch

from gradsift import hardware
from gradsift.config import ModelConfig
from gradsift.continual import backends, load_recipe
from gradsift.models import resolve_dtype
from test_continual_runner import tiny_recipe, write

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cpu(monkeypatch):
    """Set what the CPU reports: `cpu(avx512_bf16=..., amx=...)`; no instruction-set cap in the environment."""
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hardware, "_logged", set())

    def report(avx512_bf16: bool, amx: bool = False) -> None:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)

    return report


def test_native_bf16_is_amx_or_avx512_bf16_and_a_onednn_cap_below_them_takes_it_away(cpu, monkeypatch):
    cpu(avx512_bf16=False)
    assert not hardware.native_bf16("cpu")
    cpu(avx512_bf16=True)
    assert hardware.native_bf16("cpu") and not hardware.fast_bf16("cpu")
    cpu(avx512_bf16=True, amx=True)
    assert hardware.native_bf16(torch.device("cpu")) and hardware.fast_bf16("cpu")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # how an AVX2 machine is tried on a bigger one
    assert not hardware.native_bf16("cpu") and not hardware.fast_bf16("cpu")
    assert "capped by ONEDNN_MAX_CPU_ISA=AVX2" in hardware.describe_device("cpu")["name"]
    assert "AVX512_BF16" not in hardware.cpu_isa() and "AMX" not in hardware.cpu_isa()  # what the cap leaves
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core_bf16")
    assert hardware.native_bf16("cpu")
    assert "AVX512_BF16" in hardware.cpu_isa() and "AMX" not in hardware.cpu_isa()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "ALL")  # caps nothing
    assert hardware.native_bf16("cpu") and hardware.cpu_isa().endswith("AVX512_BF16, AMX")


@pytest.fixture
def stage_recipe(tmp_path, tiny_model_dir):
    """A recipe whose stage trains with `bf16: true` and generates its answers in bfloat16, as one written on an AMX
    machine asks."""
    data = tiny_recipe(tiny_model_dir)
    data["train"]["bf16"] = True
    data["evals"]["after_each_stage"]["generation_dtype"] = "bfloat16"
    return load_recipe(write(tmp_path, data))


def chosen(recipe, tmp_path) -> tuple[bool, str | None, bool]:
    """(the runner's training bf16, its generation dtype, the online bench's bf16) as they would run now."""
    spec = recipe.arm("full")
    args = backends.sft_args(recipe, recipe.train_for(recipe.stages[0]), spec, tmp_path, 0, progress=False)
    generation = hardware.generation_dtype(recipe.evals.after_each_stage.generation_dtype, "cpu")
    bench = load_bench("online_bench").sft_config(str(tmp_path / "bench"), per_device_batch=4, steps=1)
    return args.bf16, generation, bench.bf16


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_native_bf16_the_runner_and_the_bench_choose_float32_and_say_so_once(
    cpu, stage_recipe, tmp_path, caplog
):
    cpu(avx512_bf16=False)
    with caplog.at_level(logging.INFO, logger="gradsift.hardware"):
        assert chosen(stage_recipe, tmp_path) == (False, "float32", False)
        assert chosen(stage_recipe, tmp_path) == (False, "float32", False)
    said = [r.getMessage() for r in caplog.records]
    assert len([m for m in said if m.startswith("train.bf16: bfloat16 asked")]) == 1
    assert len([m for m in said if m.startswith("generation_dtype: bfloat16 asked")]) == 1


def test_with_native_bf16_bfloat16_where_asked_and_float32_where_not(cpu, stage_recipe, tmp_path, tiny_model_dir):
    cpu(avx512_bf16=True)
    assert chosen(stage_recipe, tmp_path) == (True, "bfloat16", True)
    # `train.bf16: null` is bfloat16 only where it is the default (AMX); generation_dtype null keeps the loading dtype
    plain = load_recipe(write(tmp_path, tiny_recipe(tiny_model_dir, train={"epochs": 1, "learning_rate": 1e-3})))
    assert plain.train.bf16 is None
    assert backends.bf16(plain.train, "cpu") is False
    assert hardware.generation_dtype(None, "cpu") is None
    cpu(avx512_bf16=True, amx=True)
    assert backends.bf16(plain.train, "cpu") is True


def test_a_users_own_bf16_setting_stands_with_one_warning_of_its_cost(cpu, caplog, monkeypatch):
    cpu(avx512_bf16=False)
    with caplog.at_level(logging.WARNING, logger="gradsift.hardware"):
        assert hardware.warn_slow_bf16(True, "cpu", "axolotl's `bf16: true`")
        assert hardware.warn_slow_bf16(True, "cpu", "axolotl's `bf16: true`")
        assert resolve_dtype(ModelConfig(model="m", dtype="bfloat16"), "cpu") is torch.bfloat16  # the user's choice
        assert not hardware.warn_slow_bf16(False, "cpu", "axolotl's `bf16: true`")
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2, warnings  # one warning a process for each kind, however many places see it
    assert warnings[0].startswith("axolotl's `bf16: true` trains under bfloat16 autocast")
    assert "computes in bfloat16" in warnings[1] and "Set it to float32 or auto" in warnings[1]
    assert "several times slower than float32" in warnings[0]
    caplog.clear()
    monkeypatch.setattr(hardware, "_logged", set())
    with caplog.at_level(logging.WARNING, logger="gradsift.hardware"):
        monkeypatch.setenv("RANK", "1")  # another rank of a distributed run: the main process says it
        assert resolve_dtype(ModelConfig(model="m", dtype="bfloat16"), "cpu") is torch.bfloat16
        assert not caplog.records
        monkeypatch.setenv("RANK", "0")
        assert resolve_dtype(ModelConfig(model="m", dtype="bfloat16"), "cpu") is torch.bfloat16
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "computes in bfloat16" in warning and "Set it to float32 or auto" in warning
    cpu(avx512_bf16=True)
    assert not hardware.warn_slow_bf16(True, "cpu", "TRL's `bf16=True`")
    cpu(avx512_bf16=False)
    assert not hardware.warn_slow_bf16(True, "mps", "TRL's `bf16=True`")  # a CPU's cost, not another device's


def test_the_device_description_names_the_cpu_its_instruction_sets_and_torch(cpu):
    cpu(avx512_bf16=True)
    described = hardware.describe_device("cpu")
    assert described["torch"] == torch.__version__
    assert described["native_bf16"] is True and "AVX512_BF16" in described["isa"]
    assert described["name"] == f"{hardware.cpu_model()} ({described['isa']})"
    assert described["threads"] == torch.get_num_threads()


def test_auto_dtype_is_bfloat16_only_on_a_gpu_that_computes_it_natively(monkeypatch):
    auto = ModelConfig(model="m")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_dtype(auto, "cuda") is torch.float32  # a T4 or V100: bfloat16 only emulated
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_dtype(auto, "cuda") is torch.bfloat16
    assert resolve_dtype(auto, "cpu") is torch.float32


@pytest.mark.parametrize("where", ["online trainer", "select_dataset", "axolotl"])
def test_each_integration_warns_once_when_the_users_config_trains_in_bf16_on_a_cpu_without_it(
    where, cpu, caplog, tmp_path, tokenizer, mixed_records
):
    import datasets

    from gradsift.config import GradSiftConfig, SelectionConfig
    from gradsift.integrations.axolotl.plugin import warn_bf16
    from gradsift.integrations.trl import GradSiftSFTTrainer, select_dataset

    from conftest import lora_model, sft_config

    cpu(avx512_bf16=False)
    rows = datasets.Dataset.from_list(mixed_records[:8])
    config = GradSiftConfig(mode="online", selection=SelectionConfig(keep_fraction=0.5))
    with caplog.at_level(logging.WARNING, logger="gradsift.hardware"):
        for _ in range(2):  # built twice, said once
            if where == "online trainer":
                args = sft_config(tmp_path, bf16=True)
                model = lora_model(tokenizer)
                GradSiftSFTTrainer(
                    model=model, args=args, train_dataset=rows, processing_class=tokenizer, gradsift_config=config
                )
            elif where == "select_dataset":
                args = sft_config(tmp_path, bf16=True)
                select_dataset(
                    rows, lora_model(tokenizer), tokenizer, GradSiftConfig(), sft_config=args, progress=False
                )
            else:
                warn_bf16({"bf16": True, "device": "cpu"})
    (warning,) = [r.getMessage() for r in caplog.records if "without native bfloat16" in r.getMessage()]
    assert "bf16" in warning and "several times slower than float32" in warning
