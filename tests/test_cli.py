"""The `gradsift` command: end to end on a tiny model, and one clear line with exit status 2 for each user error."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from gradsift.cli import UserError, build_parser, main
from gradsift.cli_inspect import length_bins
from gradsift.config import CLI_SECTIONS, SECTIONS, options_markdown

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def data_file(tmp_path, mixed_records):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in mixed_records))
    return path


def score_args(model_dir, data, out, *extra):
    return ["score", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--lora-r", "4", "-q", *extra]


def user_error(capsys, argv, *fragments):
    """Run the CLI, expect exit 2 and a single stderr line holding every fragment, with no traceback."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_score_select_inspect_end_to_end(tmp_path, tiny_model_dir, data_file, capsys, mixed_records):
    out = tmp_path / "scores"
    assert main(score_args(tiny_model_dir, data_file, out)) == 0
    assert "scored 24 of 24 rows (24 ok)" in capsys.readouterr().out
    kept_path = tmp_path / "sel" / "kept.jsonl"
    assert main(["select", str(out), "--rule", "moderate", "--keep-fraction", "0.25", "--out", str(kept_path)]) == 0
    line = capsys.readouterr().out
    assert line.startswith("kept 6/24 (25.0%); dropped ")
    kept = [json.loads(x) for x in kept_path.read_text().splitlines()]
    dropped = [json.loads(x) for x in (tmp_path / "sel" / "dropped.jsonl").read_text().splitlines()]
    assert len(kept) == 6 and len(dropped) == 18
    assert sorted([mixed_records.index(r) for r in kept] + [d["index"] for d in dropped]) == list(range(24))
    assert {d["reason"] for d in dropped} <= {"loss_outlier", "far_from_median"}
    assert all(d["row"] == mixed_records[d["index"]] and d["grad_norm"] > 0 for d in dropped)
    summary = json.loads((tmp_path / "sel" / "selection.json").read_text())
    assert summary["num_kept"] == 6 and sum(summary["dropped"].values()) == 18
    assert main(["inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == 24 and report["status"] == {"ok": 24}
    assert sum(b["rows"] for b in report["length_bins"]) == 24
    assert main(["inspect", str(out)]) == 0
    assert "grad_norm" in capsys.readouterr().out


def test_select_inspect_and_report_never_import_torch(tmp_path, tiny_model_dir, data_file):
    # `import torch` fails in the child: select and inspect must work from the files alone.
    out = tmp_path / "scores"
    assert main(score_args(tiny_model_dir, data_file, out)) == 0
    blocked = "import sys; sys.modules['torch'] = None; "
    run_cli = blocked + "from gradsift.cli import main; sys.exit(main(sys.argv[1:]))"
    kept = tmp_path / "sel" / "kept.jsonl"
    for argv in (["select", str(out), "--keep-fraction", "0.25", "--out", str(kept)], ["inspect", str(out), "--json"]):
        done = subprocess.run([sys.executable, "-c", run_cli, *argv], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    assert len(kept.read_text().splitlines()) == 6
    # (scipy.stats probes a present `torch` module, so the report is checked by what it leaves imported.)
    check = "import sys, gradsift.report; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_inspect_length_bins_are_the_selectionlength_bins():
    # 6 terse rows and 4 long ones, --bins 2: the two bins `selection.length_strata: 2` uses, not one quantile bin.
    lengths = np.array([2, 40, 2, 2, 40, 2, 2, 40, 2, 40])
    table = SimpleNamespace(num_response_tokens=lengths, loss=np.ones(10), grad_norm=np.arange(10.0))
    bins = length_bins(table, SimpleNamespace(keep=lengths == 40), np.ones(10, dtype=bool), 2)
    assert [(b["range"], b["rows"], b["kept"]) for b in bins] == [("2-2", 6, 0), ("40-40", 4, 4)]


def test_inspect_with_fewer_than_one_length_bin_is_refused():
    table = SimpleNamespace(num_response_tokens=np.array([1]), loss=np.ones(1), grad_norm=np.ones(1))
    with pytest.raises(UserError, match="`--bins` must be >= 1; got 0"):
        length_bins(table, SimpleNamespace(keep=np.ones(1, dtype=bool)), np.ones(1, dtype=bool), 0)


def test_flags_win_over_the_config_file(tmp_path):
    config = tmp_path / "gradsift.yaml"
    config.write_text(
        yaml.safe_dump({"gradsift": {"selection": {"rule": "random", "keep_fraction": 0.5}, "scoring": {"lora_r": 8}}})
    )
    from gradsift.cli import config_from_args

    args = build_parser().parse_args(
        ["select", "DIR", "--out", "x.jsonl", "--config", str(config), "--keep-fraction", "0.3"]
    )
    resolved = config_from_args(args)
    assert resolved.selection.rule == "random" and resolved.selection.keep_fraction == 0.3
    assert resolved.scoring.lora_r == 8


def test_the_token_budget_flag_takes_a_number_or_auto(tmp_path, capsys):
    from gradsift.cli import config_from_args

    for value, expected in (("auto", "auto"), ("1024", 1024)):
        args = build_parser().parse_args(["score", "--data", "d.jsonl", "--out", "o", "--max-tokens-per-batch", value])
        assert config_from_args(args).scoring.max_tokens_per_batch == expected
    user_error(
        capsys,
        ["score", "--data", "d.jsonl", "--out", str(tmp_path / "o"), "--max-tokens-per-batch", "0"],
        "`scoring.max_tokens_per_batch`: input should be a whole number of tokens ≥ 1 or 'auto'",
        "got 0",
        "the default 'auto'",
    )


def test_every_config_key_has_a_flag():
    parser = build_parser()
    choices = parser._subparsers._group_actions[0].choices
    flags = set()
    for command in ("score", "select"):
        flags |= {option for action in choices[command]._actions for option in action.option_strings}
    for section in CLI_SECTIONS:
        for name in SECTIONS[section].model_fields:
            assert "--" + name.replace("_", "-") in flags, f"{section}.{name} has no flag"


def test_readme_option_tables_match_the_schema():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- options:begin -->\n", 1)[1].split("<!-- options:end -->", 1)[0]
    assert block == options_markdown()


@pytest.mark.parametrize("command", ["score", "select", "inspect", "eval", "judge", "evals-path"])
def test_help_describes_each_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: gradsift " + command in capsys.readouterr().out


def test_python_dash_m_gradsift_runs():
    result = subprocess.run([sys.executable, "-m", "gradsift", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("gradsift ")


# --- user errors: one line, exit 2 ------------------------------------------------------------------------------


def test_unknown_config_key_is_named(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("selection:\n  keep_fractio: 0.2\n")
    user_error(
        capsys,
        ["select", str(tmp_path), "--out", "x.jsonl", "--config", str(config)],
        "`selection.keep_fractio` is not a gradsift option",
        "keep_fraction",
    )


def test_out_of_range_fraction_is_named(tmp_path, capsys):
    user_error(
        capsys,
        ["select", str(tmp_path), "--out", "x.jsonl", "--keep-fraction", "5"],
        "`selection.keep_fraction`",
        "got 5.0",
    )


def test_file_without_supported_columns_lists_the_formats(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "qa.jsonl"
    data.write_text('{"question": "a", "answer": "b"}\n')
    user_error(
        capsys,
        score_args(tiny_model_dir, data, tmp_path / "out"),
        "Supported formats",
        "prompt_completion",
        "messages",
        "alpaca",
        "tokenized",
    )


def test_empty_dataset_is_refused(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    user_error(capsys, score_args(tiny_model_dir, data, tmp_path / "out"), "empty")


def test_missing_model_path_is_refused(tmp_path, data_file, capsys):
    user_error(
        capsys,
        score_args(tmp_path / "no-such-model", data_file, tmp_path / "out"),
        "`scoring.model`",
        "does not exist",
    )


def test_select_refuses_data_changed_since_scoring(tmp_path, tiny_model_dir, data_file, capsys):
    out = tmp_path / "scores"
    assert main(score_args(tiny_model_dir, data_file, out)) == 0
    data_file.write_text(data_file.read_text().replace("positive", "negative"))
    before = data_file.read_bytes()
    user_error(capsys, ["select", str(out), "--out", str(tmp_path / "kept.jsonl")], "changed since it was scored")
    assert not (tmp_path / "kept.jsonl").exists() and data_file.read_bytes() == before


def test_select_without_scores_is_refused(tmp_path, capsys):
    user_error(capsys, ["select", str(tmp_path), "--out", str(tmp_path / "k.jsonl")], "gradsift score")


def test_rows_without_response_tokens_are_never_kept(tmp_path, tiny_model_dir, capsys):
    rows = [
        {"messages": [{"role": "user", "content": "Is the sky blue?"}, {"role": "assistant", "content": "yes"}]}
        for _ in range(3)
    ]
    rows.insert(1, {"messages": [{"role": "user", "content": "Hello there, no answer follows."}]})
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "scores"
    assert main(score_args(tiny_model_dir, data, out)) == 0
    assert "1 no_response_tokens" in capsys.readouterr().out
    kept = tmp_path / "kept.jsonl"
    assert main(["select", str(out), "--rule", "threshold", "--max-grad-norm", "1e9", "--out", str(kept)]) == 0
    assert len(kept.read_text().splitlines()) == 3
    dropped = [json.loads(x) for x in (tmp_path / "dropped.jsonl").read_text().splitlines()]
    assert [(d["index"], d["reason"], d["grad_norm"]) for d in dropped] == [(1, "no_response_tokens", None)]


# --- the README's main command, on the real embedded model -------------------------------------------------------


@pytest.mark.slow
def test_readme_main_commands_run_on_the_embedded_model(tmp_path):
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^gradsift (score|select|inspect) (.*)$", readme.split("## Command line")[0], re.M)
    assert [name for name, _ in commands] == ["score", "select", "inspect"]
    outputs = []
    for name, rest in commands:
        argv = [sys.executable, "-m", "gradsift", name, *rest.replace("runs/demo-score", str(tmp_path)).split()]
        result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-2000:]
        outputs.append(result.stdout)
    assert "scored 40 of 40 rows (40 ok)" in outputs[0]
    assert outputs[1].startswith("kept 20/40 (50.0%)")
    kept = (tmp_path / "kept.jsonl").read_text().splitlines()
    source = (ROOT / "recipes/data/mixed-tasks.jsonl").read_text().splitlines()
    assert len(kept) == 20 and set(kept) <= set(source)
    assert "response tokens" in outputs[2]


@pytest.mark.parametrize("error", ["KeyError('forced')", "ValueError('forced')"])
def test_a_gradsift_bug_exits_1_with_its_traceback(tmp_path, error):
    # Any exception but a UserError is a bug, a plain ValueError included: never reported as the user's mistake.
    script = (
        "import sys, gradsift.cli as cli\n"
        f"def boom(args): raise {error}\n"
        "cli.run_inspect = boom\n"
        f"sys.argv = ['gradsift', 'inspect', {str(tmp_path)!r}]\n"
        "cli.main_entry()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 1, done.stderr
    assert "Traceback (most recent call last)" in done.stderr and "forced" in done.stderr
    assert "gradsift inspect: error:" not in done.stderr


def test_seeds_that_are_not_integers_are_named(tmp_path, capsys):
    user_error(capsys, ["run", str(ROOT / "recipes" / "demo-smollm2.yaml"), "--seeds", "0,a", "--dry-run"],
               "--seeds '0,a'", "--seeds 0,1,2")  # fmt: skip


def test_a_label_whose_rows_have_no_score_gets_no_auroc_and_the_others_still_do():
    from gradsift.table import label_aurocs

    table = SimpleNamespace(**{name: np.array([1.0, 2.0, 3.0, 4.0]) for name in ("grad_norm", "loss")})
    for name in ("anchor_dot", "anchor_cos", "refusal_logprob"):
        setattr(table, name, np.full(4, np.nan))
    table.num_response_tokens = np.array([5, 6, 0, 0])
    labels = np.array(["benign", "harmful", "empty", "empty"], dtype=object)
    ok = np.array([True, True, False, False])  # the "empty" rows have no response tokens
    aurocs = label_aurocs(table, labels, ok)
    assert set(aurocs) == {"grad_norm", "loss", "num_response_tokens"}
    assert aurocs["grad_norm"] == {"benign": 0.0, "empty": None, "harmful": 1.0}


def _pairwise_auroc(inside: list[float], outside: list[float]) -> float:
    """The slow, obvious AUROC: the share of (inside, outside) pairs the score orders inside-first, ties half."""
    wins = sum((a > b) + 0.5 * (a == b) for a in inside for b in outside)
    return wins / (len(inside) * len(outside))


def test_inspect_with_a_label_column_counts_kept_rows_and_each_scores_auroc_per_label(
    tmp_path, tiny_model_dir, mixed_records, capsys
):
    records = [{**row, "kind": "harmful" if i % 4 == 0 else "benign"} for i, row in enumerate(mixed_records)]
    data = tmp_path / "labelled.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "scores"
    assert main(score_args(tiny_model_dir, data, out)) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json", "--label-column", "kind", "--keep-fraction", "0.25"]) == 0
    labels = json.loads(capsys.readouterr().out)["labels"]
    assert labels["column"] == "kind" and labels["counts"]["harmful"]["rows"] == 6
    assert labels["counts"]["benign"]["scored"] == 18
    assert labels["counts"]["harmful"]["kept"] + labels["counts"]["benign"]["kept"] == 6  # the rule keeps 6 of 24
    scores = {int(r["index"]): r for r in pq.read_table(out / "scores.parquet").to_pylist()}
    kinds = [records[i]["kind"] for i in sorted(scores)]
    for column in ("grad_norm", "loss", "num_response_tokens"):
        values = [scores[i][column] for i in sorted(scores)]
        for kind in ("harmful", "benign"):
            inside = [v for v, k in zip(values, kinds) if k == kind]
            outside = [v for v, k in zip(values, kinds) if k != kind]
            assert labels["auroc"][column][kind] == pytest.approx(_pairwise_auroc(inside, outside))
    assert "anchor_cos" not in labels["auroc"]  # scored without an anchor set: no column to rate
    assert main(["inspect", str(out), "--label-column", "kind"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"grad_norm\s+[01]\.\d{3}\s+[01]\.\d{3}", text) and "0.5 = chance" in text
    user_error(capsys, ["inspect", str(out), "--label-column", "source"], "row 1", "has no `source`", "kind")
    user_error(capsys, ["inspect", str(out), "--data", str(data)], "--data", "only with --label-column")
