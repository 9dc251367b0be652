"""Where the neurons are: hooks read the right tensor, zeroing a neuron's slices removes it."""

import copy

import pytest
import torch
from tiny_models import TINY_CONFIGS, random_batch, tiny_model

from lmprune.core.arch import ARCHITECTURES, NeuronMap, layout_for
from lmprune.core.errors import LmpruneError
from lmprune.core.hooks import NeuronHooks
from lmprune.core.masks import PruneMask

ARCHS = sorted(TINY_CONFIGS)


def _activation_fn(mlp):
    for name in ("act_fn", "act", "activation_fn"):
        if hasattr(mlp, name):
            return getattr(mlp, name)
    raise AssertionError(f"no activation on {type(mlp).__name__}")


def _record(model, nmap, ids):
    """Activations at every hook point: {layer: [batch, pos, d_mlp]}."""
    acts = {}
    with NeuronHooks(model, lambda layer, a: acts.__setitem__(layer, a.detach().clone()),
                     neuron_map=nmap) as hooks:
        logits = model(ids).logits
    hooks.check_fired()
    return logits, acts


def test_table_covers_the_required_architectures():
    required = {"gpt2", "gptj", "gpt_neox", "opt", "llama", "mistral", "qwen2", "qwen3", "gemma",
                "gemma2", "gemma3", "gemma3_text", "phi", "phi3"}
    assert required <= set(ARCHITECTURES)
    assert set(ARCHITECTURES) <= set(TINY_CONFIGS), "every table entry has a tiny test model"


def test_unsupported_model_type_names_the_supported_ones():
    with pytest.raises(LmpruneError, match="unsupported model_type 'bloom'.*gpt2.*llama"):
        layout_for("bloom")


@pytest.mark.parametrize("model_type", ARCHS)
def test_hook_reads_exactly_the_input_of_the_output_projection(model_type):
    model = tiny_model(model_type)
    nmap = NeuronMap(model)
    mlp_inputs = {}
    first_proj = [getattr(m, nmap.layout.inputs[0]) for m in nmap.mlps]
    handles = [p.register_forward_pre_hook(
        lambda mod, args, layer=i: mlp_inputs.__setitem__(layer, args[0].detach()))
        for i, p in enumerate(first_proj)]
    _, acts = _record(model, nmap, random_batch())
    for h in handles:
        h.remove()
    with torch.no_grad():
        for layer, mlp in enumerate(nmap.mlps):
            x, act = mlp_inputs[layer], _activation_fn(mlp)
            if nmap.layout.fused_gate_up:  # phi3: act(gate) * up from one fused projection
                gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
                expected = act(gate) * up
            elif len(nmap.layout.inputs) == 2:  # gated: act(gate) * up
                expected = act(mlp.gate_proj(x)) * mlp.up_proj(x)
            else:
                expected = act(first_proj[layer](x))
            assert acts[layer].shape == (2, 7, nmap.width(layer))
            torch.testing.assert_close(acts[layer], expected.view(acts[layer].shape),
                                       rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model_type", ARCHS)
def test_hooks_change_no_logits_and_fire_once_per_layer(model_type):
    model = tiny_model(model_type)
    ids = random_batch()
    with torch.no_grad():
        plain = model(ids).logits
        with NeuronHooks(model, lambda layer, a: None) as hooks:
            hooked = model(ids).logits
            model(ids)
    assert torch.equal(plain, hooked)
    assert hooks.forwards == 2
    assert hooks.calls == dict.fromkeys(range(NeuronMap(model).num_layers), 2)
    hooks.check_fired()


def test_check_fired_catches_a_bypassed_layer():
    model = tiny_model("llama")
    with NeuronHooks(model, lambda layer, a: None) as hooks:
        model(random_batch())
    hooks.calls[1] = 0
    with pytest.raises(LmpruneError, match="fired unevenly"):
        hooks.check_fired()


@pytest.mark.parametrize("model_type", ARCHS)
def test_zeroing_slices_equals_forcing_the_activation_to_zero(model_type):
    model = tiny_model(model_type)
    nmap = NeuronMap(model)
    pruned_ids = {0: [0, 5, nmap.width(0) - 1], 1: [3]}
    ids = random_batch()

    def force_zero(layer, acts):
        if layer in pruned_ids:
            acts = acts.clone()
            acts[..., pruned_ids[layer]] = 0
            return acts
        return None

    with torch.no_grad(), NeuronHooks(model, force_zero):
        forced_logits, forced_acts = _record(model, nmap, ids)
    pruned = copy.deepcopy(model)
    PruneMask(pruned, pruned_ids).apply(pruned)
    with torch.no_grad():
        pruned_logits, pruned_acts = _record(pruned, NeuronMap(pruned), ids)
    torch.testing.assert_close(pruned_logits, forced_logits, rtol=1e-5, atol=1e-5)
    for layer, idx in pruned_ids.items():
        assert torch.count_nonzero(pruned_acts[layer][..., idx]) == 0
        keep = [j for j in range(nmap.width(layer)) if j not in idx]
        torch.testing.assert_close(pruned_acts[layer][..., keep], forced_acts[layer][..., keep],
                                   rtol=1e-5, atol=1e-5)
    # Only the named slices changed: every other weight is bit-identical.
    changed = {n for (n, a), (_, b) in zip(model.named_parameters(),
                                                       pruned.named_parameters(), strict=True)
               if not torch.equal(a, b)}
    touched = {f"{m}.{s.name}" for layer in pruned_ids
               for m in [nmap.hook_points[layer].rsplit(".", 1)[0]]
               for s in nmap.weight_slices(layer)}
    assert changed <= touched and changed


def test_weight_slices_of_conv1d_and_fused_layouts():
    gpt2 = NeuronMap(tiny_model("gpt2"))
    got = [(s.name, s.dim, s.offset) for s in gpt2.weight_slices(0)]
    assert got == [("c_fc.weight", 1, 0), ("c_fc.bias", 0, 0), ("c_proj.weight", 0, 0)]
    phi3 = NeuronMap(tiny_model("phi3"))
    got = [(s.name, s.dim, s.offset) for s in phi3.weight_slices(0)]
    assert got == [("gate_up_proj.weight", 0, 0), ("gate_up_proj.weight", 0, 48),
                   ("down_proj.weight", 1, 0)]


def test_masks_reject_neurons_out_of_range():
    model = tiny_model("llama")
    with pytest.raises(LmpruneError, match="out of range"):
        PruneMask(model, {0: [48]})
    with pytest.raises(LmpruneError, match="layer 5 does not exist"):
        PruneMask(model, {5: [0]})
