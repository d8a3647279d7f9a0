"""Two sizes for each benchmark: the default, which finishes within 5 minutes on a 2-core AVX2 CPU, and `--long`.

A size a user gives on the command line wins over both; `--long` changes only the sizes left out.
"""

from __future__ import annotations

import argparse


def add_sizes(parser: argparse.ArgumentParser, sizes: dict[str, tuple[object, object, type, str]]) -> None:
    """Add `--long` and one option per size: `{dest: (default, long, type, help)}`."""
    parser.add_argument("--long", action="store_true", help="the long form: each size below at its --long value")
    for dest, (quick, long, kind, text) in sizes.items():
        parser.add_argument(
            "--" + dest.replace("_", "-"), type=kind, default=None, help=f"{text} (default {quick}; --long {long})"
        )


def fill_sizes(args: argparse.Namespace, sizes: dict[str, tuple[object, object, type, str]]) -> argparse.Namespace:
    """Give every size left out its default, or its long form under `--long`."""
    for dest, (quick, long, _kind, _text) in sizes.items():
        if getattr(args, dest) is None:
            setattr(args, dest, long if args.long else quick)
    return args
