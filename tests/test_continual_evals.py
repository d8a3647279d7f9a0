"""What a stage measures: the drift's reference log-probs kept per seed, and the domain tasks' own lm-eval run."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest

from gradsift.continual import load_recipe

from conftest import recipe_dict as recipe
from conftest import write_recipe as write

REPO = Path(__file__).resolve().parents[1]


def two_stage_evals(each: dict, final: dict | None = None) -> dict:
    stages = [{"name": n, "data": {"synthetic": n, "size": 8}} for n in ("sentiment", "yes_no")]
    evals = {"after_each_stage": {"tasks": ["gradsift_refusal_strongreject_offline"], **each}}
    if final is not None:
        evals["final"] = {"tasks": ["gradsift_refusal_strongreject_offline"], **final}
    return recipe(stages=stages, evals=evals)


def test_drift_loads_each_reference_once_per_seed(tmp_path, tiny_model_dir, tokenizer, monkeypatch):
    from gradsift.continual import evals
    from gradsift.continual.layout import RunLayout, Step

    from conftest import build_model

    (tmp_path / "align.jsonl").write_text(json.dumps({"prompt": "Why is the sky blue?", "completion": "Air."}) + "\n")
    loaded = load_recipe(
        write(tmp_path, recipe(model=str(tiny_model_dir), align={"data": {"path": "align.jsonl"}}, drift_prompts=1)),
        check_data=False,
    )
    loads = []
    monkeypatch.setattr(evals, "eval_model", lambda r, spec, adapter: loads.append(spec) or build_model(tokenizer))
    monkeypatch.setattr(evals, "_REFERENCES", collections.OrderedDict())

    def step(seed):
        return Step(seed=seed, arm="full", index=1, stage="x", layout=RunLayout(tmp_path))

    stage_model = build_model(tokenizer, seed=3)
    first = evals.drift(loaded, stage_model, tokenizer, step(0))
    assert evals.drift(loaded, stage_model, tokenizer, step(0)) == first  # from the kept log-probs
    assert first["pretrained"] > 0 and first["aligned"] > 0
    evals.drift(loaded, stage_model, tokenizer, step(1))
    evals.drift(loaded, stage_model, tokenizer, step(1))
    aligned = [str(tmp_path / f"seed-{seed}" / "00-align" / "model") for seed in (0, 1)]
    # The pretrained reference is loaded once for both seeds; each seed's aligned model once.
    assert loads == [str(tiny_model_dir), aligned[0], aligned[1]]


@pytest.mark.parametrize(
    "each, runs",
    [
        # Their own answer length: a run of their own, all their documents.
        (
            {"limit": 5, "max_gen_toks": 48, "domain_max_gen_toks": 112},
            [(["gradsift_refusal_strongreject_offline"], 5, 48), (["domain"], 5, 112)],
        ),
        # Their own document count: a run of their own at each task's own answer length.
        (
            {"limit": 5, "max_gen_toks": 48, "domain_limit": 3},
            [(["gradsift_refusal_strongreject_offline"], 5, 48), (["domain"], 3, None)],
        ),
        # Neither: one run, one answer length for all.
        ({"limit": 5, "max_gen_toks": 48}, [(["gradsift_refusal_strongreject_offline", "domain"], 5, 48)]),
    ],
)
def test_the_domain_tasks_run_apart_with_their_own_limit_and_answer_length(tmp_path, monkeypatch, each, runs):
    from gradsift import evaluation
    from gradsift.continual import evals, runner

    calls = []

    def fake_run_lm_eval(model, tokenizer, names, output_path, *, limit, max_gen_toks, **kwargs):
        calls.append((list(names), limit, max_gen_toks))
        return {"results": {}, "per_doc": {}}

    monkeypatch.setattr(evaluation, "run_lm_eval", fake_run_lm_eval)
    monkeypatch.setattr(evals, "_task_manager", lambda: None)
    loaded = load_recipe(write(tmp_path, two_stage_evals(each)))
    step = next(s for s in runner.plan(loaded, tmp_path / "run") if s.arm == "full" and s.index == 1)
    evals.evaluate(loaded, None, None, step)
    domain = ["gradsift_domain_sentiment", "gradsift_domain_yes_no"]
    expected = [([t for n in names for t in (domain if n == "domain" else [n])], lim, g) for names, lim, g in runs]
    assert calls == expected


def test_answers_are_generated_in_the_generation_dtype_after_the_drift_is_measured_in_the_loading_dtype(
    tmp_path, tokenizer, monkeypatch
):
    import torch

    from gradsift import evaluation
    from gradsift.continual import evals, runner

    from conftest import build_model

    seen = []

    def fake_run_lm_eval(model, tokenizer, names, output_path, **kwargs):
        seen.append(("generate", next(model.parameters()).dtype))
        return {"results": {}, "per_doc": {}}

    monkeypatch.setattr(evaluation, "run_lm_eval", fake_run_lm_eval)
    monkeypatch.setattr(evals, "_task_manager", lambda: None)
    monkeypatch.setattr(runner, "eval_model", lambda recipe, base, adapter: build_model(tokenizer))
    monkeypatch.setattr(runner, "drift", lambda r, model, t, s: seen.append(("drift", model.dtype)) or {})
    each = {"limit": 2, "generation_dtype": "bfloat16"}
    loaded = load_recipe(write(tmp_path, two_stage_evals(each, each)))
    step = next(s for s in runner.plan(loaded, tmp_path / "run") if s.arm == "full" and s.index == 2)
    step.folder.mkdir(parents=True)
    runner._finish_stage(loaded, step, tokenizer, {}, adapters=[])
    assert seen == [("drift", torch.float32), ("generate", torch.bfloat16)]
    assert json.loads((step.folder / "stage.json").read_text())["drift"] == {}
    # Unset: the answers come from the model as loaded.
    seen.clear()
    loaded = load_recipe(write(tmp_path, two_stage_evals({"limit": 2})))
    runner._finish_stage(loaded, step, tokenizer, {}, adapters=[])
    assert seen == [("drift", torch.float32), ("generate", torch.float32)]


def test_generation_model_casts_a_plain_model_and_leaves_a_quantized_one(tokenizer, monkeypatch, caplog):
    import torch

    from gradsift import models
    from gradsift.continual import evals

    from conftest import build_model

    model = build_model(tokenizer)
    assert evals.generation_model(model, None) is model and model.dtype == torch.float32
    assert {p.dtype for p in evals.generation_model(model, "bfloat16").parameters()} == {torch.bfloat16}

    class Quantized(torch.nn.Linear):
        @property
        def dtype(self):
            return self.weight.dtype

        def to(self, *args, **kwargs):
            raise AssertionError("a quantized model's weights cannot be cast")

    evals._warn_kept_dtype.cache_clear()
    quantized = Quantized(2, 2)
    monkeypatch.setattr(models, "model_quantization", lambda m: "nf4")
    with caplog.at_level("WARNING", logger="gradsift.continual.evals"):
        assert evals.generation_model(quantized, "bfloat16") is quantized
        evals.generation_model(quantized, "bfloat16")
    assert [r.getMessage() for r in caplog.records] == [
        "gradsift run: the evaluated model is quantized (nf4); its answers are generated in its compute dtype "
        "float32, not `generation_dtype` bfloat16"
    ]  # once, not once per stage
    caplog.clear()
    quantized = Quantized(2, 2, dtype=torch.bfloat16)
    assert evals.generation_model(quantized, "bfloat16") is quantized and not caplog.records  # already that dtype


def test_seen_domain_evals_ask_the_stages_trained_so_far_and_the_align_stage_asks_all():
    stages = [{"name": n, "data": {"synthetic": n, "size": 8}} for n in ("sentiment", "yes_no", "capitals")]
    evals = {
        "after_each_stage": {"tasks": ["gradsift_refusal_mc"], "domain": "seen"},
        "final": {"tasks": ["gradsift_refusal_strongreject_offline"], "domain": "seen"},
    }
    loaded = recipe_from(stages, evals)
    domain = [f"gradsift_domain_{n}" for n in ("sentiment", "yes_no", "capitals")]
    assert loaded.eval_tasks(0) == (loaded.evals.final, ["gradsift_refusal_strongreject_offline", *domain])
    assert loaded.eval_tasks(1)[1] == ["gradsift_refusal_mc", domain[0]]
    assert loaded.eval_tasks(2)[1] == ["gradsift_refusal_mc", *domain[:2]]
    assert loaded.eval_tasks(3) == (loaded.evals.final, ["gradsift_refusal_strongreject_offline", *domain])
    evals["after_each_stage"]["domain"] = True  # every task after every stage, as before
    assert recipe_from(stages, evals).eval_tasks(1)[1] == ["gradsift_refusal_mc", *domain]


def recipe_from(stages, evals):
    from gradsift.continual.schema import Recipe

    return Recipe.model_validate(recipe(stages=stages, evals=evals))
