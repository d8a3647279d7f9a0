"""The `gradsift` command: score, select, inspect, eval, judge, run, report, evals-path.

Every config key is a `--kebab-case` flag (`--quantization none`, `--keep-fraction 0.2`), or comes from a YAML file
given with `--config` (nested `data:`, `scoring:`, `selection:` sections; a top-level `gradsift:` block, as in an
axolotl YAML, works too). Flags win over the file; `gradsift.cli_flags` makes them from the config schema. This
module parses arguments and prints; what `inspect` computes lives beside the score table (`gradsift.table`) and
the selection rules (`gradsift.selection`). User errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jinja2.exceptions import TemplateError

from gradsift import __version__
from gradsift.cli_flags import add_common, add_schema_flags, config_from_args, section_values
from gradsift.cli_inspect import run_inspect, scored_source, text_table
from gradsift.config import EvalConfig, GradSiftConfig, ModelConfig
from gradsift.distributed import Team
from gradsift.errors import UserError, chat_template_refusal

if TYPE_CHECKING:
    from gradsift.pipeline import ScoreResult

logger = logging.getLogger("gradsift")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.INFO if not args.quiet else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s")
    # On gradsift's own logger too: accelerate's loggers set the *root* level from `ACCELERATE_LOG_LEVEL` when they
    # are created (at import, after this point), which would otherwise hide gradsift's progress lines.
    logger.setLevel(level)
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "bitsandbytes", "torchao"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.quiet:
        _disable_library_progress_bars()
    try:
        return args.handler(args)
    except (UserError, TemplateError) as error:
        if type(error) is TemplateError:  # exactly what a chat template's `raise_exception` raises; not a subclass
            error = chat_template_refusal(error)
        elif not isinstance(error, UserError):
            raise
        print(f"gradsift {args.command}: error: {' '.join(str(error).split())}", file=sys.stderr)  # one line
        return 2


def _disable_library_progress_bars() -> None:
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with one sub-command per job."""
    parser = argparse.ArgumentParser(
        prog="gradsift",
        description="Select fine-tuning samples by per-sample gradient norm to preserve safety alignment.",
    )
    parser.add_argument("--version", action="version", version=f"gradsift {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    score = commands.add_parser(
        "score",
        help="score every row: per-sample loss and gradient norm",
        description="Score every row of a dataset with per-sample loss and gradient L2 norm, cached in --out. "
        "A rerun with the same model, data and scoring config reuses the scores; a killed run resumes.",
    )
    score.add_argument(
        "--data",
        required=True,
        help="a .jsonl/.json/.parquet file, a saved dataset folder, a hub id or a packaged source "
        "(embedded:alpaca-gpt4-demo, embedded:gsm8k, embedded:medmcqa; with --split)",
    )
    score.add_argument("--out", required=True, type=Path, help="folder for scores.parquet and scores.json")
    add_common(score, ("data", "scoring"))
    score.set_defaults(handler=run_score)

    select = commands.add_parser(
        "select",
        help="keep rows by a selection rule; write them in the input's format",
        description="Apply a selection rule to scored rows. Writes the kept rows to --out in the input's own format, "
        "dropped.jsonl (each dropped row with its scores and reason) and selection.json beside it.",
    )
    select.add_argument("scores", type=Path, metavar="DIR", help="a folder written by `gradsift score`")
    select.add_argument("--out", required=True, type=Path, help="file for the kept rows (.jsonl, .json or .parquet)")
    select.add_argument("--data", help="the scored data, if it moved (its content must match the scored fingerprint)")
    add_common(select, ("selection",))
    select.set_defaults(handler=run_select)

    inspect = commands.add_parser(
        "inspect",
        help="show score quantiles, drop reasons and response-length bins",
        description="Summarise a score folder: loss and gradient-norm quantiles, what the selection rule would drop "
        "and why, and statistics per response-length bin.",
    )
    inspect.add_argument("scores", type=Path, metavar="DIR", help="a folder written by `gradsift score`")
    inspect.add_argument("--bins", type=int, default=4, help="number of response-length bins (default 4)")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of tables")
    inspect.add_argument(
        "--label-column",
        metavar="COL",
        help="a column of the scored data holding each row's label (e.g. `kind`: harmful / benign): also print, per "
        "label, its rows and how many the rule keeps, and each score's AUROC for telling its rows from the others",
    )
    inspect.add_argument(
        "--suspicious",
        type=int,
        metavar="N",
        help="list the N rows the refusal probe finds most suspicious (highest `refusal_logprob`: the model would "
        "likely refuse their request), each cut to one line, to read before training (needs scores with the "
        "probe's column, and the scored data)",
    )
    inspect.add_argument(
        "--data",
        help="with --label-column or --suspicious: the scored data, if it moved (its content must match the scored "
        "one)",
    )
    add_common(inspect, ("selection",))
    inspect.set_defaults(handler=run_inspect)
    _add_eval_commands(commands)
    return parser


def _add_eval_commands(commands: Any) -> None:
    evaluate = commands.add_parser(
        "eval",
        help="run lm-eval tasks on a model (+ adapter); save results JSON and samples",
        description="Evaluate a model, optionally with a PEFT adapter, on lm-eval tasks (gradsift's own included). "
        "The chat template is applied for chat models. Saves lm-eval's results JSON and per-sample logs under "
        "--output and prints lm-eval's table.",
    )
    evaluate.add_argument("--output", type=Path, default=Path("runs/eval"), help="results folder (default runs/eval)")
    evaluate.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    add_schema_flags(evaluate, "model", ModelConfig, "the model to evaluate (--model is required)")
    add_schema_flags(evaluate, "eval", EvalConfig, "what lm-eval runs")
    evaluate.set_defaults(handler=run_eval)

    judge = commands.add_parser(
        "judge",
        help="judge logged refusal-task answers with a guard model (Llama Guard 3, WildGuard)",
        description="Run a guard model over the answers lm-eval logged (--log_samples) for gradsift_refusal_* "
        "tasks in RESULTS_DIR. Writes judged_<task>.jsonl and judge_results.json (keyword and judged attack "
        "success rates side by side) into RESULTS_DIR.",
    )
    judge.add_argument("results", type=Path, metavar="RESULTS_DIR", help="an lm-eval --output_path folder")
    judge.add_argument("--judge", required=True, help="the guard model: hub id or local folder")
    judge.add_argument(
        "--format",
        choices=["auto", "llama_guard3", "wildguard"],
        default="auto",
        help="the judge's prompt format (auto: wildguard if the name says so, else llama_guard3)",
    )
    judge.add_argument("--batch-size", type=int, default=8, help="answers judged per batch (default 8)")
    judge.add_argument("--max-new-tokens", type=int, default=24, help="judge output length (default 24)")
    judge.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    add_schema_flags(judge, "model", ModelConfig, "how the judge model is loaded", exclude=("model", "adapter"))
    judge.set_defaults(handler=run_judge)

    run = commands.add_parser(
        "run",
        help="run a continual recipe stage by stage, every arm and seed",
        description="Run a recipe (YAML): for each seed the shared align stage, then for each arm every task stage "
        "(score with the current model, select, train the LoRA further, evaluate). Writes "
        "<out>/seed-<s>/<arm>/<NN>-<stage>/; a rerun resumes at the first unfinished stage.",
    )
    run.add_argument("recipe", type=Path, metavar="RECIPE", help="a recipe YAML file")
    run.add_argument("--arms", help="comma-separated arms to run (default: all of the recipe's)")
    run.add_argument("--seeds", help="comma-separated seeds (default: the recipe's)")
    run.add_argument("--out", type=Path, help="run folder (default runs/<recipe name>)")
    rerun = "train STAGE (a stage's name, or align) and the later ones again (--arms, --seeds); the old folders move "
    run.add_argument("--rerun-from", metavar="STAGE", help=rerun + "to <out>/replaced/<time>/, never deleted")
    run.add_argument("--dry-run", action="store_true", help="validate, print the plan and exit; loads nothing")
    run.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    run.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    run.set_defaults(handler=run_run)

    report = commands.add_parser(
        "report",
        help="tables, forgetting metrics and plots of a recipe run",
        description="Write report.md, report.json and PNG plots into RUN_DIR from its finished stages: refusal and "
        "over-refusal (refused / complied / neither) per stage per arm, the accuracy matrix, ACC, BWT, FM, max drop, "
        "interference, drift, kept fractions and gradient-norm histograms: means over seeds with 95% Student-t "
        "intervals, paired differences to `random` and `full`, and a per-prompt bootstrap of every rate. Prints the "
        "headline table.",
    )
    report.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a folder written by `gradsift run`")
    report.add_argument("--no-plots", action="store_true", help="tables only")
    report.add_argument(
        "--rejudge",
        action="store_true",
        help="first judge every logged answer of the refusal and over-refusal tasks again with the current judge "
        "and rewrite the stages' metrics (after a judge change; no answer is generated again)",
    )
    report.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    report.set_defaults(handler=run_report)

    path = commands.add_parser(
        "evals-path",
        help="print the folder to pass to `lm_eval --include_path`",
        description="Print the folder holding gradsift's lm-eval tasks, for `lm_eval --include_path "
        "$(gradsift evals-path)`. In a checkout (editable install) it is the repo's evals/tasks.",
    )
    path.add_argument("-q", "--quiet", action="store_true", help=argparse.SUPPRESS)
    path.set_defaults(handler=run_evals_path)


def run_score(args: argparse.Namespace) -> int:
    """`gradsift score`; under torchrun or `accelerate launch`, the processes split the shards and rank 0 reports."""
    from gradsift.distributed import launched_team
    from gradsift.models import resolve_device
    from gradsift.store import ScoreStore

    config = config_from_args(args)
    ScoreStore(args.out, {}).check_writable()  # before anything loads
    if not config.scoring.model:
        raise UserError(
            "`scoring.model` is not set: pass --model (a hub id, a local folder or embedded:smollm2-135m-instruct)."
        )
    with launched_team(use_cuda=resolve_device(config.scoring) == "cuda") as team:
        if not team.is_main:
            _disable_library_progress_bars()
        result, num_rows = _score(args, config, team)
    if not team.is_main:
        return 0
    counts = ", ".join(f"{n:,} {status}" for status, n in sorted(result.status_counts().items()))
    verb = "reused cached scores for" if result.reused else f"scored {result.rows_scored:,} of"
    processes = f" with {team.world_size} processes" if team.world_size > 1 and not result.reused else ""
    print(f"{verb} {num_rows:,} rows ({counts}){processes} in {result.seconds:.1f} s -> {args.out / 'scores.parquet'}")
    return 0


def _score(args: argparse.Namespace, config: GradSiftConfig, team: Team) -> tuple[ScoreResult, int]:
    from gradsift.anchors import anchor_rows
    from gradsift.data import load_source
    from gradsift.models import load_model, load_tokenizer
    from gradsift.pipeline import fingerprints_for, partial_loader, refusal_answers, score_cached
    from gradsift.tokenization import tokenize_records

    source = load_source(args.data, split=config.data.split)
    tokenizer = load_tokenizer(config.scoring.model, config.scoring.trust_remote_code)
    rows = tokenize_records(source.records, tokenizer, config.data, progress=team.is_main)
    anchor = anchor_rows(config.scoring.anchor_data, tokenizer, config.data)
    data_path = str(Path(source.path).resolve()) if source.kind in ("jsonl", "json", "parquet") else source.path
    fingerprints = fingerprints_for(
        config, tokenizer, rows, data_path=data_path, data_fingerprint=source.fingerprint, anchor=anchor
    )
    result = score_cached(
        rows,
        config.scoring,
        args.out,
        fingerprints,
        partial_loader(load_model, config.scoring),
        tokenizer.pad_token_id,
        progress=not args.quiet,
        describe={"data": config.data.model_dump()},
        team=team,
        anchor=anchor,
        refusals=refusal_answers(config.scoring, tokenizer),
    )
    return result, len(rows)


def run_select(args: argparse.Namespace) -> int:
    """`gradsift select`."""
    from gradsift.fileio import staged
    from gradsift.locking import folder_lock
    from gradsift.selection import apply_selection, kept_indices
    from gradsift.store import MANIFEST, TABLE, load_finished_scores, selection_paths, write_dropped, write_selection

    config = config_from_args(args)
    manifest, table = load_finished_scores(args.scores)
    data_path, source = scored_source(args.data, manifest, table)
    selection = apply_selection(table, config)
    inputs = [args.scores / name for name in (MANIFEST, TABLE)]
    inputs += [Path(source.path)] if source.kind in ("jsonl", "json", "parquet") else []
    out = args.out
    selection_paths(out, inputs)  # fail before the lock creates --out's folder
    with folder_lock(out.parent):
        paths = selection_paths(out, inputs)
        with staged([paths["kept"], paths["dropped"]]) as files:
            source.write_subset(kept_indices(selection, table).tolist(), files[out])
            write_dropped(files[paths["dropped"]], table, selection, lambda i: {"row": source.records[i]})
            where = {"scores": str(args.scores), "data": data_path, "out": str(out)}
            write_selection(paths["selection"], table, selection, config.selection, where, staged=files)
    dropped_path = paths["dropped"]
    print(f"{selection.summary()} -> {out} (dropped rows: {dropped_path})")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """`gradsift eval`."""
    from gradsift.evaluation import check_task_names, results_table, run_lm_eval, task_manager
    from gradsift.models import load_for_eval, load_tokenizer

    model_config = section_values(args, "model", ModelConfig)
    evals = section_values(args, "eval", EvalConfig)
    if not model_config.model:
        raise UserError("`gradsift eval` needs --model: a hub id, a local folder or embedded:smollm2-135m-instruct.")
    if not evals.tasks:
        raise UserError("--tasks is empty; name lm-eval tasks or groups, e.g. --tasks gradsift_safety_offline.")
    manager = task_manager()
    check_task_names(evals.tasks, manager)  # before loading the model: a typo fails in seconds
    tokenizer = load_tokenizer(model_config.model, model_config.trust_remote_code, what=model_config.label("model"))
    model = load_for_eval(model_config)
    limit = None if evals.limit is None else (int(evals.limit) if evals.limit >= 1 else evals.limit)
    name = model_config.model + (f"+{Path(model_config.adapter).name}" if model_config.adapter else "")
    results = run_lm_eval(
        model,
        tokenizer,
        evals.tasks,
        args.output,
        limit=limit,
        batch_size=evals.batch_size,
        max_gen_toks=evals.max_gen_toks,
        seed=evals.seed or 0,
        model_name=name,
        manager=manager,
    )
    if results:
        print(results_table(results))
        print(f"results and samples -> {args.output}")
    return 0


def run_judge(args: argparse.Namespace) -> int:
    """`gradsift judge`."""
    from gradsift.evaluation import judge_results

    loading = section_values(args, "model", ModelConfig)
    summary = judge_results(
        args.results,
        args.judge,
        judge_format=None if args.format == "auto" else args.format,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        device=loading.device,
        dtype=loading.dtype,
        quantization=loading.quantization,
        trust_remote_code=loading.trust_remote_code,
        progress=not args.quiet,
    )
    rows = [
        [task, str(v["num_samples"]), _rate(v["keyword_attack_success_rate"]), _rate(v["judged_attack_success_rate"]),
         str(v["unparsed"])]
        for task, v in summary["tasks"].items()
    ]  # fmt: skip
    print(text_table(["task", "n", "keyword ASR", f"judged ASR ({summary['format']})", "unparsed"], rows))
    print(f"-> {args.results / 'judge_results.json'}")
    return 0


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def run_run(args: argparse.Namespace) -> int:
    """`gradsift run`."""
    from gradsift.continual.loading import load_recipe
    from gradsift.continual.runner import describe_plan, plan, run_recipe

    recipe = load_recipe(args.recipe)
    out = args.out or Path("runs") / recipe.name
    arms = [a.strip() for a in args.arms.split(",")] if args.arms else None
    seeds = _seeds(args.seeds) if args.seeds else None
    steps = plan(recipe, out, arms, seeds)
    print(describe_plan(recipe, steps, rerun_from=args.rerun_from))
    if args.dry_run:
        return 0
    run_recipe(recipe, out, arms=arms, seeds=seeds, progress=not args.quiet, rerun_from=args.rerun_from)
    if not args.no_report:
        from gradsift.report import headline_table, write_report

        paths = write_report(out)
        print(headline_table(json.loads(paths["json"].read_text(encoding="utf-8"))))
        print(f"report -> {paths['md']}")
    return 0


def _seeds(text: str) -> list[int]:
    try:
        return [int(seed) for seed in text.split(",")]
    except ValueError:
        raise UserError(f"--seeds {text!r}: seeds are comma-separated integers, e.g. --seeds 0,1,2.") from None


def run_report(args: argparse.Namespace) -> int:
    """`gradsift report`."""
    from gradsift.report import headline_table, write_report

    if args.rejudge:
        from gradsift.continual.evals import rejudge_run

        logger.info("gradsift report: judged the answers of %d stage(s) again", rejudge_run(args.run_dir))
    paths = write_report(args.run_dir, plots=not args.no_plots)
    print(headline_table(json.loads(paths["json"].read_text(encoding="utf-8"))))
    print(f"report -> {paths['md']}")
    return 0


def run_evals_path(args: argparse.Namespace) -> int:
    """`gradsift evals-path`."""
    from gradsift.evaluation import evals_path

    print(evals_path())
    return 0


def main_entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
