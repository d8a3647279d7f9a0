"""The checks between a recipe's fields, each a small named function, collected and reported together.

`load_recipe` validates every part's schema, then runs every check here: a check names the top-level keys whose failed
schema would make it judge a stand-in (`Check.reads`: those it reads besides `arms` and `stages`, which are replaced
part by part), and is skipped when one of them failed, so that it never reports a problem the user does not have.
Each returns `yaml.path: message` lines.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from gradsift.anchors import reads_anchor
from gradsift.config import SelectionConfig
from gradsift.continual.schema import (
    ARM_NAME,
    AXOLOTL_OWNED,
    BUILTIN_ARMS,
    LOSS_KINDS,
    STEPPED_KINDS,
    DataSpec,
    Recipe,
    error_lines,
    gradsift_config_for,
)
from gradsift.errors import UserError
from gradsift.packaged import HELD_OUT_SPLITS, asks, is_packaged, split_names, tasks_asking


@dataclass(frozen=True)
class Check:
    """A check between fields, and the top-level keys whose failed schema skips it."""

    run: Callable[[Recipe], list[str]]
    reads: frozenset[str] = frozenset()  # top-level keys whose failed schema skips the check


def cross_field_problems(recipe: Recipe, failed: frozenset[str] = frozenset()) -> list[str]:
    """Every problem between the recipe's fields, each `yaml.path: message`.

    `failed`: top-level keys whose own schema failed (and that now hold their defaults or stand-ins).
    """
    return [problem for check in CHECKS if not check.reads & failed for problem in check.run(recipe)]


def arm_names(recipe: Recipe) -> list[str]:
    bad = [name for name in recipe.arms if not ARM_NAME.fullmatch(name)]
    return [
        f"arms: {', '.join(map(repr, bad))}: an arm name becomes a folder name beside `00-align`, so it is letters, "
        "digits, `_`, `.` and `-`, starting with a letter (e.g. `random_steps`)"
    ] if bad else []  # fmt: skip


def steps_settings(recipe: Recipe) -> list[str]:
    def applies(name: str) -> bool:
        spec = recipe.arm(name)
        return spec.kind in STEPPED_KINDS and (spec.mode or recipe.mode) != "online"

    steps = [name for name in recipe.arms if recipe.arm(name).steps is not None and not applies(name)]
    return [
        f"arms: {', '.join(steps)}: `steps` applies to offline `select` and `random` arms (the other kinds train on "
        "all rows; an online arm selects inside each step); remove it"
    ] if steps else []  # fmt: skip


def unknown_arms(recipe: Recipe) -> list[str]:
    unknown = [name for name, spec in recipe.arms.items() if name not in BUILTIN_ARMS and not spec.model_fields_set]
    return [
        f"arms: unknown arm(s) {', '.join(unknown)}: built-in arms are {', '.join(BUILTIN_ARMS)}; a new arm needs a "
        "spec (e.g. `my_arm: {selection: {rule: band}}`)"
    ] if unknown else []  # fmt: skip


def clean_arms(recipe: Recipe) -> list[str]:
    clean = [name for name in recipe.arms if recipe.arm(name).kind == "clean"]
    return [
        f"arms: {', '.join(clean)}: a `clean` arm keeps rows by their label, and `label_column` is null; name the "
        "rows' label column (e.g. `label_column: kind`)"
    ] if clean and recipe.label_column is None else []  # fmt: skip


def random_matches(recipe: Recipe) -> list[str]:
    """A `random` arm's `match` names an offline `select` arm of the recipe; no other kind sets it."""
    problems = []
    for name in recipe.arms:
        spec = recipe.arm(name)
        if spec.match is None:
            continue
        if spec.kind != "random":
            problems.append(
                f"arms.{name}.match: got {spec.match!r}; `match` sizes a `random` arm, and a `{spec.kind}` arm has no "
                "use for it; remove `match` (or set `kind: random`)"
            )
            continue
        if spec.match not in recipe.arms or not recipe.is_offline_select(spec.match):
            arms = [arm for arm in recipe.arms if recipe.is_offline_select(arm)]
            problems.append(
                f"arms.{name}.match: got {spec.match!r}, which is not an offline `select` arm of this recipe; name "
                f"one of its offline select arms ({', '.join(arms) or 'none'}) or remove `match`"
            )
    return problems


def stage_names(recipe: Recipe) -> list[str]:
    names = [stage.name for _, stage in recipe.valid_stages()]
    return [f"stages: stage names must be unique; got {names}"] if len(set(names)) != len(names) else []


def align_quantization(recipe: Recipe) -> list[str]:
    if recipe.align is not None and recipe.scoring.quantization == "nf4":
        return [
            "align: `align` merges its adapter into the weights, which a 4-bit model cannot hold: set "
            "`scoring.quantization: none` (or auto) for a recipe with an align stage"
        ]
    return []


def arm_selections(recipe: Recipe) -> list[str]:
    """Each arm's selection (the recipe's `selection:` with the arm's overrides) passes its schema."""
    problems = []
    for name in recipe.arms:
        try:
            selection = recipe.selection_for(name)
        except ValidationError as error:
            problems += error_lines(error, f"arms.{name}.selection")
            continue
        if recipe.arm(name).kind == "random" and selection.rule != "random":
            problems.append(
                f"arms.{name}.selection.rule: got {selection.rule!r}; a `random` arm keeps a random subset, so its "
                "rule is `random`; remove `rule` (or set the arm's `kind` to `select`)"
            )
    return problems


def _select_arms(recipe: Recipe) -> Iterator[tuple[str, Any, SelectionConfig]]:
    """(name, spec, selection) of each `select` arm whose selection validates (`arm_selections` reports the rest)."""
    for name in recipe.arms:
        try:
            selection = recipe.selection_for(name)
        except ValidationError:
            continue
        spec = recipe.arm(name)
        if spec.kind == "select":
            yield name, spec, selection


def anchor_scores_named(recipe: Recipe) -> list[str]:
    """A select arm that reads the anchor score has `scoring.anchor_data` to take it from."""
    return [
        f"arms.{name}: the anchor rule and `min_anchor_cos` need anchor scores; set `scoring.anchor_data` "
        "(e.g. embedded:refusals)"
        for name, _, selection in _select_arms(recipe)
        if reads_anchor(selection) and not recipe.scoring.anchor_data
    ]


def refusal_filters_offline(recipe: Recipe) -> list[str]:
    """`max_refusal_logprob` reads offline scores: an online arm cannot use it."""
    return [
        f"arms.{name}: `max_refusal_logprob` filters on the refusal probe of offline scoring, which an online arm "
        "does not run; use it on an offline arm (`mode: offline`), or remove it"
        for name, spec, selection in _select_arms(recipe)
        if selection.max_refusal_logprob is not None and (spec.mode or recipe.mode) == "online"
    ]


def train_settings(recipe: Recipe) -> list[str]:
    parts = [(f"stages.{i}.train", stage) for i, stage in recipe.valid_stages()]
    parts += [("align.train", recipe.align)] if recipe.align is not None else []
    problems = []
    for where, part in parts:
        try:
            recipe.train_for(part)
        except ValidationError as error:
            problems += error_lines(error, where)
    return problems


def online_windows(recipe: Recipe) -> list[str]:
    """Online arms whose keep fraction keeps no row of a stage's window: found now, not after earlier stages train."""
    from gradsift.online import check_online_config

    problems = []
    for name in recipe.arms:
        spec = recipe.arm(name)
        if spec.kind != "select" or (spec.mode or recipe.mode) != "online":
            continue
        for i, stage in recipe.valid_stages():
            try:
                train = recipe.train_for(stage)
                check_online_config(
                    gradsift_config_for(recipe, name, train), train.batch_size, train.gradient_accumulation_steps
                )
            except (UserError, ValidationError) as error:
                problems.append(f"arms.{name} (stage stages.{i}): {error}")
    return problems


def domain_evals_alike(recipe: Recipe) -> list[str]:
    final, each = recipe.evals.final, recipe.evals.after_each_stage
    if final is None or not (final.domain and each.domain):
        return []
    problems = []
    if final.domain_docs() != each.domain_docs():
        problems.append(
            f"evals: evals.final evaluates {final.domain_docs()} documents per domain task and "
            f"evals.after_each_stage {each.domain_docs()} (`domain_limit`, else `limit`): the accuracy matrix must "
            "compare the same documents at every stage; set them alike"
        )
    if final.domain_answer_length() != each.domain_answer_length():
        problems.append(
            f"evals: evals.final lets domain answers run to {final.domain_answer_length()} tokens and "
            f"evals.after_each_stage to {each.domain_answer_length()} (`domain_max_gen_toks`, else `max_gen_toks` "
            "unless `domain_limit` is set; None: each task's own): the accuracy matrix must judge answers of the "
            "same length at every stage; set them alike"
        )
    return problems


def generation_dtypes_alike(recipe: Recipe) -> list[str]:
    final, each = recipe.evals.final, recipe.evals.after_each_stage
    if final is None or final.generation_dtype == each.generation_dtype:
        return []
    return [
        f"evals: evals.final generates in {final.generation_dtype or 'null'} and evals.after_each_stage in "
        f"{each.generation_dtype or 'null'} (`generation_dtype`; null: the loading dtype): the per-stage rates must "
        "come from answers generated alike; set them alike"
    ]


def arm_kinds(recipe: Recipe) -> list[str]:
    problems = []
    for name in recipe.arms:
        spec = recipe.arm(name)
        if recipe.trainer == "axolotl" and spec.kind in LOSS_KINDS:
            problems.append(f"arms.{name}: the `{spec.kind}` arm kind adds to TRL's loss, so it needs `trainer: trl`")
        if spec.kind == "ewc" and recipe.align is None and not spec.ewc_every_stage:
            problems.append(
                f"arms.{name}: an `ewc` arm's first Fisher is estimated on the align stage's rows; add an `align:` "
                "stage, or set `ewc_every_stage: true` to anchor at the end of each task stage only"
            )
    return problems


def axolotl_keys(recipe: Recipe) -> list[str]:
    owned = sorted(set(recipe.axolotl) & set(AXOLOTL_OWNED))
    return [
        f"axolotl: {', '.join(owned)}: the runner sets these for each stage (inside its folder, from the previous "
        "stage); remove them"
    ] if owned else []  # fmt: skip


def data_specs(recipe: Recipe) -> list[tuple[str, DataSpec]]:
    """Every data source the recipe trains on, with its YAML path: the align stage's, then each valid stage's."""
    align = recipe.align.data if recipe.align else []
    specs = [("align.data" if len(align) == 1 else f"align.data.{i}", spec) for i, spec in enumerate(align)]
    for i, stage in recipe.valid_stages():
        many = len(stage.data) > 1
        specs += [(f"stages.{i}.data.{j}" if many else f"stages.{i}.data", spec) for j, spec in enumerate(stage.data)]
    return specs


def held_out_splits(recipe: Recipe) -> list[str]:
    """A packaged source's `test` split is what gradsift's evals ask: no stage may train on it."""
    return [
        f"{where}: `{spec.path}` split `test` is held out for evaluation (gradsift's offline evals ask it); train on "
        + " or ".join(f"`{name}`" for name in split_names(spec.path) if name not in HELD_OUT_SPLITS)
        for where, spec in data_specs(recipe)
        if spec.path is not None and is_packaged(spec.path) and _known(spec.path) and spec.split in HELD_OUT_SPLITS
    ]


def hub_tasks(recipe: Recipe) -> list[str]:
    """No hub task may ask the rows a packaged source trains (`hub_task_problems`)."""
    tasks = {f"evals.{when}.tasks": spec.tasks for when, spec in recipe.evals if spec is not None}
    tasks.update({f"stages.{i}.eval_task": [stage.eval_task] for i, stage in recipe.valid_stages() if stage.eval_task})
    return hub_task_problems([(where, spec.path) for where, spec in data_specs(recipe) if spec.path], tasks)


def hub_task_problems(trained: list[tuple[str, str]], tasks: dict[str, list[str]]) -> list[str]:
    """One line per eval task that would ask rows a packaged source trains on (`packaged.tasks_asking`): lm-eval's
    GSM8K and MedMCQA tasks ask the very rows of `embedded:gsm8k` and `embedded:medmcqa`, the hub refusal tasks the
    benchmark requests of the refusal sources (AdvBench's of `embedded:harmful-answers`).

    `trained`: (YAML path, data path) of every source a recipe trains on; `tasks`: YAML path -> the tasks it runs.
    """
    sources = [(where, path, tasks_asking(path)) for where, path in trained if is_packaged(path) and _known(path)]
    problems = []
    for where, names in tasks.items():
        for task in sorted(set(names)):
            found = [f"{place} (`{path}`)" for place, path, asked_by in sources if asks(task, asked_by)]
            if found:
                problems.append(
                    f"{where}: `{task}` asks rows that {', '.join(found)} trains on; evaluate with gradsift's offline "
                    "tasks (e.g. `gradsift_refusal_strongreject_offline`, `gradsift_refusal_harmbench_offline`), "
                    "which ask only a source's held-out `test` split, or train on other data"
                )
    return problems


def _known(path: str) -> bool:
    """Whether a packaged path names a known source (an unknown one is reported by the data checks)."""
    try:
        split_names(path)
    except UserError:
        return False
    return True


CHECKS = (
    Check(arm_names),
    Check(steps_settings),
    Check(unknown_arms),
    Check(clean_arms),
    Check(random_matches),
    Check(stage_names),
    Check(align_quantization, frozenset({"scoring"})),
    Check(arm_selections, frozenset({"selection"})),
    Check(anchor_scores_named, frozenset({"selection", "scoring"})),
    Check(refusal_filters_offline, frozenset({"selection"})),
    Check(train_settings, frozenset({"train"})),
    Check(online_windows, frozenset({"train", "selection", "scoring"})),
    Check(domain_evals_alike, frozenset({"evals"})),
    Check(generation_dtypes_alike, frozenset({"evals"})),
    Check(arm_kinds, frozenset({"align", "trainer"})),
    Check(axolotl_keys),
    Check(held_out_splits),
    Check(hub_tasks),
)
