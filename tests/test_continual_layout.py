"""A run never writes or deletes outside what gradsift can tell is its own: names that would leave the run folder, a
foreign --out, a foreign stage folder, a second run on the same folder, a missing previous adapter. No test here
loads a model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gradsift.cli import main
from gradsift.continual import check_run_folder, load_recipe
from gradsift.continual.layout import STAGE_MARK, clean_stage
from gradsift.continual.runner import run_recipe
from gradsift.errors import UserError

from conftest import recipe_dict as recipe
from conftest import write_recipe as write

REPO = Path(__file__).resolve().parents[1]


def user_files(folder: Path) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "thesis.tex").write_bytes(b"\\section{Years of work}")
    (folder / "01-sentiment").mkdir(exist_ok=True)
    (folder / "01-sentiment" / "data.bin").write_bytes(b"\x00\x01")
    return snapshot(folder)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    status = main(args)
    err = capsys.readouterr().err.strip()
    return status, err


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_folder_gradsift_did_not_write_is_refused_as_out_and_left_alone(tmp_path, capsys, dry_run):
    out = tmp_path / "papers"
    before = user_files(out)
    path = write(tmp_path, recipe())
    status, err = run_cli(["run", str(path), "--out", str(out), *(["--dry-run"] if dry_run else [])], capsys)
    assert status == 2 and "\n" not in err
    assert "is not a gradsift run folder" in err and "choose an empty or new --out" in err
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == ["01-sentiment", "thesis.tex"]


def test_a_file_as_out_is_refused_and_left_alone(tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    status, err = run_cli(["run", str(write(tmp_path, recipe())), "--out", str(out)], capsys)
    assert status == 2 and "is a file, not a run folder" in err
    assert out.read_text() == "keep me"


def test_a_run_folder_of_the_current_or_an_older_gradsift_is_accepted_as_out(tmp_path):
    old = {"name": "tiny", "model": "m", "stages": ["a"], "domain_tasks": [None], "arms": ["full"], "recipe": {}}
    for meta in (old, {"gradsift_version": "1.0", **old}):
        (tmp_path / "recipe.json").write_text(json.dumps(meta))
        (tmp_path / "seed-0").mkdir(exist_ok=True)
        check_run_folder(tmp_path)
    (tmp_path / "recipe.json").write_text(json.dumps({"name": "someone else's"}))
    with pytest.raises(UserError, match="is not a gradsift run folder"):
        check_run_folder(tmp_path)


def test_a_stage_folder_gradsift_did_not_write_is_not_emptied(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "recipe.json").write_text(json.dumps({"gradsift_version": "1.0", "name": "tiny"}))
    stage = out / "seed-0" / "full" / "01-sentiment"
    before = user_files(stage)
    loaded = load_recipe(write(tmp_path, recipe()))
    with pytest.raises(UserError, match="holds files gradsift did not write"):
        run_recipe(loaded, out, progress=False)
    assert snapshot(stage) == before and not (stage / STAGE_MARK).exists()


def test_a_stage_folder_gradsift_marked_or_an_older_run_left_is_emptied_and_marked(tmp_path):
    marked, older = tmp_path / "01-a", tmp_path / "02-b"
    for folder in (marked, older):
        (folder / "adapter").mkdir(parents=True)
        (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"partial")
    (marked / STAGE_MARK).write_text("{}")
    (marked / "notes-of-the-killed-run.txt").write_text("x")
    (older / ".stage.json.abc.tmp").write_text("{")  # atomic_path's temporary file, left by a kill
    for folder in (marked, older):
        clean_stage(folder)
        assert [p.name for p in folder.iterdir()] == [STAGE_MARK]
        assert "gradsift_version" in json.loads((folder / STAGE_MARK).read_text())


def test_a_second_run_on_the_same_folder_is_refused(tmp_path):
    out = tmp_path / "run"
    holder = "import sys, time\nfrom gradsift.locking import folder_lock\nwith folder_lock(sys.argv[1]):\n"
    holder += "    print('held', flush=True)\n    time.sleep(120)\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [sys.executable, "-c", holder, str(out)], stdout=subprocess.PIPE, text=True, env=env
    )  # a first `gradsift run`, holding the folder
    try:
        assert first.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match="is being written by another gradsift process"):
            run_recipe(load_recipe(write(tmp_path, recipe())), out, progress=False)
        assert not (out / "recipe.json").exists()
    finally:
        first.kill()
        first.wait()


def test_a_missing_previous_adapter_is_named_with_the_fix(tmp_path):
    from gradsift.continual.layout import RunLayout, Step
    from gradsift.continual.runner import previous_adapter

    stages = [{"name": n, "data": {"synthetic": "sentiment", "size": 8}} for n in ("first", "second")]
    loaded = load_recipe(write(tmp_path, recipe(stages=stages)))
    arm = tmp_path / "run" / "seed-0" / "full"
    step = Step(seed=0, arm="full", index=2, stage="second", layout=RunLayout(tmp_path / "run"))
    (arm / "01-first" / "adapter").mkdir(parents=True)
    with pytest.raises(UserError, match="01-first/adapter' is missing.*01-first/stage.json"):
        previous_adapter(loaded, step)
    (arm / "01-first" / "adapter" / "adapter_config.json").write_text("{}")
    (arm / "01-a-stray").mkdir()  # sorts first: the old glob took it for the previous stage
    assert previous_adapter(loaded, step) == arm / "01-first" / "adapter"


@pytest.mark.parametrize("arm", ["absolute", "../../x"])
def test_an_arm_name_that_leaves_the_run_folder_is_refused_and_touches_nothing(tmp_path, capsys, arm):
    victim = tmp_path / "victim"
    before = user_files(victim)
    name = str(victim) if arm == "absolute" else arm  # `/abs/.../victim` + `/01-sentiment` is the user's folder
    path = write(tmp_path, recipe(arms={name: {"kind": "full"}}))
    status, err = run_cli(["run", str(path), "--out", str(tmp_path / "run")], capsys)
    assert status == 2 and "\n" not in err
    assert "an arm name becomes a folder name" in err and repr(name) in err
    assert snapshot(victim) == before and not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["..", "."])
def test_a_recipe_name_that_escapes_the_default_run_folder_is_refused(tmp_path, monkeypatch, capsys, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    before = user_files(tmp_path)
    path = write(tmp_path / "runs", recipe(name=name))  # `runs/..` would be the current folder
    status, err = run_cli(["run", str(path)], capsys)
    assert status == 2 and "\n" not in err
    assert "name: the recipe name (the default run folder `runs/<name>`) becomes a folder name" in err
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("runs")} == before
