"""The score cache: reuse without touching the model, rescoring on any change, resuming a killed run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from gradsift.config import GradSiftConfig
from gradsift.data import load_source
from gradsift.models import load_model
from gradsift.pipeline import fingerprints_for, score_cached
from gradsift.store import MANIFEST, SHARDS, TABLE, read_table
from gradsift.tokenization import tokenize_records

from conftest import build_model


class Killed(Exception):
    pass


class Loader:
    """Loads the scoring model, counting loads and forward passes; can 'kill' the run after some forwards."""

    def __init__(self, config, kill_after=None):
        self.config, self.kill_after, self.loads, self.forwards = config, kill_after, 0, 0

    def __call__(self):
        self.loads += 1
        model = load_model(self.config.scoring)
        # Every forward path (whole model or decoder alone) embeds the batch once.
        model.get_input_embeddings().register_forward_pre_hook(self._count)
        return model

    def _count(self, module, args):
        if self.kill_after is not None and self.forwards >= self.kill_after:
            raise Killed
        self.forwards += 1


@pytest.fixture
def setup(tmp_path, tiny_model_dir, tokenizer, mixed_records):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in mixed_records))
    config = GradSiftConfig.model_validate(
        {"scoring": {"model": str(tiny_model_dir), "lora_r": 4, "shard_size": 4, "max_tokens_per_batch": 64}}
    )

    def run(config=config, data=data, out=tmp_path / "scores", kill_after=None):
        source = load_source(data)
        rows = tokenize_records(source.records, tokenizer, config.data)
        fingerprints = fingerprints_for(
            config, tokenizer, rows, data_path=str(data), data_fingerprint=source.fingerprint
        )
        loader = Loader(config, kill_after)
        result = score_cached(rows, config.scoring, out, fingerprints, loader, tokenizer.pad_token_id, progress=False)
        return result, loader

    return run, config, data, tmp_path


def test_rerun_reuses_the_cache_without_loading_the_model(setup):
    run, *_ = setup
    first, loader = run()
    assert loader.loads == 1 and loader.forwards > 0 and not first.reused
    again, loader = run()
    assert again.reused and loader.loads == 0 and loader.forwards == 0
    np.testing.assert_array_equal(again.table.grad_norm, first.table.grad_norm)


def test_changed_scoring_config_triggers_rescoring(setup):
    run, config, *_ = setup
    run()
    changed = config.model_copy(update={"scoring": config.scoring.model_copy(update={"lora_r": 2})})
    result, loader = run(config=changed)
    assert not result.reused and loader.forwards > 0


def test_batch_size_alone_does_not_invalidate_the_cache(setup):
    run, config, *_ = setup
    run()
    faster = config.model_copy(update={"scoring": config.scoring.model_copy(update={"max_tokens_per_batch": 512})})
    result, loader = run(config=faster)
    assert result.reused and loader.loads == 0


def test_changed_data_triggers_rescoring(setup):
    run, _, data, _ = setup
    run()
    data.write_text(data.read_text().replace("positive", "negative"))
    result, loader = run()
    assert not result.reused and loader.forwards > 0


def test_changed_model_triggers_rescoring(setup, tokenizer):
    run, config, _, tmp_path = setup
    run()
    other = tmp_path / "other-model"
    build_model(tokenizer, seed=5).save_pretrained(other)
    tokenizer.save_pretrained(other)
    changed = config.model_copy(update={"scoring": config.scoring.model_copy(update={"model": str(other)})})
    result, loader = run(config=changed)
    assert not result.reused and loader.forwards > 0


def test_killed_run_resumes_to_the_same_table(setup):
    run, _, _, tmp_path = setup
    reference, reference_loader = run(out=tmp_path / "reference")
    with pytest.raises(Killed):
        run(kill_after=reference_loader.forwards // 2)
    finished = sorted((tmp_path / "scores" / SHARDS).glob("*.parquet"))
    manifest = json.loads((tmp_path / "scores" / MANIFEST).read_text())
    assert 0 < len(finished) < manifest["num_shards"] and manifest["status"] == "running"
    assert not (tmp_path / "scores" / TABLE).exists()
    resumed, loader = run()
    assert not resumed.reused
    assert resumed.rows_scored == 24 - 4 * len(finished)
    for name, column in reference.table.columns().items():
        np.testing.assert_array_equal(getattr(resumed.table, name), column, err_msg=name)
    on_disk = read_table(tmp_path / "scores" / TABLE)
    np.testing.assert_array_equal(on_disk.grad_norm, reference.table.grad_norm)
    assert json.loads((tmp_path / "scores" / MANIFEST).read_text())["status"] == "complete"


def test_shards_of_another_identity_are_not_reused(setup):
    run, config, _, tmp_path = setup
    with pytest.raises(Killed):
        run(kill_after=6)
    assert list((tmp_path / "scores" / SHARDS).glob("*.parquet"))
    changed = config.model_copy(update={"scoring": config.scoring.model_copy(update={"lora_seed": 9})})
    result, _ = run(config=changed)
    assert result.rows_scored == 24
    shutil.rmtree(tmp_path / "scores")


def test_scoring_can_be_forbidden_when_no_finished_scores_exist(setup, tokenizer, mixed_records):
    """Used by the axolotl plugin when several processes run: only a finished cache is accepted."""
    from gradsift.config import DataConfig
    from gradsift.pipeline import ScoresMissing, score_and_select

    run, config, _, tmp_path = setup
    rows = tokenize_records(mixed_records, tokenizer, DataConfig())
    loader = Loader(config)
    with pytest.raises(ScoresMissing):
        score_and_select(rows, loader, tokenizer, config, tmp_path / "multi", progress=False, allow_scoring=False)
    assert loader.loads == 0
    score_and_select(rows, loader, tokenizer, config, tmp_path / "multi", progress=False)
    result, _ = score_and_select(
        rows, loader, tokenizer, config, tmp_path / "multi", progress=False, allow_scoring=False
    )
    assert result.reused and loader.loads == 1


def test_records_are_strict_json_with_non_finite_numbers_as_null(tmp_path):
    import numpy as np

    from gradsift.fileio import write_json
    from gradsift.selection import Selection
    from gradsift.store import write_dropped
    from gradsift.table import ScoreTable
    from gradsift.tokenization import TokenizedRow

    def strict(text: str):
        return json.loads(text, parse_constant=lambda token: pytest.fail(f"{token} in strict JSON"))

    record = {"train": {"train_loss": float("nan"), "losses": [1.0, float("inf")]}, "drift": {"kl": np.float32("nan")}}
    write_json(record, tmp_path / "stage.json")
    assert strict((tmp_path / "stage.json").read_text()) == {
        "train": {"train_loss": None, "losses": [1.0, None]},
        "drift": {"kl": None},
    }
    table = ScoreTable.empty([TokenizedRow(input_ids=[1, 2], labels=[-100, 2], sample_id="s#0")], [3])
    table.status[:] = "nonfinite"
    selection = Selection(keep=np.zeros(1, dtype=bool), reasons=np.array(["nonfinite"], dtype=object))
    write_dropped(tmp_path / "dropped.jsonl", table, selection)
    line = strict((tmp_path / "dropped.jsonl").read_text())
    assert line["index"] == 3 and line["reason"] == "nonfinite"
    assert line["grad_norm"] is None and line["loss"] is None and line["anchor_cos"] is None
