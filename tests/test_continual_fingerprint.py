"""A run folder belongs to one recipe: a finished stage records what made it, and a resumed run that would make it
otherwise stops, retrains with `--rerun-from`, or (evals only) evaluates again."""

from __future__ import annotations

import copy
import json
import shutil

import pytest

from gradsift.cli import main
from gradsift.continual import iter_stage_files, load_recipe
from gradsift.continual.fingerprint import FORMAT, MADE_BY, Fingerprints, changed_keys, finished_status, schema_format
from gradsift.continual.runner import plan, run_recipe
from gradsift.errors import UserError
from test_continual_runner import tiny_recipe, write


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir):
    """A finished run (align + `full` × 2 stages) and the recipe data that made it."""
    root = tmp_path_factory.mktemp("fingerprint")
    data = tiny_recipe(tiny_model_dir, arms=["full"])
    run_recipe(load_recipe(write(root, data)), root / "run", progress=False)
    return data, root / "run"


def snapshot(run):
    """Every file under `run` with its bytes' size and modification time."""
    return {p.relative_to(run): (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}


def copied(finished, tmp_path):
    data, run = finished
    shutil.copytree(run, tmp_path / "run")
    return copy.deepcopy(data), tmp_path / "run"


def rerun(tmp_path, data, run, *flags):
    return main(
        ["run", str(write(tmp_path, data, name="changed.yaml")), "--out", str(run), "--no-report", "-q", *flags]
    )


def test_a_changed_learning_rate_stops_with_one_line_naming_the_stage_and_the_key(finished, tmp_path, capsys):
    data, run = copied(finished, tmp_path)
    before = snapshot(run)
    data["stages"][1]["train"] = {"learning_rate": 2.0e-3}
    capsys.readouterr()
    assert rerun(tmp_path, data, run) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "seed-0/full/02-yes_no" in err and "train.learning_rate 0.001 → 0.002" in err
    assert "--rerun-from yes_no" in err and "--out" in err
    assert snapshot(run) == before  # nothing deleted, nothing written


def test_an_added_arm_runs_only_the_new_arm(finished, tmp_path):
    data, run = copied(finished, tmp_path)
    before = snapshot(run)
    data["arms"] = ["full", "random"]
    assert rerun(tmp_path, data, run) == 0
    after = snapshot(run)
    assert {path: after[path] for path in before if path.name != "recipe.json"} == {
        path: stat for path, stat in before.items() if path.name != "recipe.json"
    }
    done = {(arm, index) for _, arm, index, _ in iter_stage_files(run)}
    assert done == {(None, 0), ("full", 1), ("full", 2), ("random", 1), ("random", 2)}


def test_rerun_from_moves_the_stage_aside_and_retrains_it_and_the_ones_after_it(finished, tmp_path):
    data, run = copied(finished, tmp_path)
    first = (run / "seed-0/full/01-sentiment/stage.json").read_bytes()
    old = json.loads((run / "seed-0/full/02-yes_no/stage.json").read_text())
    data["stages"][1]["train"] = {"learning_rate": 2.0e-3}
    assert rerun(tmp_path, data, run, "--rerun-from", "yes_no") == 0
    (aside,) = (run / "replaced").glob("*/seed-0/full/02-yes_no")
    assert json.loads((aside / "stage.json").read_text()) == old  # kept, whole
    assert (aside / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "seed-0/full/01-sentiment/stage.json").read_bytes() == first  # before it: untouched
    new = json.loads((run / "seed-0/full/02-yes_no/stage.json").read_text())
    assert new[MADE_BY]["train.learning_rate"] == 2.0e-3 and old[MADE_BY]["train.learning_rate"] == 1.0e-3
    assert new["train"]["losses"] != old["train"]["losses"]
    # Rerun from the align stage: every stage of the seed moves aside and is trained again.
    assert rerun(tmp_path, data, run, "--rerun-from", "align") == 0
    assert len(list((run / "replaced").glob("*/seed-0/00-align/stage.json"))) == 1
    assert len(list((run / "replaced").glob("*/seed-0/full/01-sentiment/stage.json"))) == 1
    assert {(arm, index) for _, arm, index, _ in iter_stage_files(run)} == {(None, 0), ("full", 1), ("full", 2)}


def test_changed_evals_evaluate_again_without_training(finished, tmp_path):
    data, run = copied(finished, tmp_path)
    old = {(arm, index): record for _, arm, index, record in iter_stage_files(run)}
    adapter = run / "seed-0/full/02-yes_no/adapter/adapter_model.safetensors"
    trained = (adapter.stat().st_mtime_ns, adapter.read_bytes())
    data["evals"]["after_each_stage"]["limit"] = 3
    assert rerun(tmp_path, data, run) == 0
    new = {(arm, index): record for _, arm, index, record in iter_stage_files(run)}
    for key, record in new.items():
        assert record[MADE_BY] == old[key][MADE_BY] and record["train"] == old[key]["train"]
        assert record["evaluated_by"]["evals.limit"] == 3 and old[key]["evaluated_by"]["evals.limit"] == 4
    for stage in run.glob("seed-0/**/eval"):  # lm-eval's logged samples: 3 documents where there were 4
        (samples,) = stage.rglob("samples_gradsift_refusal_mc_*.jsonl")
        assert len(samples.read_text().splitlines()) == 3
    assert (adapter.stat().st_mtime_ns, adapter.read_bytes()) == trained
    assert len(list((run / "replaced").glob("*/seed-0/full/02-yes_no/eval"))) == 1  # the old eval/, kept
    assert not list(run.glob("seed-0/**/eval.new"))


def test_a_stage_source_written_as_a_list_of_one_is_the_same_stage(finished, tmp_path):
    data, run = copied(finished, tmp_path)
    data["stages"][1]["data"] = [data["stages"][1]["data"]]
    recipe = load_recipe(write(tmp_path, data, name="listed.yaml"))
    assert [finished_status(step, Fingerprints(recipe))[0] for step in plan(recipe, run)] == ["done"] * 3
    data["stages"][1]["data"].append({"synthetic": "sentiment", "size": 2})  # a second source: another stage
    recipe = load_recipe(write(tmp_path, data, name="mixed.yaml"))
    status, keys = finished_status(plan(recipe, run)[2], Fingerprints(recipe))[:2]
    assert status == "changed" and {"data.1.synthetic", "data.synthetic"} <= set(keys)


def test_stages_of_an_older_gradsift_are_kept_and_an_older_format_is_compared_on_shared_keys(finished, tmp_path):
    data, run = copied(finished, tmp_path)
    stage = run / "seed-0/full/02-yes_no/stage.json"
    record = json.loads(stage.read_text())
    recipe = load_recipe(write(tmp_path, data, name="same.yaml"))
    step = plan(recipe, run)[2]
    assert finished_status(step, Fingerprints(recipe))[0] == "done"
    record[MADE_BY].pop("train.learning_rate")  # the same format without a key: a change
    stage.write_text(json.dumps(record))
    assert finished_status(step, Fingerprints(recipe))[:2] == ("changed", ["train.learning_rate"])
    record[MADE_BY]["format"] = 0  # an older format that did not record the key: compared on the keys both hold
    stage.write_text(json.dumps(record))
    assert finished_status(step, Fingerprints(recipe))[0] == "done"
    # A gradsift with one settings field fewer (the same layout, another field list): an upgrade that adds a setting
    # must not stop the resumed run, nor evaluate it again.
    assert schema_format().startswith(f"{FORMAT}:") and record["evaluated_by"]["format"] == schema_format()
    record[MADE_BY]["format"] = record["evaluated_by"]["format"] = f"{FORMAT}:000000000000"
    record["evaluated_by"].pop("evals.limit")
    stage.write_text(json.dumps(record))
    assert finished_status(step, Fingerprints(recipe))[0] == "done"
    record.pop(MADE_BY)  # a stage of a gradsift that recorded nothing: kept as it is
    stage.write_text(json.dumps(record))
    data["stages"][1]["train"] = {"learning_rate": 2.0e-3}
    changed = load_recipe(write(tmp_path, data, name="changed.yaml"))
    assert finished_status(step, Fingerprints(changed))[0] == "done"
    assert changed_keys({"format": 1, "a": 1}, {"format": 1, "a": 1, "c": 3}) == ["c"]  # added
    assert changed_keys({"a": 1, "b": [1, 2]}, {"a": 1, "b": [1, 2], "c": 3}) == []  # no format: shared keys
    assert changed_keys({"a": 1, "b": [1, 2]}, {"a": 2, "b": [1, 2]}) == ["a"]


def test_an_added_align_source_a_random_arms_selection_and_an_earlier_stage_are_caught(finished, tmp_path, capsys):
    data, run = copied(finished, tmp_path)
    more = copy.deepcopy(data)
    more["align"]["data"] = [more["align"]["data"], {"synthetic": "sentiment", "size": 4}]
    capsys.readouterr()
    assert rerun(tmp_path, more, run) == 2
    err = capsys.readouterr().err
    assert (
        "seed-0/00-align" in err and 'data.1.synthetic (not set) → "sentiment"' in err and "--rerun-from align" in err
    )
    data["arms"] = ["full", "random"]
    assert rerun(tmp_path, data, run) == 0
    data["selection"]["keep_fraction"] = 0.75
    assert rerun(tmp_path, data, run) == 2
    err = capsys.readouterr().err
    assert "seed-0/random/01-sentiment" in err and "selection.keep_fraction 0.5 → 0.75" in err
    assert "--rerun-from sentiment --arms random " in err  # `full` is as it was: not trained again
    # A stage trained again upstream: the stage after it no longer matches what it was trained on from.
    data["selection"]["keep_fraction"] = 0.5
    first = run / "seed-0/full/01-sentiment/stage.json"
    record = json.loads(first.read_text())
    record[MADE_BY]["train.epochs"] = 1.0 + 1e-9  # as if trained again with other settings, recorded as such
    first.write_text(json.dumps(record))
    recipe = load_recipe(write(tmp_path, data, name="same.yaml"))
    second = next(s for s in plan(recipe, run) if s.arm == "full" and s.index == 2)
    assert finished_status(second, Fingerprints(recipe))[:2] == ("changed", ["previous"])


def test_rerun_from_a_later_stage_while_an_earlier_one_changed_moves_nothing(finished, tmp_path, capsys):
    data, run = copied(finished, tmp_path)
    before = snapshot(run)
    data["stages"][0]["train"] = {"learning_rate": 2.0e-3}
    capsys.readouterr()
    assert rerun(tmp_path, data, run, "--rerun-from", "yes_no") == 2
    err = capsys.readouterr().err
    assert "seed-0/full/01-sentiment" in err and "--rerun-from sentiment" in err
    assert snapshot(run) == before and not (run / "replaced").exists()


def test_rerun_from_an_unknown_stage_is_one_line(finished, tmp_path, capsys):
    data, run = copied(finished, tmp_path)
    before = snapshot(run)
    capsys.readouterr()
    assert rerun(tmp_path, data, run, "--rerun-from", "yesno") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'yesno'" in err and "(align, sentiment, yes_no): name one" in err
    assert snapshot(run) == before
    data["arms"] = ["full", "random"]  # the align stage is every arm's start: retraining it for one arm is refused
    assert rerun(tmp_path, data, run, "--rerun-from", "align", "--arms", "full") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--rerun-from align --arms full" in err and "without --arms" in err
    assert snapshot(run) == before
    data["stages"][1]["name"] = "align"  # a task stage may not take the align stage's name
    with pytest.raises(UserError, match="`align` names the align stage"):
        load_recipe(write(tmp_path, data, name="two-aligns.yaml"))
