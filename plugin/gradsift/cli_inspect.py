"""`gradsift inspect`: a score folder's quantiles, what the rule drops, length bins and, with a label column, how
well each score tells the labels apart; and the scored data a score folder names, checked (also for `select`)."""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from gradsift.cli_flags import config_from_args
from gradsift.errors import UserError
from gradsift.selection import length_bin_summary
from gradsift.table import QUANTILES, anchor_correlations, column_quantiles


def scored_source(data: str | None, manifest: dict[str, Any], table: Any) -> tuple[str, Any]:
    """The scored data (`data`, else the path the scores name) and its path, checked to be what was scored."""
    from gradsift.data import load_source

    fingerprints = manifest["fingerprints"]
    data_path = data or fingerprints.get("data_path")
    if not data_path:
        raise UserError("The scores do not name their data file; pass --data.")
    split = manifest.get("data", {}).get("split", "train")
    source = load_source(data_path, split=split)
    if source.fingerprint != fingerprints.get("data_fingerprint"):
        raise UserError(
            f"The data {data_path!r} changed since it was scored (fingerprint {source.fingerprint[:12]} != "
            f"{str(fingerprints.get('data_fingerprint'))[:12]}). Score it again with `gradsift score`."
        )
    if len(source) != len(table):
        raise UserError(f"The data has {len(source):,} rows but the scores have {len(table):,}; score it again.")
    return data_path, source


def run_inspect(args: argparse.Namespace) -> int:
    """`gradsift inspect`."""
    from gradsift.selection import apply_selection
    from gradsift.store import load_finished_scores

    config = config_from_args(args)
    manifest, table = load_finished_scores(args.scores)
    selection = apply_selection(table, config)
    ok = table.status == "ok"
    report: dict[str, Any] = {
        "rows": len(table),
        "status": {status: int((table.status == status).sum()) for status in sorted(set(table.status.tolist()))},
        "quantiles": {
            column: column_quantiles(getattr(table, column)[ok]) if ok.any() else {}
            for column in ("loss", "grad_norm")
        },
        "selection": {"rule": config.selection.rule, "summary": selection.summary(), "dropped": selection.counts()},
        "length_bins": length_bins(table, selection, ok, args.bins),
    }
    anchored = ok & np.isfinite(table.anchor_cos)
    if anchored.any():
        report["quantiles"].update(
            {column: column_quantiles(getattr(table, column)[anchored]) for column in ("anchor_dot", "anchor_cos")}
        )
        report["anchor_correlation"] = anchor_correlations(table, anchored)
    probed = ok & np.isfinite(table.refusal_logprob)
    if probed.any():
        report["quantiles"].update(
            {column: column_quantiles(getattr(table, column)[probed]) for column in ("refusal_logprob",)}
        )
    if args.suspicious is not None and args.suspicious < 1:
        raise UserError(f"`--suspicious` must be >= 1; got {args.suspicious}. Pass how many rows to list, e.g. 10.")
    if args.suspicious is not None and not probed.any():
        raise UserError(
            f"{args.scores}: the scores have no `refusal_logprob`; score with the refusal probe (--refusal-probe, "
            "or --anchor-data embedded:refusals) to list suspicious rows."
        )
    if args.data and not (args.label_column or args.suspicious):
        raise UserError(
            f"`--data {args.data}` is read only with --label-column or --suspicious; add one of them, or drop it."
        )
    source = scored_source(args.data, manifest, table)[1] if args.label_column or args.suspicious else None
    if args.label_column:
        report["labels"] = _label_report(args, source, table, selection, ok)
    if args.suspicious:
        report["suspicious"] = _suspicious(args.suspicious, source, table, probed)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.scores}: {report['rows']:,} rows; " + ", ".join(f"{n:,} {s}" for s, n in report["status"].items()))
    print(f"model {manifest['fingerprints'].get('model')}; data {manifest['fingerprints'].get('data_path')}")
    print()
    print(
        text_table(
            ["quantile", *[f"{q:g}" for q in QUANTILES]],
            [[column, *[f"{v:.4g}" for v in values.values()]] for column, values in report["quantiles"].items()],
        )
    )
    print()
    if "anchor_correlation" in report:
        shown = {k: "n/a" if v is None else f"{v:+.2f}" for k, v in report["anchor_correlation"].items()}
        print(
            f"anchor_cos rank correlation (Spearman): with grad_norm {shown['grad_norm']}, with response length "
            f"{shown['num_response_tokens']}"
        )
        print()
    print(f"selection ({config.selection.rule}): {selection.summary()}")
    print()
    if "labels" in report:
        print(_label_tables(report["labels"]))
        print()
    if "suspicious" in report:
        print(_suspicious_lines(report["suspicious"]))
        print()
    print(
        text_table(
            ["response tokens", "rows", "median loss", "median grad_norm", "kept"],
            [
                [
                    b["range"],
                    str(b["rows"]),
                    f"{b['median_loss']:.4g}",
                    f"{b['median_grad_norm']:.4g}",
                    f"{b['kept']} ({b['kept_fraction']:.0%})",
                ]
                for b in report["length_bins"]
            ],
        )
    )
    return 0


def _label_report(args: argparse.Namespace, source: Any, table: Any, selection: Any, ok: Any) -> dict:
    """Per value of the data's `--label-column`: its rows, scored rows and rows kept, and each score's AUROC."""
    from gradsift.table import label_aurocs

    data_path = source.path
    column = args.label_column
    missing = [int(i) for i in table.index if column not in source.records[int(i)]]
    if missing:
        raise UserError(
            f"{data_path}: row {missing[0] + 1} (and {len(missing) - 1} more) has no `{column}`; its keys: "
            f"{', '.join(sorted(source.records[missing[0]]))}. Name a column every row has with --label-column."
        )
    labels = np.array([str(source.records[int(i)][column]) for i in table.index], dtype=object)
    counts = {
        value: {
            "rows": int((labels == value).sum()),
            "scored": int((ok & (labels == value)).sum()),
            "kept": int((selection.keep & (labels == value)).sum()),
        }
        for value in sorted(set(labels.tolist()))
    }
    return {"column": column, "counts": counts, "auroc": label_aurocs(table, labels, ok)}


def _suspicious(count: int, source: Any, table: Any, probed: Any) -> list[dict[str, Any]]:
    """The `count` rows with the highest `refusal_logprob`, each with its request and answer on one line."""
    positions = np.flatnonzero(probed)
    order = positions[np.argsort(-table.refusal_logprob[positions], kind="stable")][:count]
    return [
        {
            "index": int(table.index[p]),
            "refusal_logprob": float(table.refusal_logprob[p]),
            "loss": float(table.loss[p]),
            "text": one_line(source.records[int(table.index[p])]),
        }
        for p in order
    ]


def one_line(record: dict[str, Any], width: int = 100) -> str:
    """A row's request and answer on one line, cut to about `width` characters each."""
    from gradsift.tokenization import row_text

    request, answer = row_text(record)

    def cut(text: str) -> str:
        text = " ".join(text.split())
        return text if len(text) <= width else text[: width - 1] + "…"

    return f"{cut(request)} → {cut(answer)}"


def _suspicious_lines(rows: list[dict[str, Any]]) -> str:
    header = (
        "most suspicious rows (highest refusal_logprob: the log-probability that the model opens its answer to the "
        "request with a refusal; index counts from 0):"
    )
    lines = [f"  {row['index']:>6d}  {row['refusal_logprob']:+7.3f}  {row['text']}" for row in rows]
    return "\n".join([header, *lines])


def _label_tables(labels: dict[str, Any]) -> str:
    values = list(labels["counts"])
    counts = text_table(
        [labels["column"], "rows", "scored", "kept"],
        [[value, *(f"{labels['counts'][value][k]:,}" for k in ("rows", "scored", "kept"))] for value in values],
    )
    aurocs = text_table(
        ["AUROC", *values],
        [
            [name, *("n/a" if by[v] is None else f"{by[v]:.3f}" for v in values)]
            for name, by in labels["auroc"].items()
        ],
    )
    return (
        f"{counts}\n\n{aurocs}\n(AUROC of each score for telling a label's rows from the others: 1 = its high "
        "values pick them out, 0.5 = chance, 0 = its low values do)"
    )


def length_bins(table: Any, selection: Any, ok: np.ndarray, bins: int) -> list[dict[str, Any]]:
    if bins < 1:
        raise UserError(f"`--bins` must be >= 1; got {bins}. Pass the number of response-length bins, e.g. 4.")
    return length_bin_summary(table, selection, ok, bins)


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
