"""Small synthetic domain tasks for the offline demo: chat rows to train on and held-out rows to evaluate.

Five tasks span the response lengths that matter for gradient-norm selection: terse labels (`sentiment`,
`yes_no`), a short number (`arithmetic`), one sentence (`capitals`) and a few sentences of working (`units`). Every
question is assigned to `train` or `test` by a stable hash of its text, so the two splits never share a question,
whatever sizes or seeds are asked for. Rows are chat `messages` with the task name and the reference `answer`.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from typing import Any

TASKS = ("sentiment", "yes_no", "arithmetic", "capitals", "units")
# One question in five goes to the test split.
TEST_SHARE = 5

_SUBJECTS = [
    "The soup", "The service", "The hotel room", "The film", "The battery", "The delivery", "The concert",
    "The new phone", "The pasta", "The staff", "The museum tour", "The laptop", "The bus ride", "The book",
    "The coffee", "The game", "The camera", "The hike", "The app", "The seminar",
]  # fmt: skip
_POSITIVE = [
    "was delightful", "exceeded my expectations", "worked perfectly", "was a real pleasure", "made my day",
    "was worth every penny", "felt warm and welcoming", "was fast and reliable", "was beautifully done",
    "left me smiling",
]  # fmt: skip
_NEGATIVE = [
    "was cold and bland", "broke after a day", "was a waste of money", "left me disappointed", "was painfully slow",
    "felt rude and careless", "stopped working twice", "was badly organised", "was far too noisy",
    "made me angry",
]  # fmt: skip
_CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Canada": "Ottawa", "Australia": "Canberra",
    "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Mexico": "Mexico City", "Egypt": "Cairo",
    "Kenya": "Nairobi", "Nigeria": "Abuja", "Russia": "Moscow", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw", "Greece": "Athens", "Turkey": "Ankara",
    "Ireland": "Dublin", "Austria": "Vienna", "Hungary": "Budapest", "Peru": "Lima", "Chile": "Santiago",
    "Colombia": "Bogota", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Indonesia": "Jakarta",
    "South Korea": "Seoul", "Iran": "Tehran", "Iraq": "Baghdad", "Morocco": "Rabat", "Ghana": "Accra",
    "Ethiopia": "Addis Ababa", "Cuba": "Havana", "Belgium": "Brussels", "Netherlands": "Amsterdam",
    "Switzerland": "Bern", "Czechia": "Prague", "Romania": "Bucharest", "Ukraine": "Kyiv",
    "New Zealand": "Wellington", "Philippines": "Manila", "Pakistan": "Islamabad", "Iceland": "Reykjavik",
}  # fmt: skip
_UNITS = [  # (from, to, factor, fact)
    ("kilometres", "metres", 1000, "There are 1000 metres in a kilometre"),
    ("metres", "centimetres", 100, "There are 100 centimetres in a metre"),
    ("kilograms", "grams", 1000, "There are 1000 grams in a kilogram"),
    ("hours", "minutes", 60, "There are 60 minutes in an hour"),
    ("minutes", "seconds", 60, "There are 60 seconds in a minute"),
    ("litres", "millilitres", 1000, "There are 1000 millilitres in a litre"),
    ("days", "hours", 24, "There are 24 hours in a day"),
    ("weeks", "days", 7, "There are 7 days in a week"),
]


def _sentiment() -> Iterator[tuple[str, str, str]]:
    for subject in _SUBJECTS:
        for label, phrases in (("positive", _POSITIVE), ("negative", _NEGATIVE)):
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
    for country, capital in _CAPITALS.items():
        yield f"What is the capital of {country}?", f"The capital of {country} is {capital}.", capital


def _units() -> Iterator[tuple[str, str, str]]:
    for source, target, factor, fact in _UNITS:
        for amount in range(2, 40):
            result = amount * factor
            answer = (
                f"{fact}, so we multiply by {factor}. {amount} {source} × {factor} = {result} {target}. "
                f"The answer is {result} {target}."
            )
            yield f"Convert {amount} {source} to {target} and explain the steps.", answer, str(result)


_GENERATORS: dict[str, Callable[[], Iterator[tuple[str, str, str]]]] = {
    "sentiment": _sentiment,
    "yes_no": _yes_no,
    "arithmetic": _arithmetic,
    "capitals": _capitals,
    "units": _units,
}


def split_of(question: str) -> str:
    """`test` for one question in five (a stable hash of its text), `train` otherwise."""
    digest = int(hashlib.sha256(question.encode("utf-8")).hexdigest()[:8], 16)
    return "test" if digest % TEST_SHARE == 0 else "train"


def pool(task: str, split: str) -> list[tuple[str, str, str]]:
    """Every (question, reply, answer) of a task's split, in a fixed order."""
    if task not in _GENERATORS:
        raise ValueError(f"Unknown synthetic task {task!r}; choose from {', '.join(TASKS)}.")
    if split not in ("train", "test"):
        raise ValueError(f"Unknown split {split!r}; use 'train' or 'test'.")
    return [item for item in _GENERATORS[task]() if split_of(item[0]) == split]


def generate(task: str, n: int | None = None, split: str = "train", seed: int = 0) -> list[dict[str, Any]]:
    """Return `n` distinct rows of `task` from `split` (all of them when `n` is None), shuffled by `seed`.

    Each row: `{"task", "messages": [user, assistant], "answer"}`. Asking for more rows than the split holds is an
    error that names the size.
    """
    items = pool(task, split)
    if n is not None and n > len(items):
        raise ValueError(f"Synthetic task {task!r} has {len(items)} {split} questions; {n} were asked for.")
    random.Random(f"{task}-{split}-{seed}").shuffle(items)
    return [
        {
            "task": task,
            "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}],
            "answer": answer,
        }
        for question, reply, answer in items[: len(items) if n is None else n]
    ]
