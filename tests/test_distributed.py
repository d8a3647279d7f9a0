"""Scoring with several processes: real launchers start two CPU ranks that split the shards, rank 0 merges, the result
equals one process's, and a run that loses a rank resumes from the shards it finished."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from gradsift.cli import main
from gradsift.distributed import Team, assign_shards, launch_env
from gradsift.store import MANIFEST, SHARDS, TABLE, read_table

ROOT = Path(__file__).resolve().parents[1]
NUM_ROWS = 160  # 40 shards of 4: enough that a rank killed after the first shard leaves most unfinished
SHARD_SIZE = 4
PROMPTS = [
    ("Classify the sentiment: I loved this film.", "positive"),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Write a short poem about the sea.", "Waves fold over waves, the grey sea keeps its own time, and so do I."),
    ("How many legs does a spider have?", "eight"),
]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "data.jsonl"
    with open(path, "w") as handle:
        for i in range(NUM_ROWS):
            prompt, completion = PROMPTS[i % len(PROMPTS)]
            handle.write(json.dumps({"prompt": f"{prompt} ({i})", "completion": completion + " Really." * (i % 7)}))
            handle.write("\n")
    return path


def score_args(model_dir, data, out, *extra):
    return ["score", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--lora-r", "4",
            "--shard-size", str(SHARD_SIZE), *extra]  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, data_file):
    """The same command in one process (in this one: no second interpreter start-up)."""
    out = tmp_path_factory.mktemp("reference") / "scores"
    assert main(score_args(tiny_model_dir, data_file, out, "-q")) == 0
    return read_table(out / TABLE)


def launch_env_vars(**extra):
    env = {key: value for key, value in os.environ.items() if key not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "plugin"), *filter(None, [env.get("PYTHONPATH")])])
    # ACCELERATE_LOG_LEVEL: accelerate sets the root logger's level from it (axolotl sets it in-process); gradsift's
    # own log lines, which these tests read, must survive it.
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", ACCELERATE_LOG_LEVEL="WARNING")
    env.update(extra)
    return env


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "gradsift",
            *args]  # fmt: skip


def run(argv, **env):
    result = subprocess.run(argv, env=launch_env_vars(**env), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def rows_per_rank(out: Path) -> dict[int, int]:
    """Rows each rank scored in the last run, from the manifest; checks every shard was scored or resumed once."""
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["status"] == "complete"
    assert [entry["shard"] for entry in manifest["shards"]] == list(range(manifest["num_shards"]))
    rows: dict[int, int] = {}
    for entry in manifest["shards"]:
        if "rank" in entry:
            rows[entry["rank"]] = rows.get(entry["rank"], 0) + entry["rows"]
    return rows


def assert_same_scores(out: Path, reference) -> None:
    table = read_table(out / TABLE)
    np.testing.assert_array_equal(table.index, reference.index)
    np.testing.assert_array_equal(table.sample_id, reference.sample_id)
    np.testing.assert_array_equal(table.status, reference.status)
    np.testing.assert_allclose(table.grad_norm, reference.grad_norm, rtol=1e-5, atol=0)
    np.testing.assert_allclose(table.loss, reference.loss, rtol=1e-5, atol=0)


@pytest.mark.slow
def test_torchrun_two_ranks_split_the_shards_and_match_one_process(tmp_path, tiny_model_dir, data_file, reference):
    out = tmp_path / "scores"
    result = run(torchrun(*score_args(tiny_model_dir, data_file, out)))
    rows = rows_per_rank(out)
    assert set(rows) == {0, 1} and min(rows.values()) > 0 and sum(rows.values()) == NUM_ROWS, rows
    assert json.loads((out / MANIFEST).read_text())["world_size"] == 2
    for rank in (0, 1):
        assert f"rank {rank} of 2 scored" in result.stderr
    # Only rank 0 reports.
    assert result.stdout.count(f"scored {NUM_ROWS} of {NUM_ROWS} rows ({NUM_ROWS} ok) with 2 processes") == 1
    assert_same_scores(out, reference)


def stop(launchers: list[subprocess.Popen], workers: list[psutil.Process]) -> None:
    """Kill what this test started and is still running: the launcher and the ranks it started."""
    for process in [*workers, *launchers]:
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
            process.kill()
    for launcher in launchers:
        launcher.wait(timeout=30)


@pytest.mark.slow
def test_a_killed_rank_loses_only_unfinished_shards(tmp_path, tiny_model_dir, data_file, reference):
    out = tmp_path / "scores"
    argv = torchrun(*score_args(tiny_model_dir, data_file, out))
    with open(tmp_path / "killed.log", "w") as log:
        launcher = subprocess.Popen(argv, env=launch_env_vars(), stdout=log, stderr=subprocess.STDOUT)
    # torchrun starts each rank in its own session: a process-group kill would not reach them, so keep their pids.
    workers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 180
        while not list((out / SHARDS).glob("*.parquet")):
            assert launcher.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no shard was written in 180 s"
            time.sleep(0.02)
        workers = psutil.Process(launcher.pid).children(recursive=True)
        victim = next(worker for worker in workers if worker.environ().get("RANK") == "1")
        victim.send_signal(signal.SIGKILL)
        assert launcher.wait(timeout=60) != 0  # torchrun stops rank 0 and fails
    finally:
        stop([launcher], workers)
    manifest = json.loads((out / MANIFEST).read_text())
    before = {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in (out / SHARDS).glob("*.parquet")}
    assert manifest["status"] == "running" and not (out / TABLE).exists()
    assert 0 < len(before) < manifest["num_shards"], "the run finished before a rank could be killed"

    result = run(argv)  # the same command again
    assert f"Resuming: {len(before)} of {manifest['num_shards']} shards already scored" in result.stderr
    after = {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in (out / SHARDS).glob("*.parquet")}
    assert {name: after[name] for name in before} == before  # finished shards were not rescored
    resumed = {entry["shard"] for entry in json.loads((out / MANIFEST).read_text())["shards"] if entry.get("resumed")}
    assert resumed == {int(Path(name).stem) for name in before}
    rows = rows_per_rank(out)
    assert set(rows) == {0, 1} and sum(rows.values()) == NUM_ROWS - SHARD_SIZE * len(before)
    assert_same_scores(out, reference)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_accelerate_launch_multi_gpu_starts_two_ranks_on_cpu(tmp_path, tiny_model_dir, data_file, reference):
    """`--cpu --num_processes 2` would start ONE process (accelerate's simple launcher); `--multi_gpu` starts two."""
    out = tmp_path / "scores"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port()), "-m", "gradsift"]  # fmt: skip
    # A private HF_HOME: no user `accelerate config` file changes the launcher.
    run([*launcher, *score_args(tiny_model_dir, data_file, out, "--device", "cpu", "-q")], HF_HOME=str(tmp_path))
    rows = rows_per_rank(out)
    assert set(rows) == {0, 1} and min(rows.values()) > 0 and sum(rows.values()) == NUM_ROWS, rows
    assert_same_scores(out, reference)


# --- the pieces, in one process ----------------------------------------------------------------------------------


def test_shards_go_costliest_first_to_the_least_loaded_rank():
    assert assign_shards({0: 400, 1: 300, 2: 200, 3: 100}, 2) == [[0, 3], [1, 2]]
    assert assign_shards({5: 10, 2: 10, 7: 10}, 2) == [[2, 7], [5]]  # ties: lower shard, lower rank
    assert assign_shards({0: 9}, 3) == [[0], [], []]
    assert assign_shards({}, 2) == [[], []]


def test_one_process_without_a_launcher():
    assert launch_env({}) == launch_env({"WORLD_SIZE": "1"})
    assert launch_env({}).world_size == 1
    team = Team()
    assert team.is_main and team.broadcast(3) == 3 and team.gather(3) == [3] and team.on_main(lambda: 4) == 4


@pytest.mark.parametrize(
    ("environ", "fragments"),
    [
        ({"WORLD_SIZE": "two"}, ["`WORLD_SIZE` must be an integer", "'two'"]),
        ({"WORLD_SIZE": "2", "LOCAL_RANK": "0"}, ["`RANK` is not set", "torchrun --nproc_per_node N"]),
        ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"}, ["`RANK` must be in [0, 2)", "got 2"]),
    ],
)
def test_launch_environment_errors_name_the_key(environ, fragments):
    with pytest.raises(ValueError) as error:
        launch_env(environ)
    for fragment in fragments:
        assert fragment in str(error.value)


TEAM_SCRIPT = """
import sys
from gradsift.distributed import launched_team
from gradsift.errors import UserError

with launched_team(use_cuda=False) as team, open(f"{sys.argv[1]}/rank{team.rank}.txt", "w") as log:
    for name, meet in (("every", team.on_every_rank), ("main", team.on_main)):
        try:
            meet(lambda: 1 / (team.rank - (name == "every")))  # fails on rank 1, then on rank 0
        except Exception as error:
            log.write(f"{name} {team.rank}/{team.world_size}: {type(error).__name__}: {error}\\n")
    try:  # a user's mistake on rank 0 stays one on every rank (one line, exit 2), not a bug
        team.on_main(lambda: (_ for _ in ()).throw(UserError("bad --out")))
    except Exception as error:
        log.write(f"user {team.rank}/{team.world_size}: {type(error).__name__}: {error}\\n")
"""


def test_a_failure_on_one_rank_is_raised_on_every_rank(tmp_path):
    """So no rank waits for a peer that already failed (until the timeout)."""
    script = tmp_path / "team.py"
    script.write_text(TEAM_SCRIPT)
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    run([*argv, str(tmp_path)])
    lines = set((tmp_path / "rank0.txt").read_text().splitlines() + (tmp_path / "rank1.txt").read_text().splitlines())
    assert lines == {
        "every 1/2: ZeroDivisionError: division by zero",
        "every 0/2: RuntimeError: 1 of 2 ranks failed; rank 1: ZeroDivisionError: division by zero",
        "main 0/2: ZeroDivisionError: division by zero",
        "main 1/2: RuntimeError: Rank 0 of 2 failed: ZeroDivisionError: division by zero",
        "user 0/2: UserError: bad --out",
        "user 1/2: UserError: Rank 0 of 2 failed: bad --out",
    }, lines
