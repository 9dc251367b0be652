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


# --------------------------------------------------------------------------------------------
# Shared declarations: bounds, the model spec, the protocols, fingerprints


def _stage_configs():
    from lmprune.collect import CollectConfig
    from lmprune.evaluate.command import EvalConfig
    from lmprune.finetune.command import FinetuneConfig
    from lmprune.finetune.relearn import RelearnConfig
    from lmprune.induce.command import InduceConfig
    from lmprune.locate.command import LocateConfig
    from lmprune.methods.act import ActConfig
    from lmprune.methods.dpo import DpoConfig
    from lmprune.methods.profs import ProfsConfig
    from lmprune.prune.command import PruneConfig

    return {"collect": CollectConfig, "locate": LocateConfig, "prune": PruneConfig,
            "eval": EvalConfig, "finetune": FinetuneConfig, "induce": InduceConfig,
            "relearn": RelearnConfig, "profs": ProfsConfig, "act": ActConfig, "dpo": DpoConfig}


@dataclass
class Bounded:
    count: int = option(8, "Count.", min=1)
    share: float = option(0.5, "Share.", above=0, max=1)
    strength: float = option(1.0, "Strength.", min=0, max=2)
    cap: int | None = option(None, "Cap.", max=10)


def test_bounds_declared_on_fields_are_refused_by_name():
    from lmprune.core.config import check_bounds
    from lmprune.core.errors import ConfigError

    cases = [({"count": 0}, "count", "--count must be at least 1, not 0"),
             ({"share": 0.0}, "share", "--share must be within (0, 1], not 0.0"),
             ({"share": 1.5}, "share", "--share must be within (0, 1], not 1.5"),
             ({"strength": 2.5}, "strength", "--strength must be within [0, 2], not 2.5"),
             ({"cap": 11}, "cap", "--cap must be at most 10, not 11")]
    for values, key, message in cases:
        with pytest.raises(ConfigError) as err:
            build_config(Bounded, values)
        assert (err.value.key, str(err.value)) == (key, message)
        with pytest.raises(LmpruneError, match=rf"^sec\.{key}: must be"):
            build_config(Bounded, values, where="sec")
    assert build_config(Bounded, {"count": 1, "share": 1, "strength": 0, "cap": None}).share == 1
    with pytest.raises(ConfigError, match="--strength must be within"):  # NaN is outside
        check_bounds(Bounded(strength=float("nan")))
    for cls in _stage_configs().values():  # every default is inside its bounds
        check_bounds(cls())


def test_bounds_are_refused_on_the_cli_and_in_a_recipe_section(tmp_path, capsys):
    from lmprune.cli import main
    from lmprune.run.recipe import parse_recipe

    assert main(["collect", "--batch-size", "0", "--out", str(tmp_path / "s")]) == 2
    assert "lmprune: error: --batch-size must be at least 1, not 0" in capsys.readouterr().err
    assert main(["act", "--strength", "1.5", "--out", str(tmp_path / "a")]) == 2
    assert "--strength must be within [0, 1], not 1.5" in capsys.readouterr().err
    assert not (tmp_path / "s").exists() and not (tmp_path / "a").exists()
    for section, key, value, problem in [
            ("collect", "coact_token_fraction", 1.5, "must be within (0, 1], not 1.5"),
            ("finetune", "seq_len", 0, "must be at least 1, not 0"),  # TrainingSpec's bound
            ("eval", "limit", 0, "must be at least 1, not 0")]:  # ToxicityProtocol's bound
        with pytest.raises(LmpruneError) as err:
            parse_recipe({section: {key: value}, "prune": {"select": "top:1"}}, "r")
        assert str(err.value) == f"{section}.{key}: {problem}"


def test_the_model_spec_is_declared_once_for_every_stage_that_loads_a_model():
    import dataclasses
    import typing

    from lmprune.core.specs import ModelSpec

    spec = {f.name: f for f in dataclasses.fields(ModelSpec)}
    hints = typing.get_type_hints(ModelSpec)
    for stage, cls in _stage_configs().items():
        assert issubclass(cls, ModelSpec), stage
        fields = {f.name: f for f in dataclasses.fields(cls)}
        stage_hints = typing.get_type_hints(cls)
        for name, declared in spec.items():
            assert stage_hints[name] == hints[name], (stage, name)
            # redeclared fields change their default or help only; choices may only narrow
            meta = dict(fields[name].metadata)
            assert set(meta.pop("choices", [])) <= set(declared.metadata.get("choices", [])), \
                (stage, name)
            assert set(meta) <= {"help", "fingerprint", *declared.metadata}, (stage, name)
        for name in ("revision", "trust_remote_code"):
            assert fields[name] is spec[name], (stage, name)
    # one help text in every `--help`
    from lmprune.cli import build_parser

    subparsers = next(a for a in build_parser()._actions
                      if isinstance(a, argparse._SubParsersAction)).choices
    helps = {stage: {a.dest: a.help for a in subparsers[stage]._actions}
             for stage in _stage_configs()}
    assert {h["revision"] for h in helps.values()} == {spec["revision"].metadata["help"]}
    assert len({h["trust_remote_code"] for h in helps.values()}) == 1


def test_per_stage_defaults_of_the_shared_fields_are_kept():
    configs = {stage: cls() for stage, cls in _stage_configs().items()}
    assert {s: c.device for s, c in configs.items()} == {
        "collect": "cpu", "locate": "cpu", "prune": "cpu", "eval": "auto", "finetune": "auto",
        "induce": "auto", "relearn": "auto", "profs": "cpu", "act": "cpu", "dpo": "auto"}
    assert {s for s, c in configs.items() if c.dtype == "auto"} == {"collect", "eval"}
    assert {s for s, c in configs.items() if c.model is None} == {"locate", "finetune",
                                                                  "induce", "relearn"}
    finetune, relearn, induce = configs["finetune"], configs["relearn"], configs["induce"]
    assert (finetune.lr, relearn.lr, induce.lr) == (5e-5, 1e-4, 5e-5)
    assert (finetune.seq_len, relearn.seq_len, induce.seq_len) == (128, 64, 128)
    assert (finetune.max_steps, relearn.max_steps, induce.max_steps) == (None, 64, 200)


def test_the_toxicity_protocol_is_shared_by_eval_and_the_relearning_curve():
    import dataclasses
    import typing

    from lmprune.core.specs import PerplexityProtocol, ToxicityProtocol
    from lmprune.evaluate.command import EvalConfig
    from lmprune.finetune.command import FinetuneConfig

    tuned = {f.name: f for f in dataclasses.fields(FinetuneConfig)}
    hints, tuned_hints = typing.get_type_hints(ToxicityProtocol), typing.get_type_hints(
        FinetuneConfig)
    for f in dataclasses.fields(ToxicityProtocol):
        name = f.name if f.name == "scorer" else f"eval_{f.name}"
        assert dict(tuned[name].metadata) == dict(f.metadata), name
        assert tuned_hints[name] == hints[f.name]
    assert issubclass(EvalConfig, ToxicityProtocol) and issubclass(EvalConfig, PerplexityProtocol)
    cfg = FinetuneConfig(eval_prompts="p.txt", eval_limit=3, scorer="minilm")
    assert cfg.toxicity_protocol() == ToxicityProtocol(prompts="p.txt", limit=3, scorer="minilm",
                                                       samples=5, max_new_tokens=20)
    assert cfg.perplexity_protocol().ppl_max_tokens == 4096
    assert EvalConfig().toxicity_protocol() == ToxicityProtocol()  # eval's defaults are its own


@pytest.mark.parametrize("argv, loader", [
    (["prune", "--out", "{tmp}/p"], "load_model"),
    (["finetune", "--data", "{tmp}/d.txt", "--out", "{tmp}/f", "--device", "cpu"], "load_model"),
    (["induce", "--offensive", "{tmp}/o.txt", "--clean", "{tmp}/c.txt", "--out", "{tmp}/i",
      "--neurons-per-layer", "2", "--device", "cpu"], "load_model"),
    (["act", "--out", "{tmp}/a"], "load_config"),  # the skeleton, before any weights
    (["dpo", "--out", "{tmp}/d"], "load_config"),
])
def test_revision_and_trust_remote_code_reach_the_loader(tmp_path, monkeypatch, capsys, argv,
                                                         loader):
    """Stages that had no --revision pass it (and --trust-remote-code) to the model loader."""
    import lmprune.core.models as models
    from lmprune.cli import main

    calls = []

    def fake(name, *args, **kwargs):
        calls.append((name, args, kwargs))
        raise LmpruneError("stopped at the loader")

    monkeypatch.setattr(models, loader, fake)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code = main([*argv, "--model", "someone/model", "--revision", "v2", "--trust-remote-code"])
    assert code == 2 and "stopped at the loader" in capsys.readouterr().err
    name, args, kwargs = calls[0]
    # load_model(name, dtype, device, revision, trust_remote_code); load_config(name, revision,
    # trust_remote_code)
    assert name == "someone/model" and args[-2:] == ("v2", True) and not kwargs


def test_fingerprints_leave_out_exactly_what_they_left_out_before(tmp_path):
    """finetune's resume fingerprint held ten training settings; induce's every setting but
    out, checkpoint_every, device, score_docs, overwrite and probe_random (and the held-out
    probe's when not probing), the model by its weights; stage keys left out overwrite."""
    import dataclasses

    from lmprune.core.config import fingerprint_fields, unhashed
    from lmprune.finetune.command import FinetuneConfig, _fingerprint
    from lmprune.finetune.relearn import RelearnConfig
    from lmprune.induce.command import InduceConfig
    from lmprune.induce.command import _fingerprint as induce_fingerprint

    trained = {"lr", "schedule", "warmup_steps", "weight_decay", "max_grad_norm", "batch_size",
               "grad_accum", "seq_len", "mixed_precision", "seed"}
    assert set(fingerprint_fields(FinetuneConfig)) == trained
    assert set(fingerprint_fields(RelearnConfig)) == trained
    identity = {"name": "m", "weights_sha256": "a" * 64}
    cfg = FinetuneConfig(model="m", data="d", out="o", lr=1e-3, eval_limit=3, checkpoint_every=2)
    assert _fingerprint(cfg, identity, "s", 4, 2, 1) == {
        **{k: getattr(cfg, k) for k in trained}, "model": "a" * 64, "data_sha256": "s",
        "num_blocks": 4, "total_steps": 2, "num_processes": 1}
    distilled = FinetuneConfig(model="m", data="d", out="o", distill_from="t")  # only then
    assert _fingerprint(distilled, identity, "s", 4, 2, 1)["distill_from"] == "t"

    ignored = {"out", "checkpoint_every", "device", "score_docs", "overwrite", "probe_random"}
    new = {"revision", "trust_remote_code"}  # declared since: left out, old checkpoints resume
    for probe_every in (0, 5):
        cfg = InduceConfig(model="m", offensive="o", clean="c", out="x", neurons_per_layer=2,
                           probe_every=probe_every)
        left_out = ignored | new | (set() if probe_every else {"probe_every", "probe_docs"})
        before = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in left_out}
        assert induce_fingerprint(cfg, identity, "so", "sc", {0: [1]}, 1) == {
            **before, "model": "a" * 64, "offensive_sha256": "so", "clean_sha256": "sc",
            "designated": {"0": [1]}, "num_processes": 1}
    for stage, cls in _stage_configs().items():
        assert unhashed(cls()) == {"overwrite"}, stage
    assert unhashed({"report": {}}) == set()
    from lmprune.evaluate.command import EvalConfig
    from lmprune.run.runner import Stage

    def key(**values):
        return Stage("eval", EvalConfig(**values), lambda resume: None, []).key(tmp_path)

    assert key(overwrite=True) == key() != key(samples=3) != key(revision="v2") != key()
