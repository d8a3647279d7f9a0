"""Never lose or touch a user's files: outputs never land on inputs or on files gradsift did not write, a rescore
replaces finished scores only once it is complete, and one writer per folder."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gradsift.cli import main
from gradsift.locking import LOCK_NAME, folder_lock
from gradsift.store import MANIFEST, SHARDS, STAGING, TABLE, ScoreStore

ROOT = Path(__file__).resolve().parents[1]


def score_args(model_dir, data, out, *extra):
    return ["score", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--lora-r", "4", "-q", *extra]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def user_error(capsys, argv, *fragments):
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def strict_loads(text: str):
    """json.loads that refuses NaN and Infinity, as strict JSON parsers (RFC 8259) do."""

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def data_file(tmp_path, mixed_records):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in mixed_records))
    return path


@pytest.fixture
def scored(tmp_path, tiny_model_dir, data_file, capsys):
    out = tmp_path / "scores"
    assert main(score_args(tiny_model_dir, data_file, out)) == 0
    capsys.readouterr()
    return out


# --- `gradsift score --out` ------------------------------------------------------------------------------------------


def test_score_refuses_a_folder_it_did_not_write_and_leaves_it_as_it_was(tmp_path, tiny_model_dir, data_file, capsys):
    # The user's own folder happens to hold files named like gradsift's: they are not gradsift's to delete.
    folder = tmp_path / "mine"
    (folder / SHARDS).mkdir(parents=True)
    (folder / SHARDS / "00000.parquet").write_bytes(b"my shard")
    (folder / TABLE).write_bytes(b"my table")
    (folder / "notes.txt").write_text("keep me")
    before = snapshot(folder)
    user_error(capsys, score_args(tiny_model_dir, data_file, folder), str(folder), "holds no scores.json", "--out")
    assert snapshot(folder) == before
    assert not (folder / LOCK_NAME).exists()


def test_score_out_that_is_a_file_is_refused(tmp_path, tiny_model_dir, data_file, capsys):
    target = tmp_path / "scores.txt"
    target.write_text("a file")
    user_error(capsys, score_args(tiny_model_dir, data_file, target), str(target), "is an existing file")
    assert target.read_text() == "a file"


def test_score_writes_into_an_empty_folder_and_its_own_folder(tmp_path, tiny_model_dir, data_file, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(score_args(tiny_model_dir, data_file, empty)) == 0
    # Its own folder, with the user's kept rows beside the scores (as `make demo-score` does), is gradsift's.
    (empty / "kept.jsonl").write_text("{}\n")
    assert main(score_args(tiny_model_dir, data_file, empty, "--lora-r", "2")) == 0
    assert (empty / "kept.jsonl").read_text() == "{}\n"


def test_a_second_writer_is_refused_while_the_first_runs(tmp_path, tiny_model_dir, data_file, capsys, caplog):
    out = tmp_path / "scores"
    holder = "import sys, time\nfrom gradsift.locking import folder_lock\nwith folder_lock(sys.argv[1]):\n"
    holder += "    print('held', flush=True)\n    time.sleep(120)\n"
    first = subprocess.Popen([sys.executable, "-c", holder, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "held"
        user_error(capsys, score_args(tiny_model_dir, data_file, out), "being written by another gradsift process",
                   f"pid {first.pid}")  # fmt: skip
        assert not (out / MANIFEST).exists()
    finally:
        first.send_signal(signal.SIGKILL)  # killed: no chance to release or remove its lock file
        first.wait()
    assert (out / LOCK_NAME).exists()
    # The kernel dropped the dead holder's lock: the next writer takes the folder over, saying so.
    assert main(score_args(tiny_model_dir, data_file, out)) == 0
    assert f"last held by pid {first.pid}" in caplog.text
    assert not (out / LOCK_NAME).exists()


def test_the_lock_is_reentrant_in_one_process_and_released(tmp_path):
    with folder_lock(tmp_path) as path, folder_lock(tmp_path):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists()


# --- rescoring with other options ------------------------------------------------------------------------------------


def test_a_killed_rescore_keeps_the_finished_scores_and_they_are_reused(
    tmp_path, tiny_model_dir, mixed_records, capsys
):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in mixed_records * 10))  # 240 rows
    out = tmp_path / "scores"
    assert main(score_args(tiny_model_dir, data, out, "--shard-size", "1")) == 0
    finished = snapshot(out)
    # The same data with another LoRA rank, killed (SIGKILL) once it has written a few shards of its own.
    command = [
        sys.executable,
        "-m",
        "gradsift",
        *score_args(tiny_model_dir, data, out, "--shard-size", "1", "--lora-r", "2"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list((out / STAGING / SHARDS).glob("*.parquet"))) < 3:
        assert process.poll() is None, "the rescore finished before it could be killed; make it longer"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert {
        name: data for name, data in snapshot(out).items() if not name.startswith((STAGING, LOCK_NAME))
    } == finished
    assert json.loads((out / STAGING / MANIFEST).read_text())["status"] == "running"
    # A rerun with the old options reuses the finished scores (no model is loaded: it reports reuse).
    capsys.readouterr()
    assert main([*score_args(tiny_model_dir, data, out, "--shard-size", "1")]) == 0
    assert capsys.readouterr().out.startswith("reused cached scores for 240 rows")
    # The rescore resumes from its own shards, then replaces the old scores with its complete ones.
    staged = len(list((out / STAGING / SHARDS).glob("*.parquet")))
    assert main(score_args(tiny_model_dir, data, out, "--shard-size", "1", "--lora-r", "2")) == 0
    assert capsys.readouterr().out.startswith(f"scored {240 - staged} of 240 rows")
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["status"] == "complete" and manifest["scoring"]["lora_r"] == 2
    assert not (out / STAGING).exists()
    assert len(list((out / SHARDS).glob("*.parquet"))) == 240


def test_a_killed_writes_temporary_files_go_with_the_rescore_and_nothing_else_does(
    tmp_path, tiny_model_dir, mixed_records
):
    # A SIGKILL in the middle of an atomic write leaves `.<file>.<8 characters>.tmp` beside the file; the rescore that
    # completes removes those of its own files, and the folder with them, never a file it cannot name.
    from gradsift.fileio import atomic_leftover

    assert atomic_leftover(".00003.parquet.k2x9_a7q.tmp", re.compile(r"\d{5}\.parquet"))
    assert atomic_leftover(".scores.json.zz00aa11.tmp", MANIFEST)
    assert not atomic_leftover(".notes.txt.abcdefgh.tmp", MANIFEST) and not atomic_leftover("scores.json", MANIFEST)
    assert not atomic_leftover(".scores.json.zz00aa1.tmp", MANIFEST)  # mkstemp writes 8 characters
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in mixed_records))
    out = tmp_path / "scores"
    assert main(score_args(tiny_model_dir, data, out, "--shard-size", "2")) == 0
    (out / STAGING / SHARDS).mkdir(parents=True)
    (out / STAGING / SHARDS / ".00003.parquet.k2x9_a7q.tmp").write_bytes(b"half a shard")
    (out / STAGING / ".scores.json.zz00aa11.tmp").write_text("{")
    assert main(score_args(tiny_model_dir, data, out, "--shard-size", "2", "--lora-r", "2")) == 0
    assert not (out / STAGING).exists()
    assert json.loads((out / MANIFEST).read_text())["scoring"]["lora_r"] == 2
    # Files gradsift did not write stay, and so does the folder holding them.
    (out / STAGING).mkdir()
    (out / STAGING / "notes.txt").write_text("mine")
    (out / STAGING / ".notes.txt.abcdefgh.tmp").write_text("mine too")
    assert main(score_args(tiny_model_dir, data, out, "--shard-size", "2", "--lora-r", "3")) == 0
    assert sorted(p.name for p in (out / STAGING).iterdir()) == [".notes.txt.abcdefgh.tmp", "notes.txt"]
    assert json.loads((out / MANIFEST).read_text())["scoring"]["lora_r"] == 3


def test_a_swap_interrupted_after_the_table_moved_is_completed_not_misread(scored, tmp_path, tiny_model_dir, data_file,
                                                                           capsys):  # fmt: skip
    # Rescore with lora_r 2, then put the folder back as a kill between moving the new table and the new manifest
    # would leave it: the old manifest beside the new table, the new manifest still in .rescore/.
    old_manifest = (scored / MANIFEST).read_bytes()
    assert main(score_args(tiny_model_dir, data_file, scored, "--lora-r", "2")) == 0
    (scored / STAGING).mkdir()
    (scored / STAGING / MANIFEST).write_bytes((scored / MANIFEST).read_bytes())
    (scored / MANIFEST).write_bytes(old_manifest)
    # Read as it stands, neither run's scores are finished: the old manifest does not name this table.
    user_error(capsys, ["select", str(scored), "--out", str(tmp_path / "kept.jsonl")], "holds no finished scores")
    # The next writer completes the swap, and the lora_r 2 scores are reused.
    assert main(score_args(tiny_model_dir, data_file, scored, "--lora-r", "2")) == 0
    assert "reused cached scores" in capsys.readouterr().out
    assert not (scored / STAGING).exists()


def test_a_store_rescore_leaves_the_old_table_until_finish(tmp_path):
    # The unit view of the same rule: begin() with another identity works in .rescore/ and deletes nothing.
    folder = tmp_path / "scores"
    folder.mkdir()
    (folder / MANIFEST).write_text(json.dumps({"gradsift_version": "0", "fingerprints": {"data_fingerprint": "a"},
                                               "status": "complete"}))  # fmt: skip
    (folder / TABLE).write_bytes(b"old table")
    store = ScoreStore(folder, {"data_fingerprint": "b"})
    store.prepare()
    assert store.begin({"shard_size": 4}) == {}
    assert store.work == folder / STAGING
    assert (folder / TABLE).read_bytes() == b"old table"
    assert json.loads((folder / MANIFEST).read_text())["fingerprints"] == {"data_fingerprint": "a"}


# --- `gradsift select --out` -----------------------------------------------------------------------------------------


def test_select_never_writes_over_its_input(scored, data_file, capsys):
    before = data_file.read_bytes()
    user_error(capsys, ["select", str(scored), "--keep-fraction", "0.5", "--out", str(data_file)], "is an input",
               str(data_file))  # fmt: skip
    assert data_file.read_bytes() == before
    # Nor beside it, when an audit file would land on the input (data named dropped.jsonl is refused by name).
    for name in (MANIFEST, TABLE):
        user_error(capsys, ["select", str(scored), "--out", str(scored / name)], name)
    assert json.loads((scored / MANIFEST).read_text())["status"] == "complete"


@pytest.mark.parametrize("name", ["dropped.jsonl", "selection.json"])
def test_select_out_named_like_its_audit_files_is_refused(scored, tmp_path, capsys, name):
    user_error(capsys, ["select", str(scored), "--out", str(tmp_path / "sel" / name)], name, "kept.jsonl")
    assert not (tmp_path / "sel").exists()


@pytest.mark.parametrize("name", ["dropped.jsonl", "selection.json", "kept.jsonl"])
def test_select_does_not_replace_files_it_did_not_write(scored, tmp_path, capsys, name):
    folder = tmp_path / "sel"
    folder.mkdir()
    (folder / name).write_text("the user's own file\n")
    user_error(capsys, ["select", str(scored), "--out", str(folder / "kept.jsonl")], str(folder / name))
    assert snapshot(folder) == {name: b"the user's own file\n"}


def test_select_replaces_its_own_outputs_but_not_edited_ones(scored, tmp_path, capsys):
    out = tmp_path / "sel" / "kept.jsonl"
    for fraction in ("0.5", "0.25"):  # a rerun with another rule replaces what the first run wrote
        assert main(["select", str(scored), "--keep-fraction", fraction, "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 6
    # A second kept file in the same folder: the first stays recorded as gradsift's.
    other = tmp_path / "sel" / "half.jsonl"
    assert main(["select", str(scored), "--keep-fraction", "0.5", "--out", str(other)]) == 0
    assert main(["select", str(scored), "--keep-fraction", "0.5", "--out", str(out)]) == 0
    # Once the user edits the kept file it is theirs.
    out.write_text(out.read_text() + '{"prompt": "mine", "completion": "mine"}\n')
    edited = out.read_bytes()
    user_error(capsys, ["select", str(scored), "--out", str(out)], str(out), "cannot show it wrote it")
    assert out.read_bytes() == edited


@pytest.mark.parametrize("moved", [0, 1])
def test_select_killed_while_moving_its_outputs_leaves_files_it_can_prove_and_replace(
    scored, tmp_path, capsys, monkeypatch, moved
):
    """Each output's sha256 is recorded before it moves into place: killed after `moved` of the two moves, every
    output in place is provably gradsift's and the next `select` replaces it."""
    import gradsift.fileio

    out = tmp_path / "sel" / "kept.jsonl"
    assert main(["select", str(scored), "--keep-fraction", "0.5", "--out", str(out)]) == 0
    real, calls = os.replace, []

    def killed(source, target):
        if ".new." in Path(source).name and ".new." not in Path(target).name:  # a staged output moving into place
            if len(calls) == moved:
                raise KeyboardInterrupt  # the process dies here
            calls.append(target)
        real(source, target)

    monkeypatch.setattr(gradsift.fileio.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        main(["select", str(scored), "--keep-fraction", "0.25", "--out", str(out)])
    monkeypatch.setattr(gradsift.fileio.os, "replace", real)
    record = json.loads((out.parent / "selection.json").read_text())
    assert record["num_kept"] == 12  # the finished run's record, with the new files' sha256 pending
    assert set(record["pending"]) == {"kept.jsonl", "dropped.jsonl"}
    assert len(out.read_text().splitlines()) == (6 if moved else 12)
    assert main(["select", str(scored), "--keep-fraction", "0.25", "--out", str(out)]) == 0
    record = json.loads((out.parent / "selection.json").read_text())
    assert len(out.read_text().splitlines()) == 6 and record["num_kept"] == 6 and "pending" not in record


@pytest.mark.parametrize("older", [False, True])
def test_publish_keeps_every_output_provable_across_two_kills_in_a_row(tmp_path, monkeypatch, older):
    """Run 2 killed after its move, run 3 killed before its move: the file run 2 left stays provable, whether the
    first record is gradsift's own or an older gradsift's without `written`."""
    import gradsift.fileio as fileio

    record_path, out = tmp_path / "record.json", tmp_path / "out.jsonl"
    if older:
        record_path.write_text(json.dumps({"selection": {}, "num_rows": 2, "num_kept": 1, "summary": "kept 1/2"}))
    real = os.replace

    def run(content: str, moves: int | None) -> None:
        """Publish `content` to out.jsonl; killed after `moves` staged moves (None: not killed)."""
        calls = []

        def killed(source, target):
            if ".new." in Path(source).name and ".new." not in Path(target).name:
                if moves is not None and len(calls) == moves:
                    raise KeyboardInterrupt
                calls.append(target)
            real(source, target)

        previous = json.loads(record_path.read_text()) if record_path.exists() else None
        monkeypatch.setattr(fileio.os, "replace", killed)
        try:
            with fileio.staged([out]) as files:
                files[out].write_text(content)
                fileio.publish(record_path, previous, {"gradsift_version": "x", "run": content}, files)
        except KeyboardInterrupt:
            pass
        monkeypatch.setattr(fileio.os, "replace", real)
        assert fileio.recorded(out, json.loads(record_path.read_text())), content

    run("one\n", 1 if older else None)  # over an older record: moved, then killed
    run("two\n", 1)  # moved, then killed before the final record
    assert out.read_text() == "two\n"
    run("three\n", 0)  # killed before moving: "two" is still in place and provable
    assert out.read_text() == "two\n"
    run("four\n", None)
    record = json.loads(record_path.read_text())
    assert out.read_text() == "four\n" and record["run"] == "four\n" and "pending" not in record
    assert not [p for p in tmp_path.iterdir() if ".new." in p.name]  # no staged file left behind
    mode = out.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # the usual mode of a new file, not mkstemp's 0600


def test_publish_over_an_older_record_keeps_its_own_proof(tmp_path):
    """A record without `written` (an older gradsift's) proves its files otherwise (line counts): `publish` must not
    add a `written` that would turn that proof off before the new files are in place."""
    import gradsift.fileio as fileio

    record_path, out = tmp_path / "selection.json", tmp_path / "kept.jsonl"
    legacy = {"selection": {}, "num_rows": 2, "num_kept": 1, "summary": "kept 1/2"}
    record_path.write_text(json.dumps(legacy))
    seen = []
    real = fileio.os.replace

    def peek(source, target):
        if ".new." in Path(source).name and ".new." not in Path(target).name:
            seen.append(json.loads(record_path.read_text()))
        real(source, target)

    fileio.os.replace = peek
    try:
        with fileio.staged([out]) as files:
            files[out].write_text("{}\n")
            fileio.publish(record_path, legacy, {"gradsift_version": "x"}, files)
    finally:
        fileio.os.replace = real
    assert "written" not in seen[0] and seen[0]["num_rows"] == 2 and list(seen[0]["pending"]) == ["kept.jsonl"]
    assert fileio.recorded(out, json.loads(record_path.read_text()))


def test_select_outputs_are_strict_json_after_non_finite_rows(scored, tmp_path, capsys):
    import numpy as np

    from gradsift.store import read_table, write_table

    table = read_table(scored / TABLE)
    table.loss[:3] = np.nan
    table.grad_norm[3] = np.inf
    table.status[:4] = "nonfinite"
    write_table(table, scored / TABLE)
    manifest = json.loads((scored / MANIFEST).read_text())
    manifest.pop("table_sha256")  # edited on purpose: trusted as a manifest from before table hashes
    (scored / MANIFEST).write_text(json.dumps(manifest))
    out = tmp_path / "sel" / "kept.jsonl"
    assert main(["select", str(scored), "--keep-fraction", "0.5", "--out", str(out)]) == 0
    dropped = [strict_loads(line) for line in (out.parent / "dropped.jsonl").read_text().splitlines()]
    nonfinite = [d for d in dropped if d["status"] == "nonfinite"]
    assert len(nonfinite) == 4 and all(d["loss"] is None or d["grad_norm"] is None for d in nonfinite)
    strict_loads((out.parent / "selection.json").read_text())


def test_select_never_writes_its_audit_files_over_the_input(tmp_path, tiny_model_dir, mixed_records, capsys):
    # The scored data happens to be called dropped.jsonl, and --out goes beside it: the audit file would land on it.
    folder = tmp_path / "sel"
    folder.mkdir()
    data = folder / "dropped.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in mixed_records))
    assert main(score_args(tiny_model_dir, data, tmp_path / "scores")) == 0
    before = snapshot(folder)
    user_error(capsys, ["select", str(tmp_path / "scores"), "--out", str(folder / "kept.jsonl")],
               "dropped.jsonl (written beside --out)", "is an input")  # fmt: skip
    assert snapshot(folder) == before


def test_select_out_without_a_data_suffix_is_refused_before_anything_is_written(scored, tmp_path, capsys):
    user_error(capsys, ["select", str(scored), "--out", str(tmp_path / "new" / "kept.txt")], "'.txt'", ".jsonl")
    assert not (tmp_path / "new").exists()
