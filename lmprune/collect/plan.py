"""The data plan: tokenized corpora, the fixed order of batches (longest documents first) and
the padded batches themselves, with explicit positions and the seeded choice of tokens that
feed the Gram matrices (independent of batching, padding side and processes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmprune.collect.config import CollectConfig


def coact_token_mask(seed: int, corpus: int, doc: int, length: int, fraction: float) -> np.ndarray:
    """Which of a document's tokens feed the Gram matrices: [length] bool.

    Seeded by (seed, corpus, document) alone, so the choice does not depend on batching, padding
    side or the number of processes.
    """
    if fraction >= 1.0:
        return np.ones(length, dtype=bool)
    return np.random.default_rng([seed, corpus, doc]).random(length) < fraction


@dataclass
class Batch:
    corpus: int
    docs: list[int]  # document indices within the corpus
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T] int64
    position_ids: torch.Tensor  # [B, T]: a token's index within its document
    valid: torch.Tensor  # [n_valid] flat indices of non-padding tokens in [B * T]
    coact: torch.Tensor  # [n_coact] flat indices of the tokens that feed the Gram matrices
    lengths: torch.Tensor  # [B]

    @property
    def tokens(self) -> int:
        return int(self.valid.numel())


class Plan:
    """Tokenized corpora and the fixed order of batches (longest documents first)."""

    def __init__(self, token_lists: list[list[list[int]]], cfg: CollectConfig, pad_id: int):
        self.docs = token_lists  # [corpus][doc] -> token ids
        self.cfg = cfg
        self.pad_id = pad_id

    def batches(self, corpus: int, doc_ids: list[int] | None = None) -> list[list[int]]:
        ids = range(len(self.docs[corpus])) if doc_ids is None else doc_ids
        # Sorting by length cuts padding; the stable sort keeps the order deterministic.
        order = sorted(ids, key=lambda d: -len(self.docs[corpus][d]))
        size = self.cfg.batch_size
        return [order[i:i + size] for i in range(0, len(order), size)]

    def make(self, corpus: int, doc_ids: list[int], fraction: float) -> Batch:
        seqs = [self.docs[corpus][d] for d in doc_ids]
        lengths = torch.tensor([len(s) for s in seqs])
        width = int(lengths.max())
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        coact = torch.zeros((len(seqs), width), dtype=torch.bool)
        for row, (doc, seq) in enumerate(zip(doc_ids, seqs, strict=True)):
            start = width - len(seq) if self.cfg.padding_side == "left" else 0
            span = slice(start, start + len(seq))
            ids[row, span] = torch.tensor(seq)
            mask[row, span] = 1
            picked = coact_token_mask(self.cfg.seed, corpus, doc, len(seq), fraction)
            coact[row, span] = torch.from_numpy(picked)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        return Batch(corpus, list(doc_ids), ids, mask, positions,
                      mask.view(-1).nonzero().squeeze(1), coact.view(-1).nonzero().squeeze(1),
                      lengths)


def tokenize(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    encoded = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_length)
    return [list(ids) for ids in encoded["input_ids"]]


def limit_tokens(docs: list[list[int]], max_tokens: int | None) -> list[list[int]]:
    if max_tokens is None:
        return docs
    total, kept = 0, []
    for doc in docs:
        if total + len(doc) > max_tokens:
            break
        kept.append(doc)
        total += len(doc)
    return kept
