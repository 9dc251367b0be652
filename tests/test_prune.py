"""Pruning: each selection rule on hand-checked cases, the masks, saved checkpoints that reload
with identical logits, physical removal, and refusal of a module map made for another model."""

import copy
import json

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import (
    mean_token_nll,
    random_batch,
    save_tiny,
    tiny_model,
    tiny_tokenizer,
    zero_neurons,
)
from transformers import AutoModelForCausalLM

from lmprune.cli import main
from lmprune.core.arch import NeuronMap
from lmprune.core.errors import LmpruneError
from lmprune.core.hooks import NeuronHooks
from lmprune.core.masks import PruneMask
from lmprune.core.models import load_model
from lmprune.prune.command import (
    PruneConfig,
    aura_factors,
    make_gap_fn,
    parse_select,
    prune_model,
    rank_modules,
    remove_neurons,
    select_modules,
    selective_modules,
    top_auroc_neurons,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _module(mid, members, causal, **scores):
    return {"id": mid, "members": members, "size": len(members),
            "layers": sorted({m[0] for m in members}), "scores": {"causal": causal, **scores}}


# gpt2 tiny: 2 layers x 40 neurons = 80
MODULES = [
    _module(0, [[0, 1], [0, 2], [0, 3]], 0.10, auroc_mean=0.9),
    _module(1, [[1, 4], [1, 5], [1, 6], [1, 7], [1, 8]], 0.50, auroc_mean=0.6),
    _module(2, [[0, 10], [1, 10], [1, 11], [1, 12]], 0.30, auroc_mean=0.7),
    _module(3, [[0, 20], [0, 21]], 0.05, auroc_mean=0.8),
]


def _write_map(path, modules=MODULES, **model):
    payload = {"format": "lmprune.modules", "format_version": 1,
               "model": {"model_type": "gpt2", **model}, "modules": modules}
    path.write_text(json.dumps(payload))
    return path


def _ids(chosen):
    return [m["id"] for m in chosen]


def test_top_n_ranks_by_causal_score_or_another():
    ranked = rank_modules(MODULES, "causal")
    assert _ids(select_modules(ranked, parse_select("top:2"), 80)[0]) == [1, 2]
    by_auroc = rank_modules(MODULES, "auroc_mean")
    assert _ids(select_modules(by_auroc, parse_select("top:3"), 80)[0]) == [0, 3, 2]
    with pytest.raises(LmpruneError, match="no score 'output_toxicity'"):
        rank_modules(MODULES, "output_toxicity")


def test_budget_adds_modules_in_rank_order_until_the_budget():
    ranked = rank_modules(MODULES, "causal")  # sizes in rank order: 5, 4, 3, 2
    # 10% of 80 = 8 neurons: 5 fits, 5 + 4 = 9 would overshoot -> stop
    assert _ids(select_modules(ranked, parse_select("budget:10%"), 80)[0]) == [1]
    assert _ids(select_modules(ranked, parse_select("budget:12"), 80)[0]) == [1, 2, 0]
    assert _ids(select_modules(ranked, parse_select("budget:100%"), 80)[0]) == [1, 2, 0, 3]


def test_ids_selects_exactly_those_modules():
    ranked = rank_modules(MODULES, "causal")
    assert _ids(select_modules(ranked, parse_select("ids:3,0"), 80)[0]) == [0, 3]
    with pytest.raises(LmpruneError, match=r"ids \[9\]"):
        select_modules(ranked, parse_select("ids:0,9"), 80)


def test_min_selectivity_leaves_out_modules_that_move_every_loss():
    modules = copy.deepcopy(MODULES)
    for module, selectivity in zip(modules, [0.9, 0.2, 0.6, None], strict=True):
        if selectivity is not None:  # module 3 was not ablated exactly: it has none
            module["scores"]["selectivity"] = selectivity
    assert _ids(selective_modules(modules, 0.5)) == [0, 2]
    assert selective_modules(modules, None) == modules
    ranked = rank_modules(selective_modules(modules, 0.5), "causal")
    assert _ids(select_modules(ranked, parse_select("top:1"), 80)[0]) == [2]
    with pytest.raises(LmpruneError, match="selectivity >= 0.95"):
        selective_modules(modules, 0.95)


@pytest.mark.parametrize("spec", ["top:0", "budget:120%", "ids:a", "target:x", "best:3", "top"])
def test_bad_select_specs_are_refused(spec):
    with pytest.raises(LmpruneError, match="--select must be"):
        parse_select(spec)


def test_mean_token_nll_masks_padding():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    texts = ["a short one", "a much longer text with many more characters", "mid length!"]
    total, count = 0.0, 0
    for text in texts:  # one at a time: no padding at all
        ids = tok(text, return_tensors="pt")["input_ids"]
        logits = model(ids).logits[0, :-1]
        total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    assert mean_token_nll(model, tok, texts, batch_size=3) == pytest.approx(total / count, 1e-5)


def test_target_stops_at_the_first_prefix_whose_gap_reaches_x():
    model, tok = tiny_model("gpt2", seed=3), tiny_tokenizer()
    offensive = ["you are a stupid idiot!", "shut up, fool", "what a dumb thing to say"]
    clean = ["the weather is nice today", "we went to the park", "read a good book"]
    ranked = rank_modules(MODULES, "causal")

    def reference_gap(k):  # weights zeroed on a copy: the independent path
        pruned = copy.deepcopy(model)
        zero_neurons(pruned, _union(ranked[:k]))
        return ((mean_token_nll(pruned, tok, offensive) - mean_token_nll(model, tok, offensive))
                - (mean_token_nll(pruned, tok, clean) - mean_token_nll(model, tok, clean)))

    gaps = [reference_gap(k) for k in range(1, 5)]
    target = sorted(gaps)[2]
    expected = next(k for k, g in enumerate(gaps, 1) if g >= target)
    gap_fn = make_gap_fn(model, tok, offensive, clean)
    chosen, info = select_modules(ranked, parse_select(f"target:{target}"), 80, gap_fn)
    assert len(chosen) == expected and info["reached"]
    assert [t["gap"] for t in info["trace"]] == pytest.approx(gaps[:expected], abs=1e-5)
    unreachable = select_modules(ranked, parse_select("target:1000"), 80, gap_fn)
    assert len(unreachable[0]) == 4 and not unreachable[1]["reached"]


def _union(modules):
    out = {}
    for m in modules:
        for layer, j in m["members"]:
            out.setdefault(layer, set()).add(j)
    return {k: sorted(v) for k, v in out.items()}


def test_top_neurons_by_auroc_with_ties_in_index_order():
    auroc = torch.full((2, 5), 0.5)
    auroc[1, 3], auroc[0, 4], auroc[0, 1], auroc[1, 0] = 0.9, 0.8, 0.7, 0.7
    assert top_auroc_neurons(auroc, 3) == {0: [1, 4], 1: [3]}
    assert top_auroc_neurons(auroc, 4) == {0: [1, 4], 1: [0, 3]}
    with pytest.raises(LmpruneError, match="--count"):
        top_auroc_neurons(auroc, 11)


def _stats(folder, auroc, model_type="gpt2"):
    folder.mkdir()
    save_file({"auroc": auroc.float()}, folder / "stats.safetensors")
    (folder / "manifest.json").write_text(json.dumps({
        "format": "lmprune.stats", "model": {"model_type": model_type}, "corpora": {},
        "complete": True, "num_layers": auroc.shape[0], "neurons_per_layer": auroc.shape[1]}))
    return folder


def _loaded(tmp_path, model_type="gpt2", seed=0):
    save_tiny(model_type, tmp_path / "base", seed=seed)
    return load_model(str(tmp_path / "base"), dtype="float32")


def test_aura_factors_follow_the_published_rule():
    auroc = torch.tensor([[0.5, 0.75, 1.0, 0.3, 0.6]])
    assert aura_factors(auroc)[0].tolist() == pytest.approx([1.0, 0.5, 0.0, 1.0, 0.8])
    # strength alpha scales the cut (the frontier's knob); the factor stays within [0, 1]
    assert aura_factors(auroc, 0.5)[0].tolist() == pytest.approx([1.0, 0.75, 0.5, 1.0, 0.9])
    assert aura_factors(auroc, 2.0)[0].tolist() == pytest.approx([1.0, 0.0, 0.0, 1.0, 0.6])
    assert aura_factors(auroc, 0.0)[0].tolist() == pytest.approx([1.0] * 5)


def test_aura_strength_out_of_range_is_refused(tmp_path):
    loaded = _loaded(tmp_path)
    stats = str(_stats(tmp_path / "stats", torch.full((2, 40), 0.7)))
    for bad in (-0.1, 2.5, float("nan")):
        with pytest.raises(LmpruneError, match="--strength must be between 0 and 2"):
            prune_model(PruneConfig(mode="dampen", stats=stats, strength=bad), loaded)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_dampen_scales_the_output_column_like_aura_scales_activations(tmp_path, model_type):
    loaded = _loaded(tmp_path, model_type)
    nmap = NeuronMap(loaded.model)
    width = nmap.width(0)
    auroc = torch.rand((2, width), generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    auroc[1, 7] = 1.0  # factor 0: pruned outright
    factors = aura_factors(auroc)
    original = copy.deepcopy(loaded.model)
    ids = random_batch()
    with NeuronHooks(original, lambda layer, a: a * factors[layer]):  # AURA: scale activations
        expected = original(ids).logits
    config = PruneConfig(mode="dampen", stats=str(_stats(tmp_path / "stats", auroc, model_type)))
    meta = prune_model(config, loaded)
    torch.testing.assert_close(loaded.model(ids).logits, expected, atol=1e-5, rtol=1e-5)
    assert meta["pruned_neurons"] == {"1": [7]}
    recorded = meta["dampened_neurons"]
    assert set(recorded["0"]) == {str(j) for j in range(width) if auroc[0, j] > 0.5}
    for layer, row in recorded.items():
        for j, factor in row.items():
            assert factor == pytest.approx(float(factors[int(layer), int(j)]))


def test_neurons_mode_takes_k_from_count_or_from_the_module_selection(tmp_path):
    loaded = _loaded(tmp_path)
    auroc = torch.linspace(0, 1, 80).view(2, 40)  # highest: layer 1, last indices
    stats = str(_stats(tmp_path / "stats", auroc))
    meta = prune_model(PruneConfig(mode="neurons", stats=stats, count=3), loaded)
    assert meta["pruned_neurons"] == {"1": [37, 38, 39]}
    modules = str(_write_map(tmp_path / "modules.json"))
    meta = prune_model(PruneConfig(mode="neurons", stats=stats, modules=modules,
                                   select="top:1"), loaded)  # module 1 has 5 neurons
    assert meta["pruned_neurons"] == {"1": [35, 36, 37, 38, 39]}


def test_a_budget_below_the_best_module_is_refused_not_a_silent_no_op(tmp_path):
    loaded = _loaded(tmp_path)
    modules = str(_write_map(tmp_path / "modules.json"))  # best by causal: 5 neurons
    with pytest.raises(LmpruneError, match="chose no module"):
        prune_model(PruneConfig(modules=modules, select="budget:4"), loaded)


def test_random_control_copies_per_layer_counts_and_is_seeded(tmp_path):
    loaded = _loaded(tmp_path)
    modules = str(_write_map(tmp_path / "modules.json"))

    def draw(seed, **kw):
        return prune_model(PruneConfig(mode="random", modules=modules, seed=seed, **kw),
                           copy.deepcopy(loaded))["pruned_neurons"]

    first = draw(0, select="top:2")  # modules 1 and 2: layer 0 one neuron, layer 1 eight
    assert {k: len(v) for k, v in first.items()} == {"0": 1, "1": 8}
    assert draw(0, select="top:2") == first
    assert draw(1, select="top:2") != first
    # --like a pruned checkpoint: its per-layer counts
    assert main(["prune", "--model", str(tmp_path / "base"), "--modules", modules,
                 "--select", "ids:0,3", "--out", str(tmp_path / "ref")]) == 0
    like = prune_model(PruneConfig(mode="random", like=str(tmp_path / "ref")), loaded)
    assert {k: len(v) for k, v in like["pruned_neurons"].items()} == {"0": 5}


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "phi3", "opt"])
def test_saved_checkpoint_reloads_with_identical_logits(tmp_path, model_type):
    loaded = _loaded(tmp_path, model_type)
    modules = _union(rank_modules(MODULES, "causal")[:2])
    mmap = _write_map(tmp_path / "modules.json", model_type=model_type)
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(tmp_path / "base"), "--modules", str(mmap),
                 "--select", "top:2", "--out", str(out)]) == 0
    in_memory = copy.deepcopy(loaded.model)
    zero_neurons(in_memory, modules)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = random_batch()
    torch.testing.assert_close(reloaded(ids).logits, in_memory(ids).logits, rtol=0, atol=0)
    meta = json.loads((out / "lmprune.json").read_text())
    assert meta["pruned_neurons"] == {str(k): v for k, v in modules.items()}
    assert meta["mode"] == "modules" and meta["modules"]["ids"] == [1, 2]
    assert meta["base_model"]["model_type"] == model_type
    mask = PruneMask.from_checkpoint(reloaded, out)
    assert mask.num_neurons == 9 and mask.nonzero_count(reloaded) == 0
    masks = mask.as_tensors(reloaded)
    for name, pruned in masks.items():
        assert not reloaded.get_parameter(name)[pruned].any()
    assert any(reloaded.get_parameter(n)[~m].abs().sum() > 0 for n, m in masks.items())


def test_pruning_a_pruned_checkpoint_keeps_the_earlier_neurons(tmp_path):
    loaded = _loaded(tmp_path, "llama")
    mmap = str(_write_map(tmp_path / "modules.json", model_type="llama"))
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["prune", "--model", str(tmp_path / "base"), "--modules", mmap,
                 "--select", "ids:0", "--out", str(first)]) == 0
    assert main(["prune", "--model", str(first), "--modules", mmap,
                 "--select", "ids:3", "--out", str(second)]) == 0
    union = _union([MODULES[0], MODULES[3]])  # layer 0: 1, 2, 3, 20, 21
    meta = json.loads((second / "lmprune.json").read_text())
    assert meta["pruned_neurons"] == {str(k): v for k, v in union.items()}
    assert meta["num_pruned"] == 5
    assert [h["stage"] for h in meta["history"]] == ["prune", "prune"]
    reference = copy.deepcopy(loaded.model)
    zero_neurons(reference, union)
    reloaded = AutoModelForCausalLM.from_pretrained(second).eval()
    ids = random_batch()
    torch.testing.assert_close(reloaded(ids).logits, reference(ids).logits, rtol=0, atol=0)


def test_mask_zeroes_gradients_and_weights_of_pruned_slices_only():
    model = tiny_model("phi3")  # fused gate_up: two slices of one parameter per neuron
    mask = PruneMask(model, {0: [3, 5], 1: [0]})
    ids = random_batch()
    model(ids, labels=ids).loss.backward()
    mask.mask_gradients(model)
    masks = mask.as_tensors(model)
    assert masks["model.layers.0.mlp.gate_up_proj.weight"][[3, 5, 51, 53]].all()
    for name, pruned in masks.items():
        grad = model.get_parameter(name).grad
        assert not grad[pruned].any() and grad[~pruned].abs().sum() > 0
    assert mask.nonzero_count(model) > 0
    mask.apply(model)
    assert mask.nonzero_count(model) == 0


def test_module_map_for_another_model_is_refused(tmp_path):
    loaded = _loaded(tmp_path)

    def attempt(path):
        with pytest.raises(LmpruneError, match="module map"):
            prune_model(PruneConfig(modules=str(path), select="top:1"), loaded)

    attempt(_write_map(tmp_path / "llama.json", model_type="llama"))
    attempt(_write_map(tmp_path / "sha.json", weights_sha256="f" * 64))
    attempt(_write_map(tmp_path / "layers.json", num_layers=12))
    attempt(_write_map(tmp_path / "range.json", modules=[_module(0, [[0, 40]], 1.0)]))
    same = _write_map(tmp_path / "same.json",
                      weights_sha256=loaded.identity["weights_sha256"], num_layers=2)
    assert prune_model(PruneConfig(modules=str(same), select="top:1"), loaded)["num_pruned"] == 5


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "phi3", "opt"])
def test_physical_removal_gives_the_zeroed_models_logits(tmp_path, model_type):
    save_tiny(model_type, tmp_path / "base")
    neurons = {0: [1, 4, 9], 1: [0, 2, 30]}
    members = [[layer, j] for layer, idx in neurons.items() for j in idx]
    mmap = _write_map(tmp_path / "m.json", modules=[_module(0, members, 1.0)],
                      model_type=model_type)
    zeroed = tiny_model(model_type)
    zero_neurons(zeroed, neurons)
    out = tmp_path / "small"
    assert main(["prune", "--model", str(tmp_path / "base"), "--modules", str(mmap),
                 "--select", "top:1", "--physical", "--out", str(out)]) == 0
    small = AutoModelForCausalLM.from_pretrained(out).eval()
    width = NeuronMap(zeroed).width(0)
    assert NeuronMap(small).widths == [width - 3, width - 3]
    ids = random_batch()
    torch.testing.assert_close(small(ids).logits, zeroed(ids).logits, atol=1e-5, rtol=1e-5)
    assert json.loads((out / "lmprune.json").read_text())["physically_removed"] == {
        "0": [1, 4, 9], "1": [0, 2, 30]}


def test_physical_removal_refused_for_uneven_layers():
    model = tiny_model("llama")
    with pytest.raises(LmpruneError, match="same number of neurons"):
        remove_neurons(model, {0: [1, 2], 1: [3]})


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    save_tiny("gpt2", tmp_path / "base")
    code = main(["prune", "--model", str(tmp_path / "base"), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "needs --modules" in capsys.readouterr().err
