"""Stage configs as dataclasses: the same fields make CLI flags and YAML recipe keys.

Each field carries its help text in `metadata["help"]` (as TRL does), so `--help`, recipes and
code read one definition; its bounds (`check_bounds`) and whether it is part of a resume
fingerprint or a stage key (`fingerprint_fields`, `unhashed`) are metadata too. Settings that
several stages share are declared once, in lmprune/core/specs.py, as `Spec` classes the stage
configs inherit (`redeclare` changes a default or help text, `prefixed` copies them under other
names).
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


def option(default, help: str, corpus: bool = False, *, min=None, max=None, above=None,
           fingerprint: bool = True, stage_key: bool = True, **extra):
    """A config field: default, help text, and argparse extras (positional=True, choices=...).
    `corpus`: the value is a corpus spec, checked before a recipe starts (`corpus_fields`).
    `min` and `max` (inclusive) and `above` (exclusive) bound a number: `check_bounds` refuses
    a value outside them by name (None is always allowed).
    `fingerprint=False`: not compared when a killed run resumes from its checkpoint
    (`fingerprint_fields`: it changes nothing that is trained, or the fingerprint holds what it
    produces). `stage_key=False`: not in a runner's stage key either (`unhashed`): it changes
    how a stage treats its output, not what the stage computes."""
    if corpus:
        extra["corpus"] = True
    extra.update({k: v for k, v in (("min", min), ("max", max), ("above", above))
                  if v is not None})
    if not stage_key:
        extra["stage_key"] = fingerprint = False
    if not fingerprint:
        extra["fingerprint"] = False
    return _field(default, {"help": help, **extra})


def _field(default, metadata: dict):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def corpus_fields(cls) -> list[str]:
    """The fields of a config class that name corpora (declared with `option(corpus=True)`)."""
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("corpus")]


# --------------------------------------------------------------------------------------------
# Bounds, fingerprints and stage keys, read from the fields' metadata


def _bound_problem(meta, value) -> str | None:
    """Why `value` is outside the bounds in `meta` (None when inside, or unbounded)."""
    low, high, strict = meta.get("above", meta.get("min")), meta.get("max"), "above" in meta
    if value is None or isinstance(value, bool) or (low is None and high is None):
        return None
    # written as "not inside" so that NaN, which compares false, is outside every bound
    inside = low is None or (value > low if strict else value >= low)
    if inside and (high is None or value <= high):
        return None
    if low is not None and high is not None:
        return f"must be within {'(' if strict else '['}{low}, {high}], not {value}"
    if high is not None:
        return f"must be at most {high}, not {value}"
    return f"must be {'above' if strict else 'at least'} {low}, not {value}"


def check_bounds(config) -> None:
    """Refuse a value outside its field's declared bounds (`option(min=, max=, above=)`; every
    item of a list): ConfigError naming the field (`--batch-size must be at least 1, not 0`; a
    recipe names it `section.batch_size`)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        for item in value if isinstance(value, list) else [value]:
            problem = _bound_problem(f.metadata, item)
            if problem:
                raise ConfigError(f.name, problem)


def fingerprint_fields(config) -> list[str]:
    """The settings a killed run must share with this one to resume from its checkpoint: the
    fields not declared with `fingerprint=False` (a config class or instance)."""
    return [f.name for f in dataclasses.fields(config) if f.metadata.get("fingerprint", True)]


def fingerprint_values(config) -> dict:
    """{field: value} of `fingerprint_fields(config)`."""
    return {name: getattr(config, name) for name in fingerprint_fields(config)}


def unhashed(config) -> set[str]:
    """The settings left out of a runner's stage key: the fields declared with
    `stage_key=False` (none for a config that is not a dataclass)."""
    if not dataclasses.is_dataclass(config):
        return set()
    return {f.name for f in dataclasses.fields(config) if not f.metadata.get("stage_key", True)}


# --------------------------------------------------------------------------------------------
# Shared declarations: Spec, redeclare, prefixed


class _Redeclared:
    """A marker `redeclare` leaves in a class body, made into a field by `Spec`."""

    def __init__(self, default, changes: dict):
        self.default, self.changes = default, changes


def redeclare(default=dataclasses.MISSING, help: str | None = None, **changes):
    """In the body of a subclass of a `Spec`, `name = redeclare(...)` makes the inherited field
    `name` anew with another default and/or help text, or other bounds (`min=`, ...), narrower
    `choices=` or fingerprint membership; its type and every other part come from the one
    declaration. `prefixed` takes these too."""
    if help is not None:
        changes["help"] = help
    return _Redeclared(default, changes)


def _redeclared_field(f: dataclasses.Field, change: _Redeclared):
    meta = {**f.metadata, **change.changes}
    if meta.get("stage_key", True) is False:
        meta["fingerprint"] = False
    default = change.default
    if default is dataclasses.MISSING:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return _field(default, meta)


class Spec:
    """Base of the setting groups several stage configs share (lmprune/core/specs.py) and so of
    the configs that inherit them: their fields stay flat (the same flags and recipe keys as
    fields declared in the config itself). A class attribute `name = redeclare(...)` in the body
    of a subclass becomes the inherited field `name` with those changes."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        changes = {k: v for k, v in vars(cls).items() if isinstance(v, _Redeclared)}
        if not changes:
            return
        if "__annotations__" not in vars(cls):
            cls.__annotations__ = {}
        annotations = vars(cls)["__annotations__"]
        for name, change in changes.items():
            base = next((b for b in cls.__mro__[1:]
                         if name in getattr(b, "__dataclass_fields__", {})), None)
            if base is None:
                raise TypeError(f"{cls.__name__}.{name}: no inherited field to redeclare")
            annotations[name] = typing.get_type_hints(base)[name]  # the declared type
            setattr(cls, name, _redeclared_field(base.__dataclass_fields__[name], change))


def prefixed(spec: type, prefix: str, keep: tuple[str, ...] = (), **redeclared) -> type:
    """The fields of the dataclass `spec` as a mixin under other names: `prefix` + name (the
    names in `keep` unchanged), each with the type, help, choices and bounds of its declaration;
    `redeclared` maps a field of `spec` (by its own name) to `redeclare(...)`: another default,
    say. The mixin has `spec`'s methods; `spec_values(config, spec)` reads its values back as a
    `spec`."""
    hints = typing.get_type_hints(spec)
    names, fields = {}, []
    for f in dataclasses.fields(spec):
        names[f.name] = f.name if f.name in keep else prefix + f.name
        change = redeclared.pop(f.name, None) or _Redeclared(dataclasses.MISSING, {})
        fields.append((names[f.name], hints[f.name], _redeclared_field(f, change)))
    if redeclared:
        raise TypeError(f"{spec.__name__} has no field {', '.join(redeclared)}")
    methods = {k: v for k, v in vars(spec).items() if callable(v) and not k.startswith("__")}
    name = "".join(part.title() for part in prefix.split("_")) + spec.__name__
    return dataclasses.make_dataclass(name, fields, bases=(Spec,), kw_only=True,
                                      namespace={**methods, "_spec_names": {spec: names}})


def spec_values(config, spec: type):
    """The values of `spec`'s fields in `config` (which inherits `spec` or a `prefixed` copy of
    it), as a `spec`."""
    names = next((vars(k)["_spec_names"][spec] for k in type(config).__mro__
                  if spec in vars(k).get("_spec_names", {})), None)
    names = names or {f.name: f.name for f in dataclasses.fields(spec)}
    return spec(**{own: getattr(config, name) for own, name in names.items()})


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
    """Make a `cls` from a mapping, refusing unknown keys, wrong types and values outside their
    bounds by name."""
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
        try:
            config = cls(**checked)
        except TypeError as err:  # a required field without a value
            raise LmpruneError(f"{where}: {err}") from err
        check_bounds(config)
    except ConfigError as err:
        if recipe:
            raise LmpruneError(err.recipe_message(where)) from None
        raise
    return config


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
    """Something a stage loads once reached: a toxicity scorer, a fluency judge or a teacher."""

    kind: str  # "scorer", or a model's role ("judge", "teacher")
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
