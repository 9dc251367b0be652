"""The scorer registry: every toxicity scorer behind one interface,
`load_scorer(name).score(texts) -> [P(toxic)]`, found by the kind its name starts with.

    profanity_check                              alt-profanity-check (TF-IDF + linear SVM, offline)
    detoxify:original | unbiased | multilingual  Detoxify, checkpoint downloaded at first use
    detoxify:/path/model.ckpt?config=/path/dir   Detoxify checkpoint + local HF config/tokenizer
    hf:ID_OR_PATH[?label=toxic]                  any sequence-classification model
    minilm[?embedder=FOLDER_OR_HUB_ID]           logistic head on all-MiniLM-L6-v2 embeddings,
                                                 trained once on ToxiGen + ParaDetox (offline;
                                                 lmprune.evaluate.learned)

Options come as `?key=value` after the name or as keyword arguments of `load_scorer`; both go to
the scorer (`batch_size`, `max_length`, and `label`, `config`, `revision` where they apply;
`embedder`, `toxigen`, `paradetox`, `max_pairs` for minilm).

A scorer module registers its loader with `@register_scorer(kind, usage)` (as
lm-evaluation-harness registers models); the built-in ones live in the modules of `BUILT_IN`,
imported by name the first time a scorer is looked up, so this module imports none of them.
Another package can register its own kind the same way before calling `load_scorer`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl

from lmprune.core.errors import LmpruneError

BUILT_IN = ("lmprune.evaluate.scorers", "lmprune.evaluate.learned")


class Scorer:
    """Probability that each text is toxic, in [0, 1], computed in batches."""

    name: str
    """What scored, with its version: results must always say it."""

    def __init__(self, name: str, batch_size: int):
        self.name = name
        self.batch_size = batch_size

    def score(self, texts: list[str]) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            scores.extend(float(s) for s in self._score_batch(texts[start:start + self.batch_size]))
        return scores

    def _score_batch(self, texts: list[str]) -> list[float]:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name}


def package_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class ScorerKind:
    """One registered kind: how to load it and how its name is written."""

    kind: str
    load: Callable[[str, str, dict], Scorer]
    """(target after `kind:`, device, options) -> the scorer; pops the options it uses."""
    usage: str
    target: bool
    """Whether the name takes a target after `kind:` (hf:MODEL), or never (minilm)."""


SCORERS: dict[str, ScorerKind] = {}


def register_scorer(kind: str, usage: str, target: bool = False):
    """Decorator: `load(target, device, options) -> Scorer` becomes the loader of `kind`."""
    def decorate(load):
        known = SCORERS.get(kind)
        # the same loader met twice is one module imported twice (run as __main__)
        if known is not None and known.load.__qualname__ != load.__qualname__:
            raise ValueError(f"scorer kind '{kind}' is registered twice")
        SCORERS[kind] = ScorerKind(kind, load, usage, target)
        return load
    return decorate


def _registered() -> dict[str, ScorerKind]:
    for module in BUILT_IN:
        importlib.import_module(module)
    return SCORERS


def load_scorer(name: str, device: str = "cpu", **options) -> Scorer:
    """A scorer from its name (see the module docstring); options as `?k=v` or keywords."""
    spec, _, query = name.partition("?")
    options = {**dict(parse_qsl(query, keep_blank_values=True)), **options}
    kind, _, target = spec.partition(":")
    registered = _registered()
    entry = registered.get(kind)
    if entry is None or (target and not entry.target):
        usages = [registered[k].usage for k in sorted(registered)]
        raise LmpruneError(f"unknown scorer '{name}': use {', '.join(usages[:-1])} or "
                           f"{usages[-1]}")
    scorer = entry.load(target, device, options)
    if options:
        raise LmpruneError(f"scorer '{name}': unknown option(s) {', '.join(sorted(options))}")
    return scorer
