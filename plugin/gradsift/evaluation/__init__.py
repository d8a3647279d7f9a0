"""Evaluation: the rule-based refusal judge, guard-model judges, lm-eval runs on a model, and log-prob measures.

judge.py     `judge_answer` / `is_refusal`: refused, complied or neither; the refusal tasks' metrics
wording.py   the answer's words, sentences and opening as the judge reads them
declines.py  declines in words and in substance (the judge's "refused")
topic.py     bare, looping and off-topic answers (the judge's "neither")
guard.py     Llama Guard 3 / WildGuard prompts and parsers; `gradsift judge`
harness.py   lm-eval glue: the task folder and index, runs on a loaded model, logged samples
logprobs.py  response log-probs and the per-token KL (drift, the `kl` arm)
"""

from gradsift.evaluation.guard import (
    JUDGE_FORMATS,
    LLAMA_GUARD_3_CATEGORIES,
    LLAMA_GUARD_3_TEMPLATE,
    PARSERS,
    WILDGUARD_TEMPLATE,
    JudgeModelConfig,
    Verdict,
    generate_greedy,
    guess_judge_format,
    judge_prompt,
    judge_results,
    parse_llama_guard,
    parse_wildguard,
)
from gradsift.evaluation.harness import (
    BENIGN_REFUSAL_TASK_PREFIX,
    OVERREFUSAL_TASK_PREFIX,
    REFUSAL_TASK_PREFIX,
    check_task_names,
    evals_path,
    find_samples,
    judged_task_kind,
    newest_samples,
    per_doc_metrics,
    read_samples,
    results_table,
    run_lm_eval,
    sample_answer,
    task_manager,
)
from gradsift.evaluation.judge import (
    OUTCOMES,
    PROMPT_KEYS,
    benign_refusal_metrics,
    harmful_prompt,
    is_refusal,
    judge_answer,
    overrefusal_metrics,
    refusal_metrics,
)
from gradsift.evaluation.logprobs import logprobs_at_responses, response_logprobs, token_kl
from gradsift.evaluation.topic import BARE_WORDS
from gradsift.evaluation.wording import OPENING_CHARS, OPENING_SENTENCES

__all__ = [
    "BENIGN_REFUSAL_TASK_PREFIX",
    "BARE_WORDS",
    "LLAMA_GUARD_3_CATEGORIES",
    "LLAMA_GUARD_3_TEMPLATE",
    "OPENING_CHARS",
    "OPENING_SENTENCES",
    "WILDGUARD_TEMPLATE",
    "JUDGE_FORMATS",
    "OUTCOMES",
    "OVERREFUSAL_TASK_PREFIX",
    "PARSERS",
    "PROMPT_KEYS",
    "REFUSAL_TASK_PREFIX",
    "JudgeModelConfig",
    "Verdict",
    "benign_refusal_metrics",
    "check_task_names",
    "evals_path",
    "find_samples",
    "generate_greedy",
    "guess_judge_format",
    "harmful_prompt",
    "is_refusal",
    "judge_answer",
    "judge_prompt",
    "judge_results",
    "judged_task_kind",
    "logprobs_at_responses",
    "newest_samples",
    "overrefusal_metrics",
    "parse_llama_guard",
    "parse_wildguard",
    "per_doc_metrics",
    "read_samples",
    "refusal_metrics",
    "response_logprobs",
    "results_table",
    "run_lm_eval",
    "sample_answer",
    "task_manager",
    "token_kl",
]
