"""collect: stream per-neuron statistics and co-activation on an offensive and a clean corpus.

One pass over each corpus reads every MLP neuron (the input of the MLP's output projection, see
lmprune/core/arch.py) and keeps only sums on the device: token count, sum, sum of squares, firing
counts, per-document pooled values (max and mean over a document's non-padding tokens) and the
per-layer co-activation Gram matrix over a seeded token subsample. A second, shorter pass feeds
the Gram matrix of the global top-K neurons by |effect size| across layers, which are only known
once the first pass is done.

Per-document pooled values (what AUROC needs) are kept exactly in float32 `.npy` memory maps up
to `--exact-pooled-cap` documents per corpus; a larger corpus streams them into per-neuron
histograms instead, and the AUROC then carries a per-neuron error bound (see `auroc_from_hist`).

Work is split over processes started by torchrun (one `Accelerator` each) in a fixed round-robin
of batches; every sum is reduced across processes at the end. Accumulators and the position are
checkpointed atomically every `--checkpoint-every` rounds, so a killed run resumes to the same
numbers. The on-disk format is docs/formats.md ("Collected statistics").

The package, one module per concern, each importing only those above it in this list:

  config.py       CollectConfig, the corpora's order, the --fire-threshold spec, validation
  processes.py    the torchrun processes (an Accelerator each): barrier, sum, broadcast
  plan.py         tokenized corpora, the fixed order of batches, padded batches, token subsample
  gram.py         SymmetricGram, the running Gram matrices, and the precision of their rows
  stats.py        AUROC (exact, or from histograms with a bound), histograms, unshift, Cohen's d
  first_pass.py   FirstPass, the first pass's hook and per-process sums
  forward.py      hooks that stop the forward pass after the last layer read; forward_batch
  checkpoints.py  per-process checkpoints and their pointer; atomic safetensors writes
  collector.py    the Collector (both passes, statistics, manifest), run, STAGE, register

Below: the names other modules and the tests import from `lmprune.collect`.
"""

from lmprune.collect.collector import STAGE, Collector, register, run
from lmprune.collect.config import CollectConfig
from lmprune.collect.first_pass import FirstPass, _layer_sums
from lmprune.collect.forward import forward_batch, stopping_hooks
from lmprune.collect.gram import SymmetricGram
from lmprune.collect.plan import Plan, coact_token_mask
from lmprune.collect.stats import auroc_from_hist

__all__ = [
    "CollectConfig", "Collector", "FirstPass", "Plan", "SymmetricGram", "_layer_sums",
    "STAGE", "auroc_from_hist", "coact_token_mask", "forward_batch", "register", "run",
    "stopping_hooks",
]
