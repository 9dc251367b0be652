"""collect: per-neuron statistics and co-activation (code in lmprune/collect/collector.py)."""

from lmprune.collect.collector import (
    CollectConfig,
    Collector,
    FirstPass,
    Plan,
    SymmetricGram,
    _layer_sums,
    auroc_from_hist,
    coact_token_mask,
    forward_batch,
    register,
    run_collect,
    stopping_hooks,
)

__all__ = [
    "CollectConfig", "Collector", "FirstPass", "Plan", "SymmetricGram", "_layer_sums",
    "auroc_from_hist", "coact_token_mask", "forward_batch", "register", "run_collect",
    "stopping_hooks",
]
