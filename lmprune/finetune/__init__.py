"""Training a checkpoint again with its masks held at zero: benign fine-tuning on a curated
corpus, re-measuring toxicity and perplexity as it goes (`command`: the `finetune` stage), and
the relearning attack, a fine-tuning on unseen offensive documents that counts the steps until
toxicity returns (`relearn`: the `relearn` stage). The loop itself: lmprune/core/training.py."""

from lmprune.finetune.command import STAGE, FinetuneConfig, register, run

__all__ = ["STAGE", "FinetuneConfig", "register", "run"]
