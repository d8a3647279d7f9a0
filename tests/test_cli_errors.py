"""The `gradsift` command on bad data and bad options: exit status 2 and one line naming the file, row or key."""

from __future__ import annotations

import json

import pytest

from gradsift.cli import main
from test_cli import score_args, user_error

GOOD = {"prompt": "Is the sky blue on a clear day?", "completion": " yes"}


def write_lines(path, *lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def scored(tmp_path_factory, tiny_model_dir):
    """Five rows scored once, the first holding the line separators U+2028, U+2029 and U+0085 inside a string."""
    folder = tmp_path_factory.mktemp("scored")
    first = json.dumps({"prompt": "Two lines:\u2028one\u2029two\u0085three.", "completion": " ok"}, ensure_ascii=False)
    lines = [first] + [json.dumps({**GOOD, "completion": f" yes{'!' * i}"}) for i in range(4)]
    data = write_lines(folder / "data.jsonl", *lines)
    code = main(score_args(tiny_model_dir, data, folder / "scores"))
    return folder, lines, code


@pytest.mark.parametrize(
    "lines,message",
    [
        (
            [json.dumps(GOOD), json.dumps({"prompt": "Hi?", "response": "no"})],
            "line 2: no `completion` column (it has ['prompt', 'response'])",
        ),
        (
            [json.dumps(GOOD), json.dumps({"prompt": "Hi?", "completion": 5})],
            "line 2: `completion` must be a string or a list of chat messages; got a number 5",
        ),
        ([json.dumps(GOOD), "[1, 2]"], "line 2: an array [1, 2]"),
        # Blank lines count: the line number is the file's.
        (["", json.dumps(GOOD), "", '{"prompt": "Hi?", "completion": }'], "line 4: invalid JSON"),
    ],
    ids=["missing-column", "completion-not-a-string", "not-an-object", "invalid-json-after-blank-lines"],
)
def test_a_bad_row_is_named_by_its_line_in_the_file(tmp_path, tiny_model_dir, capsys, lines, message):
    data = write_lines(tmp_path / "data.jsonl", *lines)
    user_error(capsys, score_args(tiny_model_dir, data, tmp_path / "out"), str(data), message)


def test_a_file_that_is_not_utf8_is_named(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "data.jsonl"
    data.write_bytes('{"prompt": "Café?", "completion": " oui"}\n'.encode("latin-1"))
    user_error(capsys, score_args(tiny_model_dir, data, tmp_path / "out"), str(data), "is not UTF-8 text")


def test_line_separators_inside_strings_are_scored_and_kept_byte_for_byte(scored, capsys):
    folder, lines, code = scored
    assert code == 0
    kept = folder / "kept.jsonl"
    assert (
        main(["select", str(folder / "scores"), "--rule", "threshold", "--max-grad-norm", "1e9", "--out", str(kept)])
        == 0
    )
    assert capsys.readouterr().out.startswith("kept 5/5 (100.0%)")
    assert kept.read_bytes() == "".join(line + "\n" for line in lines).encode()


def test_a_keep_fraction_that_keeps_no_row_is_refused(scored, capsys):
    folder, _, _ = scored
    kept = folder / "none.jsonl"
    argv = ["select", str(folder / "scores"), "--keep-fraction", "0.01", "--out", str(kept)]
    user_error(capsys, argv, "`selection.keep_fraction` 0.01 keeps no row: 5 rows are eligible", "at least 0.2")
    assert not kept.exists()


def test_a_config_file_that_is_not_yaml_is_named(tmp_path, capsys):
    config = tmp_path / "gradsift.yaml"
    config.write_text("selection:\n  rule: [moderate\n")
    user_error(capsys, ["select", str(tmp_path), "--out", "x.jsonl", "--config", str(config)], str(config))


STRICT_TEMPLATE = (  # as Llama 2's and Mistral's templates refuse a conversation
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_a_row_the_chat_template_refuses_is_one_line_naming_it(tmp_path, tiny_model_dir, capsys):
    import shutil

    from transformers import AutoTokenizer

    model = tmp_path / "strict-model"
    shutil.copytree(tiny_model_dir, model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = STRICT_TEMPLATE
    tokenizer.save_pretrained(model)
    turn = lambda role, text: {"role": role, "content": text}  # noqa: E731
    good = {"messages": [turn("user", "Is the sky blue?"), turn("assistant", "Yes.")]}
    bad = {"messages": [turn("user", "Is the sky blue?"), turn("user", "Answer!"), turn("assistant", "Yes.")]}
    data = write_lines(tmp_path / "chats.jsonl", json.dumps(good), json.dumps(bad))
    refused = "line 2: the tokenizer's chat template refuses the row"
    err = user_error(capsys, score_args(model, data, tmp_path / "scores"), str(data), refused,
                     "Conversation roles must alternate", "['user', 'user', 'assistant']")  # fmt: skip
    assert "Traceback" not in err and not (tmp_path / "scores" / "scores.json").exists()


def test_a_chat_template_refusal_raised_inside_trl_or_lm_eval_is_one_line(monkeypatch, capsys):
    from jinja2.exceptions import TemplateError

    import gradsift.cli

    def rendering(args):  # as TRL's or lm-eval's rendering of a conversation raises it, out of gradsift's reach
        raise TemplateError("Conversation roles must alternate user/assistant/user/assistant/...")

    monkeypatch.setattr(gradsift.cli, "run_eval", rendering)
    user_error(capsys, ["eval", "--model", "m", "--tasks", "t"], "gradsift eval: error: the tokenizer's chat template",
               "Conversation roles must alternate")  # fmt: skip


def test_a_broken_template_elsewhere_keeps_its_traceback(monkeypatch):
    """Only a template's own `raise_exception` (TemplateError itself) is the user's; an undefined name in a template
    (lm-eval renders gradsift's task files with StrictUndefined) is a bug and keeps its traceback."""
    from jinja2.exceptions import UndefinedError

    import gradsift.cli

    def rendering(args):
        raise UndefinedError("'doc' is undefined")

    monkeypatch.setattr(gradsift.cli, "run_eval", rendering)
    with pytest.raises(UndefinedError):
        main(["eval", "--model", "m", "--tasks", "t"])
