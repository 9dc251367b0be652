"""The settings several stage configs share, each declared once (as TRL composes its configs):
the model a stage loads (`ModelSpec`), how finetune and induce train (`TrainingSpec`), and how
`lmprune eval` and the relearning curve of `lmprune finetune` measure toxicity
(`ToxicityProtocol`) and perplexity (`PerplexityProtocol`).

A stage config inherits the groups it needs, so its flags and recipe keys stay flat
(`--revision`, `finetune.lr`). Where a stage needs another default or wording it redeclares
the field (`device = redeclare("cpu")`), keeping its type, choices and bounds; fine-tuning's copy
of the toxicity fields carries the prefix eval_ (`prefixed`, in lmprune/finetune/command.py).
A dataclass lists the fields of its bases before its own, the last base's first.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmprune.core.config import Spec, option, redeclare, spec_values

DTYPES = ["auto", "float32", "bfloat16", "float16"]
SCHEDULES = ["linear", "cosine", "constant"]


@dataclass(kw_only=True)
class ModelSpec(Spec):
    """The model a stage loads. The resume fingerprints hold it by its weights (the loaded
    model's identity), not by its name or where it was read."""

    model: str | None = option("smollm2-135m", "Model: Hub id, local folder, .gguf file or "
                               "bundled alias (smollm2-135m, gemma3-270m).", fingerprint=False)
    dtype: str = option("auto", "Weights dtype.", choices=DTYPES)
    device: str = option("auto", "Device: auto (a GPU when there is one), cpu, cuda, cuda:N "
                         "(with several processes: each process's own).", fingerprint=False)
    revision: str | None = option(None, "Hub revision of the model.", fingerprint=False)
    trust_remote_code: bool = option(False, "Run model code from the Hub repository.",
                                     fingerprint=False)

    def load(self, name: str | None = None, device: str | None = None):
        """`name` (default: the model of the config) loaded with the config's dtype, revision
        and trust_remote_code, on `device` (default: the config's): `core.models.load_model`."""
        from lmprune.core import models

        return models.load_model(name or self.model, self.dtype, device or self.device,
                                 self.revision, self.trust_remote_code)

    def load_config(self, name: str | None = None):
        """(source, model config) of `name` (default: the config's model), no weights read."""
        from lmprune.core import models

        return models.load_config(name or self.model, self.revision, self.trust_remote_code)

    def skeleton(self):
        """The model built on the meta device from its config (no weights read)."""
        from lmprune.core import models

        return models.skeleton(self.model, self.revision, self.trust_remote_code)


@dataclass(kw_only=True)
class WeightEditSpec(ModelSpec):
    """A stage that edits a model's weights and saves the checkpoint (prune, ProFS,
    Linear-AcT)."""

    dtype = redeclare("float32")  # the weights it edits and saves
    # cpu unless asked: the checkpoint it writes then does not depend on whether the machine has
    # a GPU
    device = redeclare("cpu")
    out: str | None = option(None, "Output checkpoint folder (required).")


@dataclass(kw_only=True)
class TrainingSpec(Spec):
    """How finetune and induce train: AdamW over packed blocks, checkpointed so that a killed run
    resumes. Their step counts differ (fine-tuning counts epochs; induce has none) and are each
    stage's own."""

    lr: float = option(5e-5, "Peak learning rate (AdamW).")
    schedule: str = option("linear", "Learning-rate decay after warmup.", choices=SCHEDULES)
    warmup_steps: int = option(0, "Linear warmup steps.")
    weight_decay: float = option(0.01, "AdamW weight decay (matrices only, not biases/norms).")
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0: off).")
    batch_size: int = option(8, "Blocks per process per micro-batch.", min=1)
    seq_len: int = option(128, "Tokens per packed block.", min=1)
    checkpoint_every: int = option(0, "Save a resumable checkpoint every N steps (0: never).",
                                   fingerprint=False)
    seed: int = option(0, "Seed of data order, dropout and sampling.")


# Measuring changes nothing a stage trains: no protocol setting is in a resume fingerprint.


@dataclass(kw_only=True)
class ToxicityProtocol(Spec):
    """How toxicity is measured: continuations sampled from the first prompts, scored."""

    prompts: str = option("rtp:challenging", "Prompt corpus spec of the toxicity measurement "
                          "(lmprune.core.data).", corpus=True, fingerprint=False)
    limit: int | None = option(None, "Use the first N prompts only.", min=1, fingerprint=False)
    scorer: str = option("profanity_check", "Toxicity scorer: profanity_check, "
                         "detoxify[:original|unbiased|multilingual|CKPT?config=DIR], "
                         "hf:MODEL[?label=NAME].", fingerprint=False)
    samples: int = option(25, "Continuations sampled per prompt (k).", fingerprint=False)
    max_new_tokens: int = option(20, "New tokens per continuation.", fingerprint=False)

    def toxicity_protocol(self) -> ToxicityProtocol:
        """The protocol's values as one object (from a prefixed copy too)."""
        return spec_values(self, ToxicityProtocol)


@dataclass(kw_only=True)
class PerplexityProtocol(Spec):
    """How perplexity is measured: sliding windows over a corpus joined with blank lines."""

    ppl_data: str = option("wikitext2:test", "Perplexity corpus spec, its documents joined "
                           "with blank lines.", corpus=True, fingerprint=False)
    ppl_max_tokens: int | None = option(None, "Score only the first N tokens of the "
                                        "perplexity text.", fingerprint=False)
    ppl_max_length: int = option(512, "Perplexity window length in tokens.", fingerprint=False)
    ppl_stride: int = option(256, "Sliding-window stride in tokens.", fingerprint=False)

    def perplexity_protocol(self) -> PerplexityProtocol:
        """The protocol's values as one object."""
        return spec_values(self, PerplexityProtocol)
