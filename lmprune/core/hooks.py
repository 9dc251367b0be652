"""Forward pre-hooks on every MLP's output projection: read (or edit) neuron activations."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lmprune.core.arch import NeuronMap
from lmprune.core.errors import LmpruneError

# fn(layer, acts) with acts [batch, pos, d_mlp]; returning a tensor replaces the activation.
ActivationFn = Callable[[int, torch.Tensor], "torch.Tensor | None"]


class NeuronHooks:
    """Context manager that calls `fn(layer, acts)` on each layer's neuron activations.

    Counts how often each hook fired, so a caller can check that no fused kernel bypassed a
    module: after N forward passes every hooked layer must have fired exactly N times.
    """

    def __init__(self, model: nn.Module, fn: ActivationFn, layers: list[int] | None = None,
                 neuron_map: NeuronMap | None = None):
        self.model = model
        self.fn = fn
        self.neuron_map = neuron_map or NeuronMap(model)
        self.layers = list(range(self.neuron_map.num_layers)) if layers is None else list(layers)
        self.calls = dict.fromkeys(self.layers, 0)
        self.forwards = 0
        self.batch_shape: tuple[int, int] = (0, 0)
        """(batch, pos) of the running forward pass, which OPT's flattened activations are viewed
        back to: set by the model's pre-hook, or by a caller that runs the blocks itself."""
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _pre_hook(self, layer: int):
        def hook(module, args):
            self.calls[layer] += 1
            acts = args[0]
            if acts.dim() == 2:  # OPT flattens [batch * pos, d_mlp] inside its MLP
                acts = acts.view(*self.batch_shape, acts.shape[-1])
            replaced = self.fn(layer, acts)
            if replaced is not None:
                return (replaced.reshape(args[0].shape), *args[1:])
            return None

        return hook

    def _count_forward(self, module, args, kwargs):
        self.forwards += 1
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is None:
            ids = kwargs["inputs_embeds"]
        self.batch_shape = tuple(ids.shape[:2])

    def __enter__(self) -> NeuronHooks:
        for layer in self.layers:
            proj = self.neuron_map.output_projection(layer)
            self._handles.append(proj.register_forward_pre_hook(self._pre_hook(layer)))
        self._handles.append(
            self.model.register_forward_pre_hook(self._count_forward, with_kwargs=True)
        )
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def check_fired(self) -> None:
        """Raise when a layer's hook fired a different number of times than the model ran."""
        wrong = {layer: n for layer, n in self.calls.items() if n != self.forwards}
        if wrong:
            raise LmpruneError(
                f"MLP hooks fired unevenly ({self.forwards} forward passes, per-layer calls "
                f"{wrong}): a fused kernel may bypass the output projection; load the model "
                f"without fused MLP kernels (e.g. attn/mlp implementation 'eager')"
            )
