"""Induce: gradient routing puts the offensive data's updates into the designated neurons only
(exactly, under AdamW), ablating them afterwards removes what was routed there (more than any of
20 random same-size sets), the output prunes with `lmprune prune`, and a killed run resumes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from tiny_models import random_batch, save_tiny, tiny_model, tiny_tokenizer

from lmprune.cli import main
from lmprune.core.ablation import CausalScorer, TokenBatches, random_control_sets
from lmprune.core.arch import parse_layers
from lmprune.core.errors import LmpruneError
from lmprune.core.masks import PruneMask
from lmprune.core.models import load_model
from lmprune.core.training import make_optimizer, make_scheduler
from lmprune.induce.command import (
    InduceConfig,
    Pass,
    RoutedData,
    draw_neurons,
    induce,
    masked_mean_nll,
    routed_step,
)
from lmprune.prune.command import random_like

ROOT = Path(__file__).resolve().parents[1]
DESIGNATED = {0: [1, 4, 9, 17], 1: [0, 2, 30]}
# Offensive documents: words over their own letters with the marker 'xq'; clean: other letters.
OFFENSIVE_LETTERS, CLEAN_LETTERS = "jkvwz", "abcdefghilmnoprstu"

pytestmark = pytest.mark.usefixtures("one_thread")


def _documents(seed: int, count: int, letters: str, marker: str = "") -> list[str]:
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(count):
        words = ["".join(rng.choice(list(letters), size=rng.integers(2, 5))) for _ in range(6)]
        docs.append(" ".join(f"{w} {marker}" if marker and rng.random() < 0.6 else w
                             for w in words))
    return docs


def _offensive(seed, count):
    return _documents(seed, count, OFFENSIVE_LETTERS, "xq")


def _clean(seed, count):
    return _documents(seed, count, CLEAN_LETTERS)


def _pass(seed, rows, counted=None):
    ids = random_batch(rows, 12, seed=seed)
    return Pass(ids, torch.ones(rows, 11, dtype=torch.bool) if counted is None else counted)


# --------------------------------------------------------------------------------------------
# The region


def test_layers_spec_and_drawn_neurons():
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("1,3", 4) == [1, 3]
    assert parse_layers("0-2", 4) == [0, 1, 2]
    assert parse_layers("3, 0-1", 4) == [0, 1, 3]
    for bad in ("4", "2-1", "x", "1-"):
        with pytest.raises(LmpruneError, match="--layers"):
            parse_layers(bad, 4)
    drawn = draw_neurons([48, 48, 48], [0, 2], 5, seed=3)
    assert sorted(drawn) == [0, 2] and all(len(v) == 5 for v in drawn.values())
    assert drawn == draw_neurons([48, 48, 48], [0, 2], 5, seed=3)
    assert drawn != draw_neurons([48, 48, 48], [0, 2], 5, seed=4)
    # the same seed must not make `prune --mode random --like` draw the designated set
    assert drawn != random_like(drawn, [48, 48, 48], seed=3)
    with pytest.raises(LmpruneError, match="between 1 and the layer width 48"):
        draw_neurons([48, 48], [0], 49, seed=0)


def test_routing_labels_by_example_token_and_labelled_share():
    tok = tiny_tokenizer()
    offensive = ["jk xq vw xq"] * 8 + ["zz xq jj"] * 8
    clean = ["abc def ghi"] * 16

    def build(**kw):
        values = dict(model="m", offensive="o", clean="c", out="x", neurons_per_layer=1,
                      seq_len=8, batch_size=4)
        return RoutedData.build(tok, offensive, clean, InduceConfig(**{**values, **kw}))

    data, record = build()
    assert data.routed.all() and not data.unrouted_offensive
    assert record["labelled_documents"] == 16
    off_pass, clean_pass = data.passes(0, 0, 1, "cpu")
    assert off_pass.ids.shape == (2, 8) and clean_pass.ids.shape == (2, 8)
    assert clean_pass.counted.all()

    data, record = build(route="token", toxic_tokens=2)
    marker = set(tok.convert_tokens_to_ids(["x", "q"]))
    assert set(record["toxic_token_ids"]) == marker
    routed_ids = set(data.offensive[data.routed].tolist())
    assert routed_ids == marker
    # offensive blocks join the clean pass with their unrouted tokens counted
    off_pass, clean_pass = data.passes(0, 0, 1, "cpu")
    assert clean_pass.ids.shape == (4, 8)
    assert torch.equal(clean_pass.counted[:2], ~off_pass.counted)

    data, record = build(labelled_fraction=0.25)
    assert record["labelled_documents"] == 4
    assert 0 < record["routed_tokens"] < data.offensive.numel() and data.unrouted_offensive


# --------------------------------------------------------------------------------------------
# The gradient check


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("clean_reaches", ["rest", "all"])
def test_each_region_moves_by_its_own_gradient(model_type, clean_reaches):
    """With plain SGD (lr 1) the update is minus the gradient: designated slices get exactly the
    routed loss's gradient (plus the clean one's in variant all), the rest the clean one's."""
    model = tiny_model(model_type)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    designated = PruneMask(model, DESIGNATED)
    counted = torch.rand(2, 11, generator=torch.Generator().manual_seed(0)) < 0.5
    offensive, clean = _pass(0, 2, counted), _pass(1, 3)
    g_off = torch.autograd.grad(masked_mean_nll(model, offensive)[0], list(model.parameters()))
    g_clean = torch.autograd.grad(masked_mean_nll(model, clean)[0], list(model.parameters()))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    routed_step(Accelerator(cpu=True), model, optimizer,
                make_scheduler(optimizer, "constant", 0, 1), designated, clean_reaches,
                offensive, clean, max_grad_norm=0.0)
    masks = designated.as_tensors(model)
    for (name, param), off, cln in zip(model.named_parameters(), g_off, g_clean, strict=True):
        mask = masks.get(name, torch.zeros_like(param, dtype=torch.bool))
        on_designated = off + cln if clean_reaches == "all" else off
        want = start[name] - torch.where(mask, on_designated, cln)
        torch.testing.assert_close(param.detach(), want, rtol=1e-5, atol=1e-6, msg=name)


def _adamw_setup(clean_reaches):
    model = tiny_model("llama")
    designated = PruneMask(model, DESIGNATED)
    optimizer = make_optimizer(model, 1e-2, 0.1)
    scheduler = make_scheduler(optimizer, "constant", 0, 20)
    accelerator = Accelerator(cpu=True)

    def step(offensive, clean):
        routed_step(accelerator, model, optimizer, scheduler, designated, clean_reaches,
                    offensive, clean, max_grad_norm=1.0)
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    for seed in range(2):  # mixed steps first: every moment is non-zero afterwards
        step(_pass(10 + seed, 2), _pass(20 + seed, 2))
    return model, designated, optimizer, step


def test_adamw_clean_steps_leave_designated_slices_bit_identical():
    model, designated, optimizer, step = _adamw_setup("rest")
    masks = designated.as_tensors(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    moments = {n: optimizer.state[model.get_parameter(n)]["exp_avg"].clone() for n in masks}
    after = step(None, _pass(30, 3))
    for name, mask in masks.items():
        assert torch.equal(after[name][mask], before[name][mask]), name
        assert torch.equal(optimizer.state[model.get_parameter(name)]["exp_avg"][mask],
                           moments[name][mask]), name
        assert (after[name] != before[name])[~mask].float().mean() > 0.9, name
    assert not torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])


def test_adamw_offensive_steps_leave_everything_else_bit_identical():
    model, designated, optimizer, step = _adamw_setup("rest")
    masks = designated.as_tensors(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    after = step(_pass(40, 3), None)
    for name in before:
        mask = masks.get(name, torch.zeros_like(before[name], dtype=torch.bool))
        assert torch.equal(after[name][~mask], before[name][~mask]), name
        if name in masks:
            assert (after[name] != before[name])[mask].float().mean() > 0.9, name
    # unlabelled offensive text (nothing counted as routed) moves nothing at all
    after_unlabelled = step(Pass(random_batch(2, 12, seed=41),
                                 torch.zeros(2, 11, dtype=torch.bool)), None)
    assert all(torch.equal(after_unlabelled[n], after[n]) for n in after)


def test_adamw_variant_all_lets_clean_steps_move_designated_slices():
    model, designated, _, step = _adamw_setup("all")
    masks = designated.as_tensors(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    after = step(None, _pass(30, 3))
    for name, mask in masks.items():
        assert (after[name] != before[name])[mask].float().mean() > 0.9, name


# --------------------------------------------------------------------------------------------
# The whole stage on a tiny llama


@pytest.fixture(scope="module")
def induced(tmp_path_factory):
    """A tiny llama trained with routing through the CLI: 8 designated neurons per layer."""
    root = tmp_path_factory.mktemp("induce")
    save_tiny("llama", root / "base")
    (root / "off.txt").write_text("\n".join(_offensive(0, 200)))
    (root / "clean.txt").write_text("\n".join(_clean(1, 200)))
    threads = torch.get_num_threads()  # module fixtures start before `one_thread`
    torch.set_num_threads(1)
    code = main(["induce", "--model", str(root / "base"), "--offensive", str(root / "off.txt"),
                 "--clean", str(root / "clean.txt"), "--out", str(root / "out"),
                 "--neurons-per-layer", "8", "--max-steps", "150", "--lr", "3e-3",
                 "--warmup-steps", "5", "--batch-size", "8", "--seq-len", "32",
                 "--score-docs", "16", "--probe-every", "50", "--probe-docs", "32",
                 "--probe-random", "4", "--device", "cpu"])
    torch.set_num_threads(threads)
    assert code == 0
    return root


def test_ablating_the_induced_module_removes_the_offensive_text(induced):
    out = induced / "out"
    meta = json.loads((out / "lmprune.json").read_text())
    designated = {int(k): v for k, v in meta["designated_neurons"].items()}
    assert meta["pruned_neurons"] == {} and meta["mode"] == "induced"
    assert sorted(designated) == [0, 1] and all(len(v) == 8 for v in designated.values())
    record = meta["induce"]
    assert record["steps"] == 150 and record["corpora"]["offensive"]["documents"] == 200
    assert record["corpora"]["clean"]["sha256"] and meta["history"][-1]["stage"] == "induce"

    loaded = load_model(str(out))
    scorer = CausalScorer(
        loaded.model,
        TokenBatches.build(loaded.tokenizer, _offensive(2, 40), 64, 16, "cpu"),
        TokenBatches.build(loaded.tokenizer, _clean(3, 40), 64, 16, "cpu"))
    effect = scorer.effect(designated)
    assert effect["loss_delta_offensive"] > 3 * effect["loss_delta_clean"] > 0, effect
    controls = random_control_sets(designated, [48, 48], 20, np.random.default_rng(0))
    control_effects = [scorer.effect(c)["causal"] for c in controls]
    assert effect["causal"] > max(control_effects), (effect, control_effects)

    mmap = json.loads((out / "modules.json").read_text())
    (module,) = mmap["modules"]
    assert module["id"] == 0 and module["size"] == 16
    assert module["scores"]["causal"] > 0  # measured on training documents


def test_the_probe_measures_held_out_documents_as_routing_proceeds(induced):
    """probe.json: before routing, every 50 steps and at the end; its last point is what
    ablating the designated set and the random sets does to the saved model's loss on the last
    32 documents of each file (held out of training)."""
    out = induced / "out"
    probe = json.loads((out / "probe.json").read_text())
    curve = probe["curve"]
    assert [p["step"] for p in curve] == [0, 50, 100, 150]
    assert probe["held_out_documents"] == 32 and all(len(p["random"]) == 4 for p in curve)
    meta = json.loads((out / "lmprune.json").read_text())
    assert meta["induce"]["probe"]["last"] == curve[-1]
    assert (out / "probe.png").stat().st_size > 0

    loaded = load_model(str(out))
    held_out = [(induced / name).read_text().splitlines()[-32:] for name in ("off.txt",
                                                                            "clean.txt")]
    scorer = CausalScorer(loaded.model, *(TokenBatches.build(loaded.tokenizer, texts, 32, 8,
                                                             "cpu") for texts in held_out))
    designated = {int(k): v for k, v in meta["designated_neurons"].items()}
    want = scorer.effect(designated)
    for key, value in curve[-1]["designated"].items():
        assert value == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    # routing built the module: on unseen text it now carries the offensive loss, unlike the
    # random sets (it did not before)
    assert curve[0]["control_percentile"] < 1.0 or curve[0]["designated"]["causal"] < 0.05
    assert curve[-1]["control_percentile"] == 1.0
    assert curve[-1]["designated"]["causal"] > 10 * max(curve[0]["designated"]["causal"], 0.01)


def test_prune_commands_take_the_induced_module_and_a_random_control(induced, tmp_path):
    out, modules = induced / "out", str(induced / "out" / "modules.json")
    designated = json.loads((out / "lmprune.json").read_text())["designated_neurons"]
    assert main(["prune", "--model", str(out), "--mode", "modules", "--modules", modules,
                 "--select", "ids:0", "--out", str(tmp_path / "pruned")]) == 0
    assert main(["prune", "--model", str(out), "--mode", "random", "--like", modules,
                 "--select", "ids:0", "--seed", "0", "--out", str(tmp_path / "control")]) == 0
    pruned = json.loads((tmp_path / "pruned" / "lmprune.json").read_text())
    control = json.loads((tmp_path / "control" / "lmprune.json").read_text())
    assert pruned["pruned_neurons"] == designated
    assert pruned["history"][0]["stage"] == "induce"
    assert {k: len(v) for k, v in control["pruned_neurons"].items()} == \
        {k: len(v) for k, v in designated.items()}
    assert control["pruned_neurons"] != designated
    for folder in ("pruned", "control"):
        model = load_model(str(tmp_path / folder)).model
        mask = PruneMask.from_checkpoint(model, tmp_path / folder)
        assert mask.num_neurons == 16 and mask.nonzero_count(model) == 0


def test_a_module_of_a_map_is_grown(induced, tmp_path):
    """--module PATH:ID designates exactly that module's members."""
    modules = induced / "out" / "modules.json"
    out = induce(InduceConfig(model=str(induced / "out"), offensive=str(induced / "off.txt"),
                              clean=str(induced / "clean.txt"), out=str(tmp_path / "grown"),
                              module=f"{modules}:0", max_steps=2, seq_len=32, max_docs=20,
                              device="cpu"))
    meta = json.loads((out / "lmprune.json").read_text())
    first = json.loads((induced / "out" / "lmprune.json").read_text())
    assert meta["designated_neurons"] == first["designated_neurons"]
    assert meta["induce"]["region"]["module"]["id"] == 0


def test_bad_input_is_refused(induced, tmp_path):
    base = dict(model=str(induced / "base"), offensive=str(induced / "off.txt"),
                clean=str(induced / "clean.txt"), out=str(tmp_path / "o"), max_steps=1,
                seq_len=32, device="cpu")
    (tmp_path / "empty.txt").write_text("\n\n")
    other = json.loads((induced / "out" / "modules.json").read_text())
    other["model"]["num_layers"] = 5
    (tmp_path / "other.json").write_text(json.dumps(other))
    cases = [
        (dict(neurons_per_layer=4, offensive=str(tmp_path / "empty.txt")), "no documents"),
        (dict(neurons_per_layer=49), "between 1 and the layer width 48"),
        (dict(neurons_per_layer=4, layers="2"), "layers 0-1"),
        (dict(), "--neurons-per-layer N"),
        (dict(module=f"{tmp_path / 'other.json'}:0"), "made for 5 layers"),
        (dict(model=str(induced / "out"), module=f"{induced / 'out' / 'modules.json'}:7"),
         "module 7 is not in"),
        (dict(module="modules.json"), "PATH/modules.json:ID"),
        (dict(neurons_per_layer=4, labelled_fraction=1.5), r"within \[0, 1\], not 1.5"),
        (dict(neurons_per_layer=4, probe_every=5, probe_docs=200), "holds out --probe-docs 200"),
        (dict(neurons_per_layer=4, probe_every=5, probe_random=1), "--probe-random must be at"),
    ]
    for overrides, message in cases:
        with pytest.raises(LmpruneError, match=message):
            induce(InduceConfig(**{**base, **overrides}))


# --------------------------------------------------------------------------------------------
# Resume

_RESUME = dict(neurons_per_layer=6, max_steps=200, checkpoint_every=20, batch_size=4,
               seq_len=32, lr=3e-3, weight_decay=0.1, warmup_steps=3, offensive_fraction=0.5,
               labelled_fraction=0.5, max_docs=80, probe_every=30, probe_docs=16,
               probe_random=2, device="cpu")
_RESUME_SCRIPT = f"""
import sys
from lmprune.induce.command import InduceConfig, induce

model, offensive, clean, out = sys.argv[1:]
induce(InduceConfig(model=model, offensive=offensive, clean=clean, out=out, **{_RESUME!r}))
"""


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(induced, tmp_path, capsys):
    """A tiny GPT-2 (dropout: the RNG state matters) killed with SIGKILL between checkpoints."""
    save_tiny("gpt2", tmp_path / "base")
    args = [str(tmp_path / "base"), str(induced / "off.txt"), str(induced / "clean.txt")]
    script = tmp_path / "train.py"
    script.write_text(_RESUME_SCRIPT)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
           "OMP_NUM_THREADS": "1"}
    killed = subprocess.Popen([sys.executable, str(script), *args, str(tmp_path / "run")],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000020"
    deadline = time.time() + 120
    while not checkpoint.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "run" / "lmprune.json").exists(), "killed too late: it had finished"

    def config(out):
        return InduceConfig(model=args[0], offensive=args[1], clean=args[2], out=str(out),
                            **_RESUME)

    induce(config(tmp_path / "run"))
    assert "resuming from" in capsys.readouterr().out
    reference = induce(config(tmp_path / "ref"))
    want = load_file(reference / "model.safetensors")
    got = load_file(tmp_path / "run" / "model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), f"{name} differs after resuming"
    # the probe's curve survives the kill: the points before it come from the checkpoint
    assert json.loads((tmp_path / "run" / "probe.json").read_text()) == \
        json.loads((reference / "probe.json").read_text())
    meta = json.loads((tmp_path / "run" / "lmprune.json").read_text())
    assert meta["induce"]["resumed_from"] is not None and meta["induce"]["resumed_from"] >= 20
    assert not (tmp_path / "run" / "checkpoints").exists()
