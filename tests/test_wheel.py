"""The built wheel carries the shipped recipes, their data and the lm-eval tasks, and an installed gradsift finds them
from anywhere (not from a checkout)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

FOUND = """
import gradsift
from gradsift.anchors import anchor_source
from gradsift.cli import main
from gradsift.evaluation import evals_path

print("package", gradsift.__file__)
print("tasks", evals_path())
print("anchor rows", len(anchor_source("embedded:refusals").records))
raise SystemExit(main(["run", RECIPE, "--dry-run", "--out", "out"]))
"""


@pytest.mark.slow
def test_an_installed_wheel_finds_its_shipped_recipes_their_data_and_its_lm_eval_tasks(tmp_path):
    dist = tmp_path / "dist"
    build = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(dist),
        str(REPO),
    ]
    built = subprocess.run(build, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = dist.glob("gradsift-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in (
        "gradsift/recipes/testbed-smollm2.yaml",
        "gradsift/recipes/data/align.jsonl",
        "gradsift/evals/tasks/utils.py",
        "gradsift/evals/tasks/gradsift_domain_howto.yaml",
        "gradsift/continual/runner.py",
        "gradsift/evaluation/judge.py",
    ):
        assert name in names, name
    # What `pip install` puts in site-packages, first on the path, run from a folder outside the checkout.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    recipe = site / "gradsift" / "recipes" / "testbed-smollm2.yaml"
    code = FOUND.replace("RECIPE", repr(str(recipe)))
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if line.startswith(("package", "tasks")))
    assert Path(lines["package"]).is_relative_to(site)
    assert Path(lines["tasks"]) == site / "gradsift" / "evals" / "tasks"
    assert "anchor rows" in done.stdout and "recipe testbed-smollm2" in done.stdout
    assert not (elsewhere / "out").exists()  # a dry run writes nothing
