"""Neuron sets and `PruneMask`, the persistent form of a pruning: which weight slices are zero,
re-applied and held through any later training (finetune, induce, relearn, dpo)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from lmprune.core.arch import NeuronMap
from lmprune.core.errors import LmpruneError
from lmprune.core.lineage import read_lineage

# {layer: sorted neuron indices}
NeuronSet = dict[int, list[int]]



def normalize_neurons(neurons) -> NeuronSet:
    """{layer: [idx]} with int keys (JSON gives strings), sorted unique indices, no empty layers."""
    out = {}
    for layer, idx in neurons.items():
        idx = sorted({int(i) for i in idx})
        if idx:
            out[int(layer)] = idx
    return dict(sorted(out.items()))


def count_neurons(neurons: NeuronSet) -> int:
    return sum(len(idx) for idx in neurons.values())


def neurons_to_json(neurons: NeuronSet) -> dict[str, list[int]]:
    return {str(layer): idx for layer, idx in normalize_neurons(neurons).items()}


class PruneMask:
    """Which weight slices of a model are pruned; keeps them exactly zero.

    Stored as (parameter name, dim, indices) triples rather than full-size mask tensors: applying
    and masking gradients then touch only the pruned slices (cheap), and names survive wrapping
    and device moves. Pass the *unwrapped* model (`accelerator.unwrap_model`).
    """

    def __init__(self, model: nn.Module, pruned_neurons):
        self.pruned_neurons = normalize_neurons(pruned_neurons)
        nmap = NeuronMap(model)
        names = {id(p): n for n, p in model.named_parameters()}
        grouped: dict[tuple[str, int], list[torch.Tensor]] = defaultdict(list)
        for layer, idx in self.pruned_neurons.items():
            if layer >= nmap.num_layers:
                raise LmpruneError(f"pruned layer {layer} does not exist "
                                   f"(model has {nmap.num_layers} layers)")
            if idx[0] < 0 or idx[-1] >= nmap.width(layer):
                raise LmpruneError(f"pruned neuron {idx[-1]} out of range in layer {layer} "
                                   f"(width {nmap.width(layer)})")
            index = torch.tensor(idx, dtype=torch.long)
            for s in nmap.weight_slices(layer):
                grouped[(names[id(s.param)], s.dim)].append(index + s.offset)
        self.entries: list[tuple[str, int, torch.Tensor]] = [
            (name, dim, torch.cat(parts)) for (name, dim), parts in grouped.items()
        ]
        self._on_device: dict[tuple[int, torch.device], torch.Tensor] = {}

    @classmethod
    def from_checkpoint(cls, model: nn.Module, folder: str | Path) -> PruneMask:
        """The mask recorded in a checkpoint's lmprune.json (empty when it has none)."""
        meta = read_lineage(folder) or {}
        return cls(model, meta.get("pruned_neurons", {}))

    @property
    def num_neurons(self) -> int:
        return count_neurons(self.pruned_neurons)

    def slices(self, model: nn.Module):
        """(parameter, dim, indices on its device) for every masked parameter."""
        for k, (name, dim, index) in enumerate(self.entries):
            param = model.get_parameter(name)
            key = (k, param.device)
            if key not in self._on_device:
                self._on_device[key] = index.to(param.device)
            yield param, dim, self._on_device[key]

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Zero every pruned slice in place."""
        for param, dim, index in self.slices(model):
            param.index_fill_(dim, index, 0.0)

    @torch.no_grad()
    def mask_gradients(self, model: nn.Module) -> None:
        """Zero the gradients of the pruned slices (call after backward, before the step)."""
        for param, dim, index in self.slices(model):
            if param.grad is not None:
                param.grad.index_fill_(dim, index, 0.0)

    @torch.no_grad()
    def mask_gradients_outside(self, model: nn.Module) -> None:
        """The complement of `mask_gradients`: keep only the gradients of these slices.

        Parameters that hold none of them lose their gradient (None), so an optimizer skips them
        entirely (no moment update, no weight decay).
        """
        holders = set()
        for param, dim, index in self.slices(model):
            holders.add(id(param))
            if param.grad is not None:
                kept = param.grad.index_select(dim, index)
                param.grad.zero_().index_copy_(dim, index, kept)
        for param in model.parameters():
            if id(param) not in holders:
                param.grad = None

    @torch.no_grad()
    def reinitialize(self, model: nn.Module, seed: int) -> None:
        """Draw the pruned slices of every matrix afresh from N(0, std of its other entries);
        biases stay zero. Zeroed neurons are a stationary point of training (no activation, no
        output row: both gradients vanish), so only re-drawn ones can learn again."""
        gen = torch.Generator().manual_seed(seed)
        for param, dim, index in self.slices(model):
            if param.dim() < 2:
                continue
            std = param[param != 0].float().std()
            shape = list(param.shape)
            shape[dim] = len(index)
            fresh = torch.randn(shape, generator=gen) * std
            param.index_copy_(dim, index, fresh.to(param.dtype).to(param.device))

    @torch.no_grad()
    def nonzero_count(self, model: nn.Module) -> int:
        """How many pruned weight entries are not exactly zero (0 when the mask holds)."""
        return sum(int(torch.count_nonzero(param.index_select(dim, index)))
                   for param, dim, index in self.slices(model))

    def check(self, model: nn.Module) -> None:
        bad = self.nonzero_count(model)
        if bad:
            raise LmpruneError(f"{bad} pruned weights are not zero: the mask was not held")

    def as_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Full-size boolean masks, True where a weight is pruned: {parameter name: mask}."""
        out = {}
        for (name, _, _), (param, dim, index) in zip(self.entries, self.slices(model),
                                                    strict=True):
            mask = out.get(name, torch.zeros_like(param, dtype=torch.bool))
            out[name] = mask.index_fill(dim, index, True)
        return out
