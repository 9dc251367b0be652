"""The lineage of a checkpoint, `DIR/lmprune.json` (docs/formats.md): its base model, what was
zeroed or edited and every stage that made it. One reader and the fields every writer stamps."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from lmprune import __version__
from lmprune.core.errors import LmpruneError
from lmprune.core.io import read_json

LINEAGE_FILE = "lmprune.json"
FORMAT = "lmprune.checkpoint"
FORMAT_VERSION = 1
BASE = "base"  # in a model option: the unpruned base model of the checkpoint, from its lineage


def stamp() -> dict:
    """The fields that open every lineage a stage writes: the format and the writer's version."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "lmprune_version": __version__}


def read_lineage(folder: str | Path, required: bool = False) -> dict | None:
    """The lineage of a checkpoint folder: None when it has none (a plain model), or with
    `required` an error saying so; a corrupt file is named either way."""
    path = Path(folder) / LINEAGE_FILE
    if not path.is_file():
        if required:
            raise LmpruneError(f"{folder} has no {LINEAGE_FILE}: it is not a checkpoint written "
                               f"by lmprune (prune, finetune, induce, profs, act, dpo)")
        return None
    meta = read_json(path, "prune or fine-tune again to rewrite it")
    if not isinstance(meta.get("pruned_neurons", {}), dict):
        raise LmpruneError(f"{path}: 'pruned_neurons' must map layer -> neuron indices")
    return meta


def model_or_base(requested: str, identity: dict) -> str:
    """The model spec `requested`, or for "base" the base model of the checkpoint whose identity
    is `identity` (the `base_model` of its lineage), or that model itself when it has none."""
    if requested != BASE:
        return requested
    base = identity.get("base_model") or identity
    return base["name"]


def model_or_base_of(requested: str, model: str) -> str:
    """`model_or_base` for a model given by its spec: "base" is the `base_model` of the lineage
    when `model` is a checkpoint folder, else `model` itself."""
    base = (read_lineage(model) or {}).get("base_model")
    return model_or_base(requested, {"name": model, "base_model": base})


def command_line() -> str:
    """The command that made a checkpoint, for its lineage."""
    return shlex.join(["lmprune", *sys.argv[1:]])


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
