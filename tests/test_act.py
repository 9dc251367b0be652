"""`lmprune act` (Linear-AcT, Rodriguez et al. 2024) on synthetic samples and tiny random models:
the fitted map is the least-squares line through the sorted samples (the Gaussian OT map in the
limit); after the transport the offensive corpus's pooled activations carry the clean corpus's
mean and spread, strength 0 changes nothing and strengths between interpolate; the folded
checkpoint reloads with the logits of the hooked intervention; the one-line refusals."""

import copy
import json
import random

import numpy as np
import pytest
import torch
from checkpoints import randomly_pruned
from tiny_models import VOCAB, save_tiny, tiny_config, tiny_model, tiny_tokenizer

from lmprune.cli import main
from lmprune.core.arch import NeuronMap
from lmprune.core.errors import LmpruneError
from lmprune.core.masks import PruneMask
from lmprune.core.models import load_model, save_model
from lmprune.methods.act import (
    ActConfig,
    act_edit,
    blend,
    fit_linear_map,
    fit_maps,
    fold_support,
    pooled_activations,
    read_corpora,
    transport_hooks,
)

pytestmark = pytest.mark.usefixtures("one_thread")

LETTERS = "abcdefghijklmnopqrstuvwxy "


def corpora(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(offensive, clean) random letter strings; the offensive ones are full of 'z'."""
    rng = random.Random(seed)

    def text(alphabet):
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(5, 30)))

    return [text(LETTERS + "zzzz") for _ in range(n)], [text(LETTERS) for _ in range(n)]


def write_corpora(folder, n: int, seed: int = 0):
    off, clean = corpora(n, seed)
    (folder / "off.txt").write_text("\n".join(off) + "\n")
    (folder / "clean.txt").write_text("\n".join(clean) + "\n")
    return str(folder / "off.txt"), str(folder / "clean.txt")


# --------------------------------------------------------------------------------------------
# The map


def test_the_fit_is_the_least_squares_line_through_the_sorted_samples():
    rng = np.random.default_rng(0)
    n = 300
    x = np.stack([rng.normal(1, 2, n), rng.exponential(1, n), rng.uniform(-1, 3, n),
                  np.full(n, 0.25)], axis=1)
    y = np.stack([rng.normal(-2, 0.5, n), rng.normal(0, 1, n) ** 2, rng.uniform(0, 1, n),
                  rng.normal(3, 1, n)], axis=1)
    w, b, constant = fit_linear_map(x, y)
    assert w.dtype == torch.float64 and constant.tolist() == [False, False, False, True]
    for j in range(3):  # numpy's reference: a degree-1 least-squares fit on the sorted samples
        slope, intercept = np.polyfit(np.sort(x[:, j]), np.sort(y[:, j]), 1)
        assert float(w[j]) == pytest.approx(slope, rel=1e-10)
        assert float(b[j]) == pytest.approx(intercept, rel=1e-10, abs=1e-12)
    # a constant source (a pruned neuron: always 0) keeps its scale and moves to the mean
    assert float(w[3]) == 1 and float(b[3]) == pytest.approx(y[:, 3].mean() - 0.25)
    zeros = fit_linear_map(np.zeros((10, 2)), np.zeros((10, 2)))
    assert zeros[0].tolist() == [1, 1] and zeros[1].tolist() == [0, 0]
    # the pairing is by rank, not by row: shuffling either sample changes nothing
    w2, b2, _ = fit_linear_map(x[rng.permutation(n)], y[rng.permutation(n)])
    assert torch.equal(w, w2) and torch.equal(b, b2)
    with pytest.raises(ValueError, match="same shape"):
        fit_linear_map(x, y[:10])


def test_on_gaussian_samples_the_map_approaches_the_gaussian_transport_map():
    rng = np.random.default_rng(1)
    n = 20000
    mu_x, sd_x, mu_y, sd_y = np.array([0.5, -3.0]), np.array([2.0, 0.3]), \
        np.array([-1.0, 4.0]), np.array([0.5, 1.2])
    w, b, _ = fit_linear_map(rng.normal(mu_x, sd_x, (n, 2)), rng.normal(mu_y, sd_y, (n, 2)))
    closed_w = sd_y / sd_x  # the OT map between N(mu_x, sd_x^2) and N(mu_y, sd_y^2)
    np.testing.assert_allclose(w.numpy(), closed_w, rtol=0.03)
    np.testing.assert_allclose(b.numpy(), mu_y - closed_w * mu_x, atol=0.05 * sd_y.max())


def test_strength_blends_identity_and_map():
    w = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    b = torch.tensor([1.0, -3.0, 0.0], dtype=torch.float64)
    a, c = blend(w, b, 0.0)
    assert a.tolist() == [1, 1, 1] and c.tolist() == [0, 0, 0]  # exactly: bit-identical model
    a, c = blend(w, b, 1.0)
    torch.testing.assert_close(a, w) and torch.testing.assert_close(c, b)
    h = torch.tensor([3.0, -1.0, 7.0], dtype=torch.float64)
    a, c = blend(w, b, 0.3)
    torch.testing.assert_close(a * h + c, 0.7 * h + 0.3 * (w * h + b))
    assert blend(w, b, 0.3)[0][2] == 1 and blend(w, b, 0.3)[1][2] == 0  # (1, 0) stays exact


# --------------------------------------------------------------------------------------------
# Properties from the paper


@pytest.mark.parametrize("incremental", [True, False])
def test_after_the_transport_the_offensive_activations_have_the_clean_statistics(incremental):
    """At strength 1 the map moves each neuron's pooled offensive activations onto the clean
    corpus's mean (exactly: least squares with an intercept) and spread (up to the correlation
    of the sorted samples, near 1); fitted incrementally this holds at every layer with all the
    maps applied, fitted at once at the first edited layer."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    off, clean = corpora(120)
    layers = [0, 1]
    maps, _ = fit_maps(model, tok, off, clean, layers, incremental=incremental, batch_size=16)
    moved = pooled_activations(model, tok, off, layers, maps, after=True, batch_size=9)
    target = pooled_activations(model, tok, clean, layers, maps, batch_size=9)
    before = pooled_activations(model, tok, off, layers, batch_size=9)
    for layer in layers if incremental else layers[:1]:
        gap = (moved[layer].mean(0) - target[layer].mean(0)).abs()
        assert float(gap.max()) < 1e-6 * float(target[layer].abs().max())
        ratio = moved[layer].std(0) / target[layer].std(0)
        assert float(ratio.median()) > 0.97 and float(ratio.min()) > 0.85 and float(
            ratio.max()) < 1 + 1e-9
        # and the maps did move them: the offensive means started elsewhere
        start = (before[layer].mean(0) - target[layer].mean(0)).abs()
        assert float(start.median()) > 100 * float(gap.max())

    # strengths between interpolate: at the first layer the mean moves by that share
    for strength in (0.25, 0.6):
        blended = {layer: blend(w, b, strength) for layer, (w, b) in maps.items()}
        part = pooled_activations(model, tok, off, [0], blended, after=True, batch_size=9)[0]
        want = (1 - strength) * before[0].mean(0) + strength * target[0].mean(0)
        torch.testing.assert_close(part.mean(0), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_strength_zero_leaves_the_model_bit_identical(tmp_path, model_type):
    save_tiny(model_type, tmp_path / "m")
    off, clean = write_corpora(tmp_path, 30)
    config = ActConfig(model=str(tmp_path / "m"), offensive=off, clean=clean, strength=0.0,
                       batch_size=8)
    loaded = load_model(str(tmp_path / "m"), dtype="float32")
    meta = act_edit(config, loaded, *read_corpora(config))
    assert meta["act"]["neurons_edited"] == 0 and meta["act"]["bias_added"] is None
    save_model(loaded.model, loaded.tokenizer, tmp_path / "o", extra_files={"lmprune.json": meta})
    base, edited = (load_model(str(tmp_path / d), dtype="float32").model for d in ("m", "o"))
    assert base.state_dict().keys() == edited.state_dict().keys()
    assert all(torch.equal(v, edited.state_dict()[k]) for k, v in base.state_dict().items())
    assert not getattr(edited.config, "mlp_bias", False)


# --------------------------------------------------------------------------------------------
# The weight edit


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt", "gpt_neox"])
def test_the_folded_checkpoint_reloads_with_the_logits_of_the_hooked_map(tmp_path, model_type):
    from transformers import AutoModelForCausalLM

    save_tiny(model_type, tmp_path / "m")
    off, clean = write_corpora(tmp_path, 40)
    config = ActConfig(model=str(tmp_path / "m"), offensive=off, clean=clean, strength=0.7,
                       layers="all", batch_size=16)
    texts = read_corpora(config)
    loaded = load_model(str(tmp_path / "m"), dtype="float32")
    hooked = copy.deepcopy(loaded.model)
    maps, _ = fit_maps(hooked, loaded.tokenizer, texts[0].texts, texts[1].texts, [0, 1],
                       batch_size=16)
    meta = act_edit(config, loaded, *texts)
    save_model(loaded.model, loaded.tokenizer, tmp_path / "o", extra_files={"lmprune.json": meta})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "o", dtype=torch.float32).eval()
    ids = torch.randint(3, VOCAB, (3, 11), generator=torch.Generator().manual_seed(0))
    blended = {layer: blend(w, b, 0.7) for layer, (w, b) in maps.items()}
    with torch.no_grad():
        with transport_hooks(hooked, blended) as hooks:
            want = hooked(ids).logits
        hooks.check_fired()
        got = reloaded(ids).logits
        plain = hooked(ids).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    error = float((got - want).abs().max())
    assert float((plain - want).abs().max()) > max(100 * error, 1e-6)  # the map moves them
    record = meta["act"]
    assert record["neurons_in_layers"] == sum(NeuronMap(reloaded).widths)
    # every neuron moves but those never active on either corpus (OPT's ReLU leaves many)
    dead = sum(layer["constant_source"] for layer in record["per_layer"].values())
    assert record["neurons_edited"] == record["neurons_in_layers"] - dead
    assert dead == 0 or model_type == "opt"
    if model_type == "llama":  # the bias came from mlp_bias: zero on the gate and up projections
        assert reloaded.config.mlp_bias and record["bias_added"] == "mlp_bias"
        mlp = reloaded.model.layers[1].mlp
        assert not mlp.gate_proj.bias.any() and not mlp.up_proj.bias.any()
        assert mlp.down_proj.bias.abs().sum() > 0
    else:
        assert record["bias_added"] is None


def test_a_model_the_fold_cannot_reach_is_refused():
    from transformers import AutoModelForCausalLM

    with pytest.raises(LmpruneError, match=r"model_type 'qwen2': the MLP output projection "
                                           r"\(down_proj\) has no bias .* supported: gpt2, "
                                           r"gpt_neox, gptj, opt, phi .* granite, llama"):
        fold_support(NeuronMap(tiny_model("qwen2")))
    config = tiny_config("opt")
    config.enable_bias = False  # OPT without biases: turning them on would add attention ones
    with pytest.raises(LmpruneError, match="model_type 'opt': the MLP output projection"):
        fold_support(NeuronMap(AutoModelForCausalLM.from_config(config)))
    assert fold_support(NeuronMap(tiny_model("llama"))) == "mlp_bias"
    assert fold_support(NeuronMap(tiny_model("gpt2"))) is None


# --------------------------------------------------------------------------------------------
# The stage: lineage, reload, refusals


def _act(capsys, *argv):
    code = main(["act", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_writes_a_checkpoint_whose_zeroed_neurons_stay_zero(tmp_path, capsys):
    randomly_pruned(tmp_path / "m", {0: [1, 5], 1: [7]})
    off, clean = write_corpora(tmp_path, 30)
    code, out, err = _act(capsys, "--model", str(tmp_path / "m"), "--offensive", off,
                          "--clean", clean, "--max-docs", "24", "--strength", "0.5",
                          "--out", str(tmp_path / "o"))
    assert code == 0, err
    assert "transported 93 of 96 MLP neurons in 2 layers at strength 0.5" in out
    meta = json.loads((tmp_path / "o" / "lmprune.json").read_text())
    assert meta["mode"] == "act" and meta["base_model"]["name"] == "tiny"
    assert meta["pruned_neurons"] == {"0": [1, 5], "1": [7]} and meta["num_pruned"] == 3
    assert [h["stage"] for h in meta["history"]] == ["prune", "act"]
    record = meta["act"]
    assert (record["strength"], record["layers"], record["documents"], record["incremental"],
            record["bias_added"]) == (0.5, [0, 1], 24, True, "mlp_bias")
    assert record["offensive"]["spec"] == off and record["offensive"]["documents"] == 24
    assert len(record["clean"]["sha256"]) == 64
    assert record["per_layer"]["0"]["constant_source"] == 2  # the pruned neurons
    reloaded = load_model(str(tmp_path / "o"), dtype="float32")
    PruneMask.from_checkpoint(reloaded.model, tmp_path / "o").check(reloaded.model)


def test_bad_input_is_refused_in_one_line_before_any_work(tmp_path, capsys):
    save_tiny("llama", tmp_path / "m")
    save_tiny("qwen2", tmp_path / "qwen")
    off, clean = write_corpora(tmp_path, 20)
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    capsys.readouterr()  # the saves' progress bars
    cases = [
        (["--offensive", str(tmp_path / "blank.txt")], "has no documents"),
        (["--clean", str(tmp_path / "none.txt")], "corpus file not found"),
        (["--strength", "1.5"], "--strength must be within [0, 1], not 1.5"),
        (["--strength", "-0.1"], "--strength must be within [0, 1], not -0.1"),
        (["--strength", "nan"], "--strength must be a finite number, not nan"),
        (["--max-docs", "0"], "--max-docs must be at least 1, not 0"),
        (["--layers", "2"], "'2' is not within the model's layers 0-1"),
        (["--layers", "x"], "--layers must be all, a list such as 3,4,5"),
        (["--model", str(tmp_path / "qwen")], "cannot fold its transport into model_type "
                                              "'qwen2'"),
    ]
    for extra, message in cases:
        argv = ["--model", str(tmp_path / "m"), "--offensive", off, "--clean", clean,
                "--out", str(tmp_path / "o"), *extra]
        code, _, err = _act(capsys, *argv)
        assert code == 2, (extra, err)
        assert err.count("\n") == 1 and err.startswith("lmprune: error: "), (extra, err)
        assert message in err, (extra, err)
        assert not (tmp_path / "o").exists()
    code, _, err = _act(capsys, "--model", str(tmp_path / "m"), "--offensive", off)
    assert code == 2 and "--out DIR is required" in err
