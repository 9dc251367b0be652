"""Settings of `lmprune collect`: CollectConfig, the corpora's order, the --fire-threshold
spec and the checks run before anything is loaded.

The bottom of the package: it imports no other module of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmprune.core.config import check_bounds, option, redeclare
from lmprune.core.errors import LmpruneError
from lmprune.core.specs import ModelSpec

CORPORA = ("offensive", "clean")


@dataclass
class CollectConfig(ModelSpec):
    """Settings of `lmprune collect`."""

    # cpu unless asked, as collect always had it: what it writes then does not depend on
    # whether the machine has a GPU (a recipe's `device` or --device picks one)
    device = redeclare("cpu")
    offensive: str = option("paradetox:toxic", "Corpus spec of offensive text (see "
                            "lmprune.core.data).", corpus=True)
    clean: str = option("paradetox:neutral", "Corpus spec of clean text.", corpus=True)
    out: str = option("runs/stats", "Output folder (manifest.json, stats/coact safetensors).")
    max_docs: int | None = option(None, "Use at most this many documents of each corpus.",
                                  min=1)
    max_tokens: int | None = option(None, "Use the first documents of each corpus up to this "
                                    "many tokens (after truncation to --max-length).", min=1)
    max_length: int = option(128, "Truncate documents to this many tokens.", min=1)
    batch_size: int = option(16, "Documents per forward pass.", min=1)
    padding_side: str = option("right", "Pad batches on this side (results do not depend on it).",
                               choices=["right", "left"])
    coact_token_fraction: float = option(0.25, "Share of non-padding tokens (seeded, per "
                                         "document) that feed the per-layer Gram matrices.",
                                         above=0, max=1)
    top_k_global: int = option(4096, "Neurons (top |effect size| across layers) of the global "
                               "cross-layer Gram matrix; 0 disables it.", min=0)
    global_max_docs: int | None = option(256, "Documents per corpus (seeded choice) of the second "
                                         "pass that feeds the global Gram; null (in YAML) for all.",
                                         min=1)
    seed: int = option(0, "Seed of the token subsample and the second-pass documents.")
    fire_threshold: str = option("auto", "zero (activation > 0), relative:F (|activation| > F x "
                                 "the neuron's max |activation| on the first batch) or auto "
                                 "(relative:0.1 for gated MLPs, zero otherwise).")
    exact_pooled_cap: int = option(4096, "Keep pooled values exactly for corpora up to this many "
                                   "documents; larger ones use per-neuron histograms.", min=1)
    histogram_bins: int = option(256, "Bins per neuron of the pooled-value histograms.", min=2)
    calibration_docs: int = option(64, "First documents of each corpus whose max-pooled range "
                                   "sets the histogram bins (histogram mode only).", min=1)
    checkpoint_every: int = option(50, "Checkpoint the accumulators every N rounds of batches.",
                                   min=1)
    resume: bool = option(True, "Resume an interrupted run in --out (--no-resume starts over).")
    overwrite: bool = option(False, "Write into an existing --out folder that is not an lmprune "
                             "collect folder.", stage_key=False)


def parse_fire_threshold(spec: str, gated: bool) -> tuple[str, float]:
    """('zero', 0) or ('relative', F) from the --fire-threshold spec."""
    if spec == "auto":
        return ("relative", 0.1) if gated else ("zero", 0.0)
    if spec == "zero":
        return "zero", 0.0
    if spec.startswith("relative:"):
        try:
            frac = float(spec.split(":", 1)[1])
        except ValueError:
            frac = -1.0
        if 0.0 <= frac <= 1.0:
            return "relative", frac
    raise LmpruneError(f"--fire-threshold must be auto, zero or relative:F with 0 <= F <= 1, "
                       f"not '{spec}'")


def validate(cfg: CollectConfig) -> None:
    check_bounds(cfg)
    parse_fire_threshold(cfg.fire_threshold, gated=False)  # refuse a bad spec before loading
