"""The `gradsift` command's config flags: one `--kebab-case` flag per field of the config schema, and the config
they give.

Help texts and defaults come from the schema, so every config key of `score`, `select` and `inspect` is a flag
(`--quantization none`, `--keep-fraction 0.2`); `eval` and `judge` get theirs from `ModelConfig` and `EvalConfig` the
same way. `config_from_args` merges a `--config` YAML file (nested `data:`, `scoring:`, `selection:` sections, or a
top-level `gradsift:` block as in an axolotl YAML) with the flags given; flags win over the file.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradsift.config import SECTIONS, GradSiftConfig, load_config
from gradsift.errors import UserError


def add_schema_flags(
    parser: argparse.ArgumentParser, section: str, model: type, title: str, exclude: Sequence[str] = ()
) -> None:
    """A flag per field of a config model, as `score`'s are made: help and defaults come from the schema."""
    group = parser.add_argument_group(f"{section} options ({title})")
    for name, field in model.model_fields.items():
        if name not in exclude:
            _add_field_flag(group, section, name, field)


def section_values(args: argparse.Namespace, section: str, model: type) -> Any:
    """The config model of one flag section: the flags given, over the schema's defaults (`UserError` naming the
    flag if a value is invalid)."""
    from pydantic import ValidationError

    from gradsift.config import format_validation_error

    given = {key.split(".", 1)[1]: value for key, value in vars(args).items() if key.startswith(f"{section}.")}
    try:
        return model(**given)
    except ValidationError as error:
        message = " ".join(format_validation_error(error, section).splitlines())
        for name in model.model_fields:  # these commands take flags only: name the flag, not a config key
            message = message.replace(f"`{section}.{name}`", f"`--{name.replace('_', '-')}`")
        raise UserError(message) from None


def add_common(parser: argparse.ArgumentParser, sections: Sequence[str]) -> None:
    """`--config`, `-q` and a flag per field of each config section, as `score`, `select` and `inspect` take them."""
    parser.add_argument("--config", type=Path, help="YAML file with data:, scoring: and selection: sections")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    for section in sections:
        group = parser.add_argument_group(f"{section} options (`{section}.*` in --config)")
        for name, field in SECTIONS[section].model_fields.items():
            _add_field_flag(group, section, name, field)


def _add_field_flag(group: Any, section: str, name: str, field: Any) -> None:
    flag = "--" + name.replace("_", "-")
    default = field.get_default(call_default_factory=True)
    if isinstance(default, list):
        default = ",".join(default)
    help_text = f"{field.description} (default: {default!r})".replace("%", "%%")
    dest = f"{section}.{name}"
    annotation = field.annotation
    choices = _literal_choices(annotation)
    if annotation is bool or annotation == bool | None:  # unset: the schema's default (None: "decide for me")
        group.add_argument(
            flag, dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
        )
    elif choices:
        group.add_argument(flag, dest=dest, choices=choices, default=argparse.SUPPRESS, help=help_text)
    elif name == "refusal_texts":  # texts hold commas: one flag per text
        group.add_argument(flag, dest=dest, action="append", default=argparse.SUPPRESS, metavar="TEXT", help=help_text)
    elif name == "lora_target_modules":
        group.add_argument(flag, dest=dest, nargs="+", default=argparse.SUPPRESS, metavar="NAME", help=help_text)
    elif typing.get_origin(annotation) is list:
        group.add_argument(flag, dest=dest, type=_comma_list, default=argparse.SUPPRESS, metavar="A,B", help=help_text)
    else:
        group.add_argument(
            flag,
            dest=dest,
            type=_scalar_parser(annotation),
            default=argparse.SUPPRESS,
            metavar=_metavar(annotation),
            help=help_text,
        )


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _literal_choices(annotation: Any) -> list[str] | None:
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    return None


def _scalar_parser(annotation: Any):
    args = (
        typing.get_args(annotation)
        if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
        else (annotation,)
    )
    nullable = type(None) in args
    words = _union_words(annotation)
    base = next((a for a in args if a is not type(None) and typing.get_origin(a) is None), str)

    def parse(text: str) -> Any:
        if nullable and text.lower() in ("none", "null"):
            return None
        if text in words:  # e.g. `auto` beside a number
            return text
        return base(text) if base in (int, float) else text

    parse.__name__ = getattr(base, "__name__", "value")
    return parse


def _metavar(annotation: Any) -> str:
    text = str(annotation)
    words = "|".join(_union_words(annotation))
    if "float" in text:
        return "X"
    if "int" in text:
        return f"N|{words}" if words else "N"
    return "VALUE"


def _union_words(annotation: Any) -> list[str]:
    """The fixed words a union admits beside its other members (`auto` in `int | Literal["auto"]`)."""
    members = typing.get_args(annotation)
    return [word for a in members if typing.get_origin(a) is typing.Literal for word in typing.get_args(a)]


def config_from_args(args: argparse.Namespace) -> GradSiftConfig:
    """Merge `--config FILE` with the flags that were given (flags win) into a validated config."""
    data: dict[str, Any] = {}
    if args.config is not None:
        data = read_yaml_config(args.config)
    for key, value in vars(args).items():
        if "." in key:
            section, name = key.split(".", 1)
            data.setdefault(section, {})[name] = value
    return load_config(data)


def read_yaml_config(path: Path) -> dict[str, Any]:
    """Read a config YAML: `data:`/`scoring:`/`selection:` sections, possibly under a top-level `gradsift:` key."""
    import yaml

    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise UserError(f"--config {str(path)!r} {what}; pass a YAML file.")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise UserError(f"--config {str(path)!r} is not valid YAML: {error}. Fix the file's syntax.") from None
    except UnicodeDecodeError:
        raise UserError(f"--config {str(path)!r} is not UTF-8 text; save the YAML file as UTF-8.") from None
    if not isinstance(loaded, dict):
        raise UserError(f"--config {str(path)!r} must hold a mapping; got {type(loaded).__name__}.")
    if "gradsift" in loaded:
        loaded = loaded["gradsift"] or {}
    return loaded
