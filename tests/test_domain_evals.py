"""The real-data domain tasks of the paper recipe (`gradsift_domain_{alpaca,gsm8k,medmcqa}_offline`): their documents
come from the packaged sources' held-out `test` splits, and their metrics are what a direct forward pass says."""

from __future__ import annotations

import math
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from gradsift.packaged import packaged_rows

from conftest import tiny_shape

REPO = Path(__file__).resolve().parents[1]
TASKS = {
    "gradsift_domain_alpaca_offline": ("embedded:alpaca-gpt4-demo", 100),
    "gradsift_domain_gsm8k_offline": ("embedded:gsm8k", 143),
    "gradsift_domain_medmcqa_offline": ("embedded:medmcqa", 399),
}


@pytest.fixture(scope="module")
def utils():
    sys.path.insert(0, str(REPO / "evals" / "tasks"))
    try:
        import utils as module
    finally:
        sys.path.remove(str(REPO / "evals" / "tasks"))
    return module


@pytest.fixture(scope="module")
def tasks():
    from lm_eval.tasks import get_task_dict

    from gradsift.evaluation import task_manager

    return get_task_dict(list(TASKS), task_manager())


def test_each_task_asks_every_row_of_its_sources_held_out_split_and_no_other(tasks):
    for name, (source, count) in TASKS.items():
        docs = list(tasks[name].test_docs())
        rows, _ = packaged_rows(source, "test")
        assert len(docs) == len(rows) == count, name
        asked = {doc["question"].split("\n\n")[0] for doc in docs}
        held_out = {row["messages"][0]["content"].split("\n\n")[0] for row in rows}
        trained = {row["messages"][0]["content"].split("\n\n")[0] for row in packaged_rows(source, "train")[0]}
        assert asked == held_out and asked.isdisjoint(trained), name


def test_medmcqa_rotates_the_options_so_each_letter_is_right_as_often_and_keeps_the_right_answer(tasks):
    task = tasks["gradsift_domain_medmcqa_offline"]
    docs = list(task.test_docs())
    for limit in (4, 8, 16, 32, 64, len(docs)):  # whatever `--limit` takes (MedMCQA itself: A on a third)
        letters = Counter("ABCD"[doc["gold"]] for doc in docs[:limit])
        assert len(letters) == 4 and max(letters.values()) - min(letters.values()) <= 1, limit
    rows, _ = packaged_rows("embedded:medmcqa", "test")
    answers = {row["messages"][0]["content"].rsplit("\n\n", 1)[0]: row["messages"][1]["content"][3:] for row in rows}
    for doc in docs:
        question, options = doc["question"].rsplit("\n\n", 1)
        assert options.split("\n") == doc["choices"]
        assert [choice[:3] for choice in doc["choices"]] == ["A. ", "B. ", "C. ", "D. "]
        assert doc["choices"][doc["gold"]][3:] == answers[question]
        assert task.doc_to_choice(doc) == doc["choices"] and task.doc_to_target(doc) == doc["gold"]
    assert task.config.target_delimiter == ""


def test_the_choice_metrics_against_their_definitions(utils):
    doc = {"choices": ["A. one", "B. a longer answer", "C. x", "D. four"], "gold": 1}
    logliks = [-4.0, -9.0, -3.0, -8.0]
    results = [(value, False) for value in logliks]
    metrics = utils.process_choice(doc, results)
    per_byte = [value / len(choice) for value, choice in zip(logliks, doc["choices"])]  # ASCII: a byte a character
    assert metrics["acc"] == float(per_byte.index(max(per_byte)) == 1) == 1.0  # -0.5 a byte beats -0.75 and -1
    probs = torch.softmax(torch.tensor(logliks, dtype=torch.float64), 0)
    assert metrics["gold_prob"] == pytest.approx(float(probs[1]))
    assert metrics["ref_byte_prob"] == pytest.approx(math.exp(-9.0 / 18))
    assert utils.process_choice({**doc, "gold": 0}, results)["acc"] == 0.0
    reply = "Naïve: 2 + 2 = 4"  # 17 bytes in UTF-8, 16 characters
    expected = {"ref_byte_prob": pytest.approx(math.exp(-3.4 / 17))}
    assert utils.process_reference({"reply": reply}, [(-3.4, False)]) == expected


def test_the_reference_likelihood_is_the_answer_given_the_chat_prompt(tmp_path, tokenizer):
    """lm-eval's number against a direct forward pass: log p(answer | the chat-templated request) of the model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from gradsift.evaluation import run_lm_eval, task_manager

    torch.manual_seed(0)
    shape = {**tiny_shape(tokenizer), "max_position_embeddings": 4096}  # whole GSM8K answers, nothing truncated
    model = LlamaForCausalLM(LlamaConfig(**shape)).eval()
    names = list(TASKS)
    results = run_lm_eval(model, tokenizer, names, tmp_path, limit=2, batch_size=2, manager=task_manager())

    def loglik(request: str, answer: str) -> float:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": request}], tokenize=False,
                                               add_generation_prompt=True)  # fmt: skip
        # lm-eval scores the context's trailing whitespace with the answer; the encoding is of the whole text.
        context = prompt.rstrip()
        whole = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
        start = len(tokenizer(context, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
        return sum(float(logprobs[i - 1, whole[i]]) for i in range(start, len(whole)))

    docs = task_docs(names)
    for name in ("gradsift_domain_alpaca_offline", "gradsift_domain_gsm8k_offline"):
        expected = [math.exp(loglik(d["question"], d["reply"]) / len(d["reply"].encode())) for d in docs[name][:2]]
        assert results["results"][name]["ref_byte_prob,none"] == pytest.approx(sum(expected) / 2, rel=1e-4), name
    expected = {"acc": [], "gold_prob": [], "ref_byte_prob": []}
    for doc in docs["gradsift_domain_medmcqa_offline"][:2]:
        logliks = [loglik(doc["question"], choice) for choice in doc["choices"]]
        per_byte = [value / len(choice.encode()) for value, choice in zip(logliks, doc["choices"])]
        gold = doc["gold"]
        expected["acc"].append(float(per_byte.index(max(per_byte)) == gold))
        expected["gold_prob"].append(math.exp(logliks[gold]) / sum(math.exp(value) for value in logliks))
        expected["ref_byte_prob"].append(math.exp(per_byte[gold]))
    for metric, values in expected.items():
        got = results["results"]["gradsift_domain_medmcqa_offline"][f"{metric},none"]
        assert got == pytest.approx(sum(values) / 2, rel=1e-4), metric


def task_docs(names: list[str]) -> dict[str, list[dict]]:
    from lm_eval.tasks import get_task_dict

    from gradsift.evaluation import task_manager

    tasks = get_task_dict(names, task_manager())
    return {name: list(tasks[name].test_docs()) for name in names}
