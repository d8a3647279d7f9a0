"""The axolotl plugin, through the real `axolotl preprocess` and `axolotl train` CLIs on a tiny local model."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from gradsift.config import SelectionConfig
from gradsift.selection import select_rows
from gradsift.store import read_table

from conftest import build_model

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "recipes" / "axolotl" / "tiny-cpu.yaml"
AXOLOTL = [sys.executable, "-m", "axolotl.cli.main"]
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
    "AXOLOTL_DO_NOT_TRACK": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from conftest import build_tokenizer

    path = tmp_path_factory.mktemp("axolotl")
    tokenizer = build_tokenizer()
    build_model(tokenizer).save_pretrained(path / "model")
    tokenizer.save_pretrained(path / "model")
    with open(path / "alpaca.jsonl", "w") as handle:
        facts = ["The capital of France is Paris.", "positive", "yes", "Waves fold over waves, the grey sea."]
        for i in range(24):
            handle.write(
                json.dumps({"instruction": f"Question number {i}?", "input": "", "output": facts[i % 4]}) + "\n"
            )
    return path


def write_config(workdir: Path, name: str, dataset: str, qlora: bool, mode: str | None = None, **overrides) -> Path:
    """The shipped tiny-cpu.yaml with its paths pointed at the tiny model and a fresh output folder; `mode` sets
    `gradsift.mode`, `overrides` top-level axolotl keys."""
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config.update(
        base_model=str(workdir / "model"),
        dataset_prepared_path=str(workdir / name / "prepared"),
        output_dir=str(workdir / name / "out"),
        special_tokens={"pad_token": "<pad>"},
        sequence_len=128,
    )
    if dataset == "alpaca":
        config["datasets"] = [{"path": str(workdir / "alpaca.jsonl"), "type": "alpaca"}]
        config.pop("chat_template")
    else:
        config["datasets"][0]["path"] = str(ROOT / config["datasets"][0]["path"])
    if qlora:
        config.update(load_in_4bit=True, adapter="qlora")
        config["gradsift"]["scoring"]["quantization"] = "nf4"
    if mode is not None:
        config["gradsift"]["mode"] = mode
    config.update(overrides)
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def axolotl(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([*AXOLOTL, *args], capture_output=True, text=True, env=ENV, timeout=900, cwd=ROOT)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


@pytest.mark.slow
@pytest.mark.parametrize(
    "dataset,qlora", [("alpaca", False), ("alpaca", True), ("chat_template", False), ("chat_template", True)]
)
def test_preprocess_scores_and_train_uses_exactly_the_kept_rows(workdir, dataset, qlora):
    name = f"{dataset}-{'qlora' if qlora else 'lora'}"
    config_path = write_config(workdir, name, dataset, qlora)
    config = yaml.safe_load(config_path.read_text())
    cache = workdir / name / "prepared" / "gradsift"

    preprocess = axolotl("preprocess", str(config_path))
    assert "gradsift: scored" in preprocess.stdout + preprocess.stderr
    selection = json.loads((cache / "selection.json").read_text())
    assert selection["rows_scored"] == selection["num_rows"] > 0

    train = axolotl("train", str(config_path), "--launcher", "python")
    log = train.stdout + train.stderr
    assert "gradsift: reused cached scores" in log  # train did not score again

    # The dropped rows are exactly those the core selects for the same scores.
    table = read_table(cache / "scores.parquet")
    core = select_rows(table.loss, table.grad_norm, table.status, SelectionConfig(**config["gradsift"]["selection"]))
    dropped = [json.loads(line) for line in (cache / "dropped.jsonl").read_text().splitlines()]
    assert sorted(d["index"] for d in dropped) == sorted(table.index[~core.keep].tolist())
    assert [d["reason"] for d in sorted(dropped, key=lambda d: d["index"])] == [
        core.reasons[i] for i in np.argsort(table.index) if not core.keep[i]
    ]

    # The trainer got exactly the kept rows, and a step count for that many rows.
    trained = json.loads((cache / "train.json").read_text())
    kept_ids = table.sample_id[core.keep].tolist()
    assert trained["rows"] == int(core.keep.sum()) == selection["num_kept"]
    assert sorted(trained["sample_ids"]) == sorted(kept_ids)
    batch = config["micro_batch_size"] * config["gradient_accumulation_steps"]
    assert trained["max_steps"] == -(-trained["rows"] // batch)
    assert re.search(rf"gradsift: training on {trained['rows']} selected rows for {trained['max_steps']} steps", log)


@pytest.mark.slow
def test_second_train_reuses_the_cached_scores(workdir):
    config_path = write_config(workdir, "rerun", "alpaca", False)
    cache = workdir / "rerun" / "prepared" / "gradsift"
    first = axolotl("train", str(config_path), "--launcher", "python")
    assert "gradsift: scored 24 rows" in first.stdout + first.stderr  # no preprocess: train scores on first use
    stamp = (cache / "scores.parquet").stat().st_mtime_ns
    second = axolotl("train", str(config_path), "--launcher", "python")
    assert "gradsift: reused cached scores" in second.stdout + second.stderr
    assert (cache / "scores.parquet").stat().st_mtime_ns == stamp
    assert json.loads((cache / "selection.json").read_text())["rows_scored"] == 0


def validate(config: dict):
    """axolotl's own config loading (plugins registered, schema merged), as both CLIs do it."""
    from axolotl.cli.config import load_cfg
    from axolotl.utils.dict import DictDefault

    return load_cfg(DictDefault(config))


def test_plugin_really_loads_and_adds_its_schema(workdir):
    cfg = validate(yaml.safe_load(write_config(workdir, "schema", "alpaca", False).read_text()))
    from axolotl.integrations.base import PluginManager

    plugins = PluginManager.get_instance().plugins
    assert "gradsift.integrations.axolotl.GradSiftPlugin" in plugins
    assert cfg.gradsift["selection"]["keep_fraction"] == 0.5


@pytest.mark.parametrize(
    "block,fragments",
    [
        (
            {"selection": {"keep_fractio": 0.2}},
            ["`gradsift.selection.keep_fractio` is not a gradsift option", "keep_fraction"],
        ),
        ({"selection": {"keep_fraction": 5}}, ["`gradsift.selection.keep_fraction`", "got 5", "e.g. the default 0.2"]),
        ({"data": {"max_length": 5}}, ["`gradsift.data` does not apply under axolotl"]),
    ],
)
def test_bad_gradsift_block_fails_at_config_load(workdir, block, fragments):
    config = yaml.safe_load(write_config(workdir, "bad", "alpaca", False).read_text())
    config["gradsift"] = block
    with pytest.raises(Exception) as error:
        validate(config)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_unsupported_axolotl_setting_is_rejected_with_the_fix(workdir):
    config = yaml.safe_load(write_config(workdir, "bad-rl", "alpaca", False).read_text())
    config["skip_prepare_dataset"] = True
    with pytest.raises(Exception, match="`skip_prepare_dataset` is set"):
        validate(config)


def test_plugin_readme_quick_start_is_the_tested_config():
    readme = (ROOT / "plugin" / "gradsift" / "integrations" / "axolotl" / "README.md").read_text()
    quick_start = yaml.safe_load(re.search(r"```yaml\n(.*?)```", readme, re.S).group(1))
    tested = yaml.safe_load(TINY_CONFIG.read_text())
    assert quick_start == {key: tested[key] for key in quick_start}


@pytest.mark.parametrize("path", sorted((ROOT / "recipes" / "axolotl").glob("*.yaml")), ids=lambda p: p.name)
def test_every_axolotl_recipe_passes_axolotl_validation_with_the_plugin(path):
    config = yaml.safe_load(path.read_text())
    from axolotl.cli.config import prepare_plugins
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault

    cfg = DictDefault(config)
    prepare_plugins(cfg)
    validated = validate_config(cfg)
    assert "gradsift.integrations.axolotl.GradSiftPlugin" in validated.plugins and validated.gradsift
    if path.name == "paper-qwen2.5-7b-dolly.yaml":
        assert validated.gradsift["selection"]["window"] == 32 and validated.lora_r == 32


@pytest.mark.slow
def test_online_mode_trains_with_per_step_selection(workdir):
    config_path = write_config(
        workdir, "online", "alpaca", False, mode="online", gradient_accumulation_steps=2, logging_steps=1
    )
    train = axolotl("train", str(config_path), "--launcher", "python")
    log = train.stdout + train.stderr
    assert "gradsift: online selection in every step (step window)" in log
    assert re.search(r"gradsift/kept_fraction.{0,6}0\.5", log), log[-3000:]
    steps = [
        json.loads(line) for line in (workdir / "online" / "out" / "gradsift_online.jsonl").read_text().splitlines()
    ]
    assert len(steps) == 24 // 4 and all(step["rows"] == 4 and step["kept"] == 2 for step in steps)
    assert not (workdir / "online" / "prepared" / "gradsift" / "scores.parquet").exists()  # no offline scoring


def test_online_mode_rejects_sample_packing(workdir):
    config = yaml.safe_load(
        write_config(workdir, "online-packing", "alpaca", False, mode="online", sample_packing=True).read_text()
    )
    with pytest.raises(Exception, match="`sample_packing` joins rows"):
        validate(config)


def test_the_anchor_set_is_a_scoring_option_of_the_gradsift_block():
    from axolotl.utils.dict import DictDefault

    from gradsift.integrations.axolotl.plugin import resolve_config

    cfg = DictDefault({"base_model": "some/model", "adapter": "lora", "lora_r": 8})
    block = {"scoring": {"anchor_data": "embedded:refusals"}, "selection": {"rule": "anchor", "keep_fraction": 0.5}}
    config = resolve_config(cfg, block)
    assert config.scoring.anchor_data == "embedded:refusals" and config.selection.rule == "anchor"
    assert config.scoring.model == "some/model" and config.scoring.lora_r == 8


def accelerate_train(config_path: Path, processes: int = 2, check: bool = True) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes N -m axolotl.cli.train` on the CPU (gloo)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes)]
    launch += ["--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no"]
    launch += ["--dynamo_backend", "no", "-m", "axolotl.cli.train", str(config_path)]
    # `--multi_gpu` without a GPU: accelerate then runs plain data parallelism over gloo when told to use the CPU.
    env = {**ENV, "OMP_NUM_THREADS": "1", "GRADSIFT_DEBUG": "1", "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(launch, capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert result.returncode == 0 or not check, (result.stdout + result.stderr)[-4000:]
    return result


def test_the_preprocess_command_repeats_the_config_path_and_its_overrides():
    from axolotl.utils.dict import DictDefault

    from gradsift.integrations.axolotl.plugin import preprocess_command

    cfg = DictDefault({"axolotl_config_path": "my runs/c.yaml"})
    command = preprocess_command(cfg, ["my runs/c.yaml", "--dataset_prepared_path", "/tmp/p q"])
    assert command == "axolotl preprocess 'my runs/c.yaml' --dataset_prepared_path '/tmp/p q'"
    assert preprocess_command(cfg, ["other.yaml", "--x", "1"]) == "axolotl preprocess 'my runs/c.yaml'"
    assert preprocess_command(DictDefault({}), []) == "axolotl preprocess <your config.yaml>"


@pytest.mark.slow
def test_offline_mode_under_two_processes_asks_for_preprocess_then_reuses_its_scores(workdir):
    config_path = write_config(workdir, "offline-ddp", "alpaca", False)
    config = yaml.safe_load(config_path.read_text())
    cache = workdir / "offline-ddp" / "prepared" / "gradsift"

    refused = accelerate_train(config_path, check=False)
    lines = [line for line in refused.stderr.splitlines() if line.startswith("gradsift: ")]
    assert refused.returncode != 0 and len(lines) == 1, (refused.stdout + refused.stderr)[-4000:]
    assert f"no cached scores in {cache} and this run has 2 processes" in lines[0]
    assert f"with `axolotl preprocess {config_path}`, then run this training command again" in lines[0]
    assert "UserError" not in refused.stderr and "exitcode  : 2" in refused.stderr  # no gradsift traceback; status 2
    out = workdir / "offline-ddp" / "out"  # axolotl writes its debug.log there before loading data; nothing else
    assert not (cache / "scores.parquet").exists() and {p.name for p in out.iterdir()} <= {"debug.log"}

    command = shlex.split(re.search(r"with `(axolotl preprocess [^`]+)`", lines[0]).group(1))
    axolotl(*command[1:])  # the command the message gives, as given
    train = accelerate_train(config_path)
    log = train.stdout + train.stderr
    assert "gradsift: reused cached scores" in log and "gradsift: scored" not in log

    # Both ranks trained on the kept rows of the cached scores, split between them: a step is 2 processes' batches.
    table = read_table(cache / "scores.parquet")
    core = select_rows(table.loss, table.grad_norm, table.status, SelectionConfig(**config["gradsift"]["selection"]))
    trained = json.loads((cache / "train.json").read_text())
    assert sorted(trained["sample_ids"]) == sorted(table.sample_id[core.keep].tolist())
    batch = config["micro_batch_size"] * config["gradient_accumulation_steps"] * 2
    assert trained["max_steps"] == -(-trained["rows"] // batch)


@pytest.mark.slow
def test_online_mode_under_two_processes_selects_from_the_global_batch(workdir):
    config_path = write_config(
        workdir, "online-ddp", "alpaca", False, mode="online", gradient_accumulation_steps=2, logging_steps=1
    )
    train = accelerate_train(config_path)
    log = train.stdout + train.stderr
    assert "gradsift/kept_fraction" in log, log[-3000:]
    steps = [
        json.loads(line)
        for line in (workdir / "online-ddp" / "out" / "gradsift_online.jsonl").read_text().splitlines()
    ]
    # 24 rows; a step is 2 processes × 2 micro-batches × 2 rows, selected together (one record per step, from rank
    # 0; GRADSIFT_DEBUG makes every step assert that both ranks kept the same rows). `moderate` keeps at most half,
    # fewer where its loss filter leaves fewer rows.
    assert [step["step"] for step in steps] == [0, 1, 2]
    assert all(step["rows"] == 8 and 1 <= step["kept"] <= 4 for step in steps)
