"""Stage configs as dataclasses: the same fields make CLI flags and YAML recipe keys.

Each field carries its help text in `metadata["help"]` (as TRL does), so `--help`, recipes and
code read one definition.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import field
from pathlib import Path
from typing import Any

import yaml

from lmprune.core.errors import ConfigError, LmpruneError


def option(default, help: str, corpus: bool = False, **extra):
    """A config field: default, help text, and argparse extras (positional=True, choices=...).
    `corpus`: the value is a corpus spec, checked before a recipe starts (`corpus_fields`)."""
    if corpus:
        extra["corpus"] = True
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


def corpus_fields(cls) -> list[str]:
    """The fields of a config class that name corpora (declared with `option(corpus=True)`)."""
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("corpus")]


def _base_type(tp):
    """(scalar type, is_list) of an annotation such as `int | None` or `list[str]`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin is list:
        return typing.get_args(tp)[0], True
    return tp, False


def add_config_args(parser: argparse.ArgumentParser, cls) -> None:
    """Add one flag per field of the dataclass `cls` (`--max-docs` for `max_docs`)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        tp, is_list = _base_type(hints[f.name])
        # argparse %-formats help text: a literal "95%" must reach it as "95%%"
        kwargs = {"help": meta.pop("help", "").replace("%", "%%"), "default": argparse.SUPPRESS}
        if "choices" in meta:
            kwargs["choices"] = meta.pop("choices")
        meta.pop("corpus", None)
        if meta.pop("positional", False):
            parser.add_argument(f.name, type=tp, metavar=f.name.upper(), **kwargs)
            continue
        flag = "--" + f.name.replace("_", "-")
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                **kwargs)
        elif is_list:
            parser.add_argument(flag, dest=f.name, type=tp, action="append", **kwargs)
        else:
            parser.add_argument(flag, dest=f.name, type=tp, **kwargs)


def _check_value(cls_name: str, key: str, value, tp, is_list: bool):
    if is_list:
        if not isinstance(value, list):
            raise LmpruneError(f"{cls_name}.{key}: expected a list, got {value!r}")
        return [_check_value(cls_name, key, v, tp, False) for v in value]
    if value is None:
        return None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(key, f"must be a finite number, not {value}")
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise LmpruneError(
            f"{cls_name}.{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


def build_config(cls, values: dict, where: str = ""):
    """Make a `cls` from a mapping, refusing unknown keys and wrong types by name."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    recipe = bool(where)  # a recipe section names its keys as section.key, the CLI as flags
    where = where or cls.__name__
    unknown = sorted(set(values) - names)
    if unknown:
        raise LmpruneError(
            f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}"
        )
    try:
        checked = {k: _check_value(where, k, v, *_base_type(hints[k])) for k, v in values.items()}
    except ConfigError as err:
        if recipe:
            raise LmpruneError(err.recipe_message(where)) from None
        raise
    try:
        return cls(**checked)
    except TypeError as err:  # a required field without a value
        raise LmpruneError(f"{where}: {err}") from err


def config_from_args(cls, args: argparse.Namespace, yaml_path: str | None = None):
    """Recipe values (if any) overridden by the flags that were given."""
    values = load_yaml(yaml_path) if yaml_path else {}
    names = {f.name for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return build_config(cls, values)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise LmpruneError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise LmpruneError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from err
    if not isinstance(data, dict):
        raise LmpruneError(f"{path}: expected a mapping of keys to values at the top level")
    return data


def register_stage(subparsers, name: str, cls, run, help: str):
    """A subcommand whose flags are the fields of `cls`, plus `--config recipe.yaml`.

    `run(config)` returns the exit code; flags given on the command line beat the YAML values.
    """
    parser = subparsers.add_parser(name, help=help, description=help)
    parser.add_argument("--config", default=None, metavar="YAML",
                        help="Read the settings from a YAML file (flags override it).")
    add_config_args(parser, cls)
    parser.set_defaults(func=lambda args: run(config_from_args(cls, args, args.config)))
    return parser


@dataclasses.dataclass(frozen=True)
class Need:
    """Something a stage loads once reached: a toxicity scorer or a fluency judge model."""

    kind: str  # "scorer" or "judge"
    name: str  # the scorer spec or model name
    device: str
    key: str  # the config field that names it


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One stage as the CLI and both runners (`lmprune run`, `lmprune compare`) see it. The
    stage's module declares it once; lmprune/stages.py lists them in flow order."""

    name: str
    """Subcommand, and the recipe section of the stage where a recipe has one."""
    config: type
    """The stage's config dataclass: its fields are the flags and the recipe keys."""
    run: Callable[[Any], int]
    """The entry point: `run(config)` does the work and returns the exit code."""
    help: str
    outputs: tuple[str, ...] = ("out",)
    """Fields naming what the stage writes (a runner points them into its folder)."""
    inputs: tuple[str, ...] = ()
    """Fields naming upstream outputs (hashed by content into a runner's stage key)."""
    wired: tuple[str, ...] = ("model",)
    """Further fields a runner sets; a recipe that sets them (or an input or output) is
    refused."""
    sources: tuple[str, ...] = ()
    """Further fields naming data the stage reads, hashed by content where local, beside the
    corpus fields (`option(corpus=True)`)."""
    step: Callable[[Any, bool], object] | None = None
    """What a runner calls instead of `run`: (config, whether a killed run with the same key
    may resume)."""
    check: Callable[[Any], list[Need]] | None = None
    """What the stage would refuse only once reached, checked before a runner's first stage
    (raising, ConfigError naming the key); returns what it will load, which the runner loads
    once to see that it can."""

    @property
    def wired_keys(self) -> set[str]:
        return {*self.wired, *self.inputs, *self.outputs}

    @property
    def corpus_keys(self) -> list[str]:
        return corpus_fields(self.config)

    def register(self, subparsers) -> argparse.ArgumentParser:
        return register_stage(subparsers, self.name, self.config, self.run, self.help)
