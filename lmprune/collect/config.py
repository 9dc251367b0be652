"""Settings of `lmprune collect`: CollectConfig, the corpora's order, the --fire-threshold
spec and the checks run before anything is loaded.

The bottom of the package: it imports no other module of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmprune.core.config import option
from lmprune.core.errors import LmpruneError

CORPORA = ("offensive", "clean")


@dataclass
class CollectConfig:
    """Settings of `lmprune collect`."""

    model: str = option("smollm2-135m", "Hub id, local folder, .gguf file or bundled alias.")
    offensive: str = option("paradetox:toxic", "Corpus spec of offensive text (see "
                            "lmprune.core.data).", corpus=True)
    clean: str = option("paradetox:neutral", "Corpus spec of clean text.", corpus=True)
    out: str = option("runs/stats", "Output folder (manifest.json, stats/coact safetensors).")
    max_docs: int | None = option(None, "Use at most this many documents of each corpus.")
    max_tokens: int | None = option(None, "Use the first documents of each corpus up to this "
                                    "many tokens (after truncation to --max-length).")
    max_length: int = option(128, "Truncate documents to this many tokens.")
    batch_size: int = option(16, "Documents per forward pass.")
    device: str = option("cpu", "cpu, cuda, cuda:N or auto (under torchrun: each process's).")
    dtype: str = option("auto", "Model dtype.", choices=["auto", "float32", "bfloat16", "float16"])
    revision: str | None = option(None, "Hub revision of the model.")
    trust_remote_code: bool = option(False, "Run model code from the Hub repository.")
    padding_side: str = option("right", "Pad batches on this side (results do not depend on it).",
                               choices=["right", "left"])
    coact_token_fraction: float = option(0.25, "Share of non-padding tokens (seeded, per "
                                         "document) that feed the per-layer Gram matrices.")
    top_k_global: int = option(4096, "Neurons (top |effect size| across layers) of the global "
                               "cross-layer Gram matrix; 0 disables it.")
    global_max_docs: int | None = option(256, "Documents per corpus (seeded choice) of the second "
                                         "pass that feeds the global Gram; null (in YAML) for all.")
    seed: int = option(0, "Seed of the token subsample and the second-pass documents.")
    fire_threshold: str = option("auto", "zero (activation > 0), relative:F (|activation| > F x "
                                 "the neuron's max |activation| on the first batch) or auto "
                                 "(relative:0.1 for gated MLPs, zero otherwise).")
    exact_pooled_cap: int = option(4096, "Keep pooled values exactly for corpora up to this many "
                                   "documents; larger ones use per-neuron histograms.")
    histogram_bins: int = option(256, "Bins per neuron of the pooled-value histograms.")
    calibration_docs: int = option(64, "First documents of each corpus whose max-pooled range "
                                   "sets the histogram bins (histogram mode only).")
    checkpoint_every: int = option(50, "Checkpoint the accumulators every N rounds of batches.")
    resume: bool = option(True, "Resume an interrupted run in --out (--no-resume starts over).")
    overwrite: bool = option(False, "Write into an existing --out folder that is not an lmprune "
                             "collect folder.")


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
    checks = [
        (cfg.batch_size >= 1, "--batch-size must be at least 1"),
        (cfg.max_length >= 1, "--max-length must be at least 1"),
        (0.0 < cfg.coact_token_fraction <= 1.0, "--coact-token-fraction must be in (0, 1]"),
        (cfg.top_k_global >= 0, "--top-k-global must be 0 (off) or positive"),
        (cfg.max_docs is None or cfg.max_docs >= 1, "--max-docs must be at least 1"),
        (cfg.max_tokens is None or cfg.max_tokens >= 1, "--max-tokens must be at least 1"),
        (cfg.global_max_docs is None or cfg.global_max_docs >= 1,
         "--global-max-docs must be at least 1"),
        (cfg.exact_pooled_cap >= 1, "--exact-pooled-cap must be at least 1"),
        (cfg.histogram_bins >= 2, "--histogram-bins must be at least 2"),
        (cfg.calibration_docs >= 1, "--calibration-docs must be at least 1"),
        (cfg.checkpoint_every >= 1, "--checkpoint-every must be at least 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise LmpruneError(message)
    parse_fire_threshold(cfg.fire_threshold, gated=False)  # refuse a bad spec before loading
