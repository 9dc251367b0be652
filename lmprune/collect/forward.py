"""Forward passes that stop early: hooks that end the pass after the last layer read
(collection needs no logits), and a padded batch run with explicit positions.
"""

from __future__ import annotations

import inspect

from lmprune.collect.plan import Batch
from lmprune.core.arch import NeuronMap
from lmprune.core.hooks import NeuronHooks


class _StopForward(Exception):
    """Raised by the last needed hook: nothing after it (final norm, LM head) is computed."""


def stopping_hooks(model, nmap: NeuronMap, fn, layers: list[int] | None = None) -> NeuronHooks:
    """NeuronHooks calling `fn(layer, acts)` that end the forward pass after the last layer read:
    collection needs no logits, so the last output projection, final norm and LM head are
    skipped (run the batch with `forward_batch`)."""
    last = max(layers) if layers else nmap.num_layers - 1

    def wrapped(layer, acts):
        fn(layer, acts)
        if layer == last:
            raise _StopForward

    return NeuronHooks(model, wrapped, layers=layers, neuron_map=nmap)


def forward_batch(model, batch: Batch, device) -> None:
    """Run a padded batch with explicit positions (a token's index within its document), so left
    and right padding give the same activations."""
    kwargs = {"attention_mask": batch.attention_mask.to(device), "use_cache": False}
    if "position_ids" in inspect.signature(model.forward).parameters:
        kwargs["position_ids"] = batch.position_ids.to(device)
    try:
        model(batch.input_ids.to(device), **kwargs)
    except _StopForward:
        pass
