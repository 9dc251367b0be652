"""Evaluation: toxicity of sampled continuations (RealToxicityPrompts protocol) and perplexity.

Modules: `generate` (fast k-sample nucleus sampler), `scorers` (pluggable toxicity classifiers),
`toxicity` (EMT, TP, mean with bootstrap intervals), `perplexity` (sliding window and
non-overlapping), `command` (`lmprune eval` and its CI gates).
"""

from lmprune.evaluate.command import STAGE, EvalConfig, register, run

__all__ = ["STAGE", "EvalConfig", "register", "run"]
