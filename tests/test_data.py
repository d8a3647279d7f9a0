"""Each format's labels mask exactly the prompt and the padding; sources read and write rows faithfully."""

from __future__ import annotations

import json

import pytest

from gradsift.config import DataConfig
from gradsift.data import IGNORE_INDEX, check_rows, detect_format, load_source
from gradsift.errors import UserError
from gradsift.tokenization import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    collate,
    make_batches,
    tokenize_records,
)


def spans(row, tokenizer):
    """Decode the labelled and the unlabelled tokens, each contiguous run on its own."""
    runs: list[tuple[bool, list[int]]] = []
    for token, label in zip(row.input_ids, row.labels):
        trained = label != IGNORE_INDEX
        if trained:
            assert label == token  # a trained position predicts the token that is there
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(token)
        else:
            runs.append((trained, [token]))
    return [(trained, tokenizer.decode(tokens)) for trained, tokens in runs]


def one(record, tokenizer, **config):
    return tokenize_records([record], tokenizer, DataConfig(**config))[0]


def test_prompt_completion_text_labels_only_the_completion_and_eos(tokenizer):
    row = one({"prompt": "What is the capital of France?", "completion": " Paris"}, tokenizer)
    assert spans(row, tokenizer) == [(False, "What is the capital of France?"), (True, " Paris<|im_end|>")]


def test_prompt_completion_without_completion_only_loss_labels_everything(tokenizer):
    row = one({"prompt": "Is the sky blue?", "completion": " yes"}, tokenizer, completion_only_loss=False)
    assert row.labels == row.input_ids


def test_conversational_prompt_completion_labels_the_assistant_turn(tokenizer):
    record = {
        "prompt": [{"role": "user", "content": "Is the sky blue?"}],
        "completion": [{"role": "assistant", "content": "yes"}],
    }
    row = one(record, tokenizer)
    assert spans(row, tokenizer) == [
        (False, "<|im_start|>user\nIs the sky blue?<|im_end|>\n<|im_start|>assistant\n"),
        (True, "yes<|im_end|>\n"),  # TRL trains on everything after the prompt
    ]


def test_messages_label_every_assistant_turn_with_its_end_token(tokenizer):
    record = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Translate to French: good morning."},
            {"role": "assistant", "content": "bonjour"},
            {"role": "user", "content": "How many legs does a spider have?"},
            {"role": "assistant", "content": "eight"},
        ]
    }
    row = one(record, tokenizer)
    assert spans(row, tokenizer) == [
        (
            False,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nTranslate to French: good morning."
            "<|im_end|>\n<|im_start|>assistant\n",
        ),
        (True, "bonjour<|im_end|>"),
        (False, "\n<|im_start|>user\nHow many legs does a spider have?<|im_end|>\n<|im_start|>assistant\n"),
        (True, "eight<|im_end|>"),
        (False, "\n"),
    ]


def test_messages_without_assistant_only_loss_label_everything(tokenizer):
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "yes"}]}
    row = one(record, tokenizer, assistant_only_loss=False)
    assert row.labels == row.input_ids


@pytest.mark.parametrize("with_input", [True, False])
def test_alpaca_labels_only_the_output(tokenizer, with_input):
    record = {
        "instruction": "Translate to French.",
        "input": "good morning" if with_input else "",
        "output": "bonjour",
    }
    row = one(record, tokenizer)
    template = ALPACA_PROMPT if with_input else ALPACA_PROMPT_NO_INPUT
    prompt = template.format(instruction="Translate to French.", input="good morning")
    assert spans(row, tokenizer) == [(False, prompt), (True, "bonjour<|im_end|>")]


def test_tokenized_rows_keep_their_labels(tokenizer):
    row = one({"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}, tokenizer)
    assert row.input_ids == [5, 6, 7, 8] and row.labels == [-100, -100, 7, 8]
    assert row.num_response_tokens == 2


def test_tokenized_rows_with_mismatched_lengths_are_rejected(tokenizer):
    with pytest.raises(UserError, match="3 `input_ids` but 2 `labels`"):
        one({"input_ids": [5, 6, 7], "labels": [-100, 7]}, tokenizer)


def test_collate_pads_right_and_masks_padding_in_labels(tokenizer):
    rows = tokenize_records(
        [{"prompt": "Q?", "completion": " a long answer here"}, {"prompt": "Q?", "completion": " no"}],
        tokenizer,
        DataConfig(),
    )
    batch = collate(rows, tokenizer.pad_token_id)
    short = len(rows[1].input_ids)
    assert batch["input_ids"].shape[1] == len(rows[0].input_ids) > short
    assert batch["attention_mask"][1].tolist() == [1] * short + [0] * (batch["input_ids"].shape[1] - short)
    assert batch["labels"][1, :short].tolist() == rows[1].labels
    assert (batch["labels"][1, short:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][1, short:] == tokenizer.pad_token_id).all()


def test_truncation_keeps_the_start_and_is_recorded(tokenizer):
    record = {"prompt": "Q?", "completion": " Waves fold over waves, the grey sea keeps its own time."}
    full = one(record, tokenizer)
    cut = one(record, tokenizer, max_length=6)
    assert not full.truncated and cut.truncated
    assert cut.input_ids == full.input_ids[:6] and cut.labels == full.labels[:6]


def test_truncation_can_leave_no_response_tokens(tokenizer):
    row = one({"prompt": "Explain photosynthesis in one sentence.", "completion": " Plants."}, tokenizer, max_length=3)
    assert row.truncated and row.num_response_tokens == 0


def test_sample_ids_are_content_hashes_with_duplicate_counters(tokenizer):
    records = [
        {"prompt": "Q?", "completion": " yes"},
        {"prompt": "Q?", "completion": " no"},
        {"prompt": "Q?", "completion": " yes"},
    ]
    ids = [row.sample_id for row in tokenize_records(records, tokenizer, DataConfig())]
    assert ids[0].endswith("#0") and ids[2].endswith("#1") and ids[1].endswith("#0")
    assert ids[0].split("#")[0] == ids[2].split("#")[0] != ids[1].split("#")[0]
    again = [row.sample_id for row in tokenize_records(records, tokenizer, DataConfig())]
    assert again == ids


def test_unknown_columns_list_the_supported_formats():
    with pytest.raises(UserError) as error:
        detect_format(["question", "answer"])
    message = str(error.value)
    for column in ("`prompt`", "`completion`", "`messages`", "`instruction`", "`output`", "`input_ids`", "`labels`"):
        assert column in message


def test_empty_dataset_is_rejected(tokenizer):
    with pytest.raises(UserError, match="empty"):
        tokenize_records([], tokenizer, DataConfig())


def test_batches_respect_the_token_budget_and_sort_by_length():
    lengths = [5, 50, 7, 48, 20, 3, 49]
    batches = make_batches(lengths, max_tokens_per_batch=100, max_batch_size=8)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) * max(lengths[i] for i in batch) <= 100 or len(batch) == 1
    assert batches[0] == [1, 6]  # longest first: 50 and 49 fit, 48 would make 3 × 50 > 100


def test_jsonl_subset_is_written_byte_for_byte(tmp_path):
    lines = [
        '{"prompt": "a",   "completion": "b"}',
        '{"completion": "d", "prompt": "c", "extra": [1, 2]}',
        '{"prompt": "e", "completion": "f"}',
    ]
    source_path = tmp_path / "in.jsonl"
    source_path.write_text("\n".join(lines) + "\n")
    before = source_path.read_bytes()
    source = load_source(source_path)
    source.write_subset([2, 0], tmp_path / "out.jsonl")
    assert (tmp_path / "out.jsonl").read_text() == lines[2] + "\n" + lines[0] + "\n"
    assert source_path.read_bytes() == before


def test_parquet_subset_keeps_the_schema(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"prompt": ["a", "b", "c"], "completion": ["x", "y", "z"], "score": [1, 2, 3]})
    pq.write_table(table, tmp_path / "in.parquet")
    load_source(tmp_path / "in.parquet").write_subset([1], tmp_path / "out.parquet")
    out = pq.read_table(tmp_path / "out.parquet")
    assert out.schema.equals(table.schema) and out.to_pylist() == [{"prompt": "b", "completion": "y", "score": 2}]


def test_json_array_files_are_read(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"prompt": "a", "completion": "b"}]))
    assert load_source(path).records == [{"prompt": "a", "completion": "b"}]


def test_datasets_objects_are_accepted():
    import datasets

    dataset = datasets.Dataset.from_list([{"prompt": "a", "completion": "b"}])
    source = load_source(dataset)
    assert source.records == [{"prompt": "a", "completion": "b"}] and source.fingerprint


def test_missing_data_file_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_source(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("spec", ["data/rows/more.jsonl.gz", "corpora/team/set", ".hidden"])
def test_a_missing_path_that_cannot_be_a_hub_id_is_a_file_error_for_the_cli_and_recipes_alike(spec, tmp_path):
    from gradsift.continual.paths import resolve_path
    from gradsift.data import looks_like_file

    assert looks_like_file(spec)
    with pytest.raises(UserError, match="does not exist"):
        load_source(spec)
    with pytest.raises(UserError, match="does not exist"):
        resolve_path(spec, tmp_path)
    assert not looks_like_file("org/name") and not looks_like_file("gsm8k")


def test_unreachable_hub_dataset_is_a_clear_error():
    with pytest.raises(UserError, match="Could not load dataset 'nobody/no-such-dataset'"):
        load_source("nobody/no-such-dataset")


def test_atomically_written_files_get_the_usual_permissions(tmp_path):
    import os
    import stat

    from gradsift.fileio import atomic_path

    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "out.json") as tmp:
            tmp.write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out.json").stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary file left behind


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temporary_file(tmp_path):
    from gradsift.fileio import atomic_path

    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


# --- every row is checked before any is tokenized -------------------------------------------------------------------


def write_lines(path, *lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


GOOD = '{"prompt": "Q?", "completion": " yes"}'


class NoTokenizer:
    """Fails the test if any row reaches tokenization."""

    def __getattr__(self, name):
        raise AssertionError(f"tokenizer.{name} used before the rows were checked")

    def __call__(self, *args, **kwargs):
        raise AssertionError("tokenizer called before the rows were checked")


def test_a_row_without_the_response_column_is_named_by_its_line(tmp_path):
    # Row 0 is fine, so the format is known; the blank line still counts, as in an editor.
    path = write_lines(tmp_path / "data.jsonl", GOOD, "", '{"prompt": "Q2?", "answer": "no"}')
    with pytest.raises(UserError) as error:
        tokenize_records(load_source(path).records, NoTokenizer(), DataConfig())
    message = str(error.value)
    for fragment in (str(path), "1 of 2 rows", "line 3: no `completion` column (it has ['answer', 'prompt'])"):
        assert fragment in message


@pytest.mark.parametrize(
    "row, problem",
    [
        ({"prompt": "Q?", "completion": 5}, "`completion` must be a string or a list of chat messages; got a number"),
        ({"prompt": None, "completion": "a"}, "`prompt` must be a string or a list of chat messages; got null"),
        ({"prompt": "Q?", "completion": [{"role": "assistant", "content": "a"}]}, "`prompt` is a string but"),
        ({"prompt": [{"role": "user"}], "completion": []}, '`prompt[0]` must be a chat message {"role": "...", "co'),
        ({"messages": "hi"}, '`messages` must be a list of chat messages; got a string "hi"'),
        ({"messages": [{"role": "user", "content": 3}]}, "`messages[0]` must be a chat message"),
        ({"messages": [["user", "hi"]]}, "`messages[0]` must be a chat message"),
        ({"instruction": "Do.", "output": 1.5}, "`output` must be a string; got a number 1.5"),
        ({"instruction": "Do.", "input": ["x"], "output": "ok"}, '`input` must be a string; got an array ["x"]'),
        ({"input_ids": [1, "2"], "labels": [1, 2]}, "`input_ids` must be a list of integer token ids"),
        ({"input_ids": [1, 2], "labels": [1, True]}, "`labels` must be a list of integer token ids"),
    ],
)
def test_a_value_of_the_wrong_type_is_named_with_what_it_holds(row, problem):
    with pytest.raises(UserError) as error:
        check_rows([row])
    assert f"row 0 (counting from 0): {problem}" in str(error.value)


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": "", "completion": ""},
        {"prompt": [], "completion": [{"role": "assistant", "content": "a"}]},
        {"messages": []},
        {"instruction": "Do.", "input": None, "output": "ok"},
        {"instruction": "Do.", "output": "ok"},
        {"input_ids": [], "labels": []},
    ],
)
def test_rows_of_the_right_types_pass(row):
    check_rows([row])


def test_the_first_few_bad_rows_are_reported_in_one_message(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", GOOD, *['{"prompt": "Q?", "completion": 1}'] * 7)
    message = str(pytest.raises(UserError, check_rows, load_source(path).records).value)
    assert "7 of 8 rows" in message and "line 6:" in message and "line 7:" not in message
    assert message.endswith("; and 2 more. Fix or remove these rows (or set `data.format`).")


def test_the_format_is_detected_from_the_columns_most_rows_have(tmp_path):
    # Row 0 has a misspelt column: the rows are still prompt/completion, and row 0 is the one reported.
    path = write_lines(tmp_path / "data.jsonl", '{"promt": "Q?", "completion": "a"}', GOOD, GOOD)
    message = str(pytest.raises(UserError, check_rows, load_source(path).records).value)
    assert "detected from the columns: 2 of 3 rows have `prompt`, `completion`" in message
    assert "line 1: no `prompt` column" in message


def test_a_declared_format_is_checked_on_every_row():
    with pytest.raises(UserError, match="`data.format` is 'alpaca'.*row 1 .*no `instruction`, `output` column"):
        check_rows([{"instruction": "Do.", "output": "ok"}, {"prompt": "Q?", "completion": "a"}], "alpaca")


def test_rows_of_a_dataset_are_named_by_index():
    import datasets

    rows = datasets.Dataset.from_list([{"prompt": "Q?", "completion": "a"}, {"prompt": "Q?", "completion": None}])
    with pytest.raises(UserError, match=r"In the dataset, 1 of 2 rows .* row 1 \(counting from 0\): `completion`"):
        check_rows(load_source(rows).records)


# --- reading JSON Lines and JSON ------------------------------------------------------------------------------------


@pytest.mark.parametrize("line, shown", [("[1, 2]", "an array [1, 2]"), ('"x"', 'a string "x"'), ("null", "null")])
def test_a_jsonl_line_that_is_not_an_object_is_named(tmp_path, line, shown):
    path = write_lines(tmp_path / "data.jsonl", GOOD, line)
    with pytest.raises(UserError) as error:
        load_source(path)
    assert str(path) in str(error.value) and f"line 2: {shown}, not an object" in str(error.value)


def test_invalid_json_is_named_by_its_line_in_the_file(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", "", GOOD, "  ", "", '{"prompt": "Q?" "completion": "a"}', "{")
    with pytest.raises(UserError) as error:
        load_source(path)
    message = str(error.value)
    assert "line 5: invalid JSON (Expecting ',' delimiter at column 17)" in message
    assert "line 6: invalid JSON" in message


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u0085"])
def test_unicode_line_separators_inside_strings_are_kept(tmp_path, separator):
    # JSON allows these raw inside strings; `str.splitlines` would cut the line there.
    lines = [json.dumps({"prompt": f"a{separator}b", "completion": "c"}, ensure_ascii=False), GOOD]
    path = write_lines(tmp_path / "data.jsonl", *lines)
    source = load_source(path)
    assert source.records[0]["prompt"] == f"a{separator}b" and len(source) == 2
    source.write_subset([1, 0], tmp_path / "out.jsonl")
    assert (tmp_path / "out.jsonl").read_bytes() == (lines[1] + "\n" + lines[0] + "\n").encode()


def test_crlf_lines_and_blank_lines_are_read(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(f"{GOOD}\r\n\r\n{GOOD}\r\n".encode())
    source = load_source(path)
    assert source.records == [json.loads(GOOD)] * 2 and source.records.line_numbers == [1, 3]


def test_a_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + '{"prompt": "café", "completion": "a"}'.encode("latin-1") + b"\n")
    with pytest.raises(UserError, match=r"data\.jsonl' is not UTF-8 text: byte b'\\xe9' at line 2.*Save the file"):
        load_source(path)


def test_json_lines_in_a_json_file_are_read(tmp_path):
    path = write_lines(tmp_path / "rows.json", GOOD, GOOD)
    assert load_source(path).records == [json.loads(GOOD)] * 2


@pytest.mark.parametrize(
    "text, fragment",
    [
        ('{\n  "prompt": "Q?",\n  "completion": "a"\n}\n', "holds a single JSON object over several lines"),
        ('[{"prompt": "Q?", "completion": "a"}, 3]', "row 1 (counting from 0): a number 3"),
        ('[{"prompt": "Q?", "completion": "a"},\n {"prompt": }]', "not valid JSON: Expecting value at line 2, column"),
        ("prompt,completion\nQ?,a\n", "neither a JSON array of row objects nor JSON Lines: line 1: invalid JSON"),
    ],
)
def test_a_json_file_that_is_neither_an_array_of_objects_nor_json_lines_is_refused(tmp_path, text, fragment):
    path = tmp_path / "rows.json"
    path.write_text(text)
    with pytest.raises(UserError) as error:
        load_source(path)
    assert str(path) in str(error.value) and fragment in str(error.value)


def test_an_output_file_of_another_suffix_is_refused(tmp_path):
    source = load_source(write_lines(tmp_path / "data.jsonl", GOOD))
    with pytest.raises(UserError, match=r"must end in \.jsonl, \.json or \.parquet; got '\.csv'"):
        source.write_subset([0], tmp_path / "kept.csv")


def test_every_format_is_checked_and_tokenized_by_the_one_list_of_formats():
    import typing

    from gradsift.config import FORMAT_COLUMNS, DataConfig
    from gradsift.data import ROW_CHECKS
    from gradsift.tokenization import TOKENIZERS

    assert ROW_CHECKS.keys() == TOKENIZERS.keys() == FORMAT_COLUMNS.keys()
    assert typing.get_args(DataConfig.model_fields["format"].annotation) == ("auto", *FORMAT_COLUMNS)
