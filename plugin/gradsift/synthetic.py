"""Small synthetic domain tasks for the offline demo and testbed: chat rows to train on and held-out rows to evaluate.

Five tasks span the response lengths that matter for gradient-norm selection: terse labels (`sentiment`,
`yes_no`), a short number (`arithmetic`), one sentence (`capitals`) and a few sentences of working (`units`).
Two more are in the style of Dolly's open instruction following, the kind of benign data known to erode refusal
when a chat model is fine-tuned on it: `howto` (numbered step-by-step instructions, "Sure! Here are 4 steps to
...") and `lists` (brainstormed numbered lists, "Here are 5 birds: ..."). Each asks for 1 to 6 items, so one task
holds terse one-line answers and long lists side by side. Every question is assigned to `train` or `test` by a
stable hash of its text, so the two splits never share a question, whatever sizes or seeds are asked for. Rows are
chat `messages` with the task name and the reference `answer`; `howto` and `lists` rows also carry what a correct
answer must hold (`count` items, the `keyword` of the goal, the category's `members`).

The word lists and facts the questions are built from (reviews, capitals, units, how-to goals and their steps, list
categories and their members) are in `gradsift.synthetic_data`; the phrasings and generators are here.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from typing import Any

from gradsift.errors import UserError
from gradsift.synthetic_data import CAPITALS, HOWTO, LISTS, NEGATIVE, POSITIVE, SUBJECTS, UNITS

TASKS = ("sentiment", "yes_no", "arithmetic", "capitals", "units", "howto", "lists")
# One question in five goes to the test split.
TEST_SHARE = 5

_NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
# Prompt and opening of each phrasing of a request for n >= 2 items; n = 1 asks for one terse line instead.
_HOWTO_PHRASINGS = [
    ("How do I {goal}? Give me {n} steps.", "Sure! Here are {n} steps to {goal}:"),
    ("List {n} steps to {goal}.", "Here are {n} steps to {goal}:"),
    ("What are the steps to {goal}? Keep it to {n} steps.", "Of course. To {goal}, follow these {n} steps:"),
]
_HOWTO_ONE = [
    "Give me one tip to {goal}. Answer in one sentence.",
    "What is the key step to {goal}? One sentence only.",
]
_LISTS_PHRASINGS = [
    ("List {n} {plural}.", "Here are {n} {plural}:"),
    ("Name {n} {plural}.", "Sure! Here are {n} {plural}:"),
    ("Can you give me {n} examples of {plural}?", "Of course! Here are {n} examples of {plural}:"),
]
_LISTS_ONE = ["Name one {singular}. Reply with the name only.", "Give me an example of a {singular}, just the name."]


def _numbered(opening: str, items: list[str]) -> str:
    return opening + "\n" + "\n".join(f"{i}. {item}." for i, item in enumerate(items, start=1))


def _spread(steps: list[str], n: int) -> list[str]:
    """n of the steps, first and last included, evenly spread: a short answer still covers the whole task."""
    return [steps[round(i * (len(steps) - 1) / (n - 1))] for i in range(n)] if n > 1 else steps[:1]


def _howto() -> Iterator[tuple[str, str, str, dict[str, Any]]]:
    for goal, keyword, steps in HOWTO:
        for question in _HOWTO_ONE:
            yield question.format(goal=goal), steps[0] + ".", keyword, {"count": 1, "keyword": keyword, "members": []}
        for n in range(2, 7):
            for question, opening in _HOWTO_PHRASINGS:
                words = {"goal": goal, "n": _NUMBERS[n]}
                reply = _numbered(opening.format(**words), _spread(steps, n))
                yield question.format(**words), reply, keyword, {"count": n, "keyword": keyword, "members": []}


def _lists() -> Iterator[tuple[str, str, str, dict[str, Any]]]:
    for plural, singular, members in LISTS:
        check = {"keyword": "", "members": members}
        for k, question in enumerate(_LISTS_ONE):
            item = members[k]
            yield question.format(singular=singular), item + ".", item, {"count": 1, **check}
        for n in range(2, 7):
            for question, opening in _LISTS_PHRASINGS:
                words = {"plural": plural, "n": _NUMBERS[n]}
                # A fixed pick per question, so a rerun (or another seed) sees the same reply to the same question.
                items = random.Random(f"{plural}-{n}-{question}").sample(members, n)
                reply = _numbered(opening.format(**words), items)
                yield question.format(**words), reply, ", ".join(items), {"count": n, **check}


def _sentiment() -> Iterator[tuple[str, str, str]]:
    for subject in SUBJECTS:
        for label, phrases in (("positive", POSITIVE), ("negative", NEGATIVE)):
            for phrase in phrases:
                review = f"{subject} {phrase}."
                yield (
                    f"Classify the sentiment of this review as positive or negative.\nReview: {review}",
                    label,
                    label,
                )


def _yes_no() -> Iterator[tuple[str, str, str]]:
    for a in range(2, 60):
        for b in range(2, 60, 3):
            if a != b:
                answer = "Yes" if a > b else "No"
                yield f"Answer yes or no. Is {a} greater than {b}?", answer, answer


def _arithmetic() -> Iterator[tuple[str, str, str]]:
    for a in range(3, 60, 2):
        for b in range(4, 50, 3):
            yield f"What is {a} + {b}? Reply with the number only.", str(a + b), str(a + b)
            if a > b:
                yield f"What is {a} - {b}? Reply with the number only.", str(a - b), str(a - b)


def _capitals() -> Iterator[tuple[str, str, str]]:
    for country, capital in CAPITALS.items():
        yield f"What is the capital of {country}?", f"The capital of {country} is {capital}.", capital


def _units() -> Iterator[tuple[str, str, str]]:
    for source, target, factor, fact in UNITS:
        for amount in range(2, 40):
            result = amount * factor
            answer = (
                f"{fact}, so we multiply by {factor}. {amount} {source} × {factor} = {result} {target}. "
                f"The answer is {result} {target}."
            )
            yield f"Convert {amount} {source} to {target} and explain the steps.", answer, str(result)


_GENERATORS: dict[str, Callable[[], Iterator[tuple]]] = {
    "sentiment": _sentiment,
    "yes_no": _yes_no,
    "arithmetic": _arithmetic,
    "capitals": _capitals,
    "units": _units,
    "howto": _howto,
    "lists": _lists,
}


def split_of(question: str) -> str:
    """`test` for one question in five (a stable hash of its text), `train` otherwise."""
    digest = int(hashlib.sha256(question.encode("utf-8")).hexdigest()[:8], 16)
    return "test" if digest % TEST_SHARE == 0 else "train"


def pool(task: str, split: str) -> list[tuple[str, str, str]]:
    """Every (question, reply, answer) of a task's split, in a fixed order."""
    return [item[:3] for item in _items(task, split)]


def _items(task: str, split: str) -> list[tuple]:
    """A task's items of one split, each (question, reply, answer) with an optional dict of check fields."""
    if task not in _GENERATORS:
        raise UserError(f"Unknown synthetic task {task!r}; choose from {', '.join(TASKS)}.")
    if split not in ("train", "test"):
        raise UserError(f"Unknown split {split!r}; use 'train' or 'test'.")
    return [item for item in _GENERATORS[task]() if split_of(item[0]) == split]


def generate(task: str, n: int | None = None, split: str = "train", seed: int = 0) -> list[dict[str, Any]]:
    """Return `n` distinct rows of `task` from `split` (all of them when `n` is None), shuffled by `seed`.

    Each row: `{"task", "messages": [user, assistant], "answer"}`. Asking for more rows than the split holds is an
    error that names the size.
    """
    items = _items(task, split)
    if n is not None and n > len(items):
        raise UserError(
            f"Synthetic task {task!r} has {len(items)} {split} questions; {n} were asked for. Ask for at most "
            f"{len(items)}."
        )
    random.Random(f"{task}-{split}-{seed}").shuffle(items)
    return [
        {
            "task": task,
            "messages": [{"role": "user", "content": item[0]}, {"role": "assistant", "content": item[1]}],
            "answer": item[2],
            **(item[3] if len(item) > 3 else {}),
        }
        for item in items[: len(items) if n is None else n]
    ]
