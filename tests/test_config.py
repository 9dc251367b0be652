"""Dataclass configs: CLI flags, YAML recipes, unknown keys and wrong types refused by name."""

import argparse
from dataclasses import dataclass

import pytest

from lmprune.core.config import build_config, option, register_stage
from lmprune.core.errors import LmpruneError


@dataclass
class Demo:
    model: str = option("m", "Model.", positional=True)
    max_docs: int | None = option(None, "Documents per corpus.")
    lr: float = option(1e-4, "Learning rate.")
    debug_plots: bool = option(False, "Plots.")
    fail_above: list[str] = option([], "Thresholds.")


def _parse(argv, tmp_path=None, yaml_text=None):
    seen = {}
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    register_stage(sub, "demo", Demo, lambda cfg: seen.setdefault("cfg", cfg) and 0, "Demo.")
    if yaml_text is not None:
        (tmp_path / "r.yaml").write_text(yaml_text)
        argv = [*argv, "--config", str(tmp_path / "r.yaml")]
    args = parser.parse_args(["demo", *argv])
    args.func(args)
    return seen["cfg"]


def test_flags_fill_the_dataclass():
    cfg = _parse(["mm", "--max-docs", "5", "--lr", "0.5", "--debug-plots",
                  "--fail-above", "a=1", "--fail-above", "b=2"])
    assert cfg == Demo("mm", 5, 0.5, True, ["a=1", "b=2"])


def test_yaml_values_with_flags_overriding(tmp_path):
    cfg = _parse(["mm", "--lr", "0.25"], tmp_path, "max_docs: 7\nlr: 1\n")
    assert (cfg.max_docs, cfg.lr) == (7, 0.25)


def test_unknown_key_and_wrong_type_are_named(tmp_path):
    with pytest.raises(LmpruneError, match="unknown key.*max_dcos"):
        _parse(["mm"], tmp_path, "max_dcos: 7\n")
    with pytest.raises(LmpruneError, match="Demo.max_docs: expected int, got str"):
        build_config(Demo, {"max_docs": "many"})
    with pytest.raises(LmpruneError, match="expected a list"):
        build_config(Demo, {"fail_above": "x"})


def test_corpus_fields_come_from_the_declarations_and_every_one_is_checked(tmp_path):
    """The corpus specs a recipe checks before any work are the fields declared with
    option(corpus=True), in every section; a missing file in any of them is refused by key."""
    from lmprune.collect import CollectConfig
    from lmprune.core.config import corpus_fields
    from lmprune.finetune.command import FinetuneConfig
    from lmprune.run.recipe import SECTIONS, check_inputs, parse_recipe

    assert corpus_fields(CollectConfig) == ["offensive", "clean"]
    assert corpus_fields(FinetuneConfig) == ["eval_prompts", "ppl_data", "data"]
    checked = {f"{section}.{key}" for section, cls in SECTIONS.items()
               for key in corpus_fields(cls)}
    assert checked == {"collect.offensive", "collect.clean", "locate.general", "prune.offensive",
                       "prune.clean", "eval.prompts", "eval.ppl_data", "finetune.data",
                       "finetune.eval_prompts", "finetune.ppl_data", "transfer.prompts"}
    from tests.tiny_models import save_tiny

    save_tiny("llama", tmp_path / "model")
    text = tmp_path / "t.txt"
    text.write_text("one document\n")
    values = {"model": str(tmp_path / "model"),
              "collect": {"offensive": str(text), "clean": str(text)},
              "locate": {"general": str(text)}, "eval": {"prompts": str(text), "ppl_data": "none"},
              "finetune": {"data": str(text), "eval_prompts": str(text), "ppl_data": str(text)},
              "prune": {"select": "top:1"}}
    check_inputs(parse_recipe(values, "r"))
    for section, key in [("finetune", "eval_prompts"), ("locate", "general")]:
        broken = {**values, section: {**values[section], key: str(tmp_path / "missing.txt")}}
        with pytest.raises(LmpruneError, match=f"{section}.{key}: corpus file not found"):
            check_inputs(parse_recipe(broken, "r"))
