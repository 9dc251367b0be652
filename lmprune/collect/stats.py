"""Statistics from the collected sums: AUROC exactly (Mann-Whitney U) or from per-neuron
histograms with an error bound, histograms of exact pooled values, raw sums and Gram
matrices from shifted ones, Cohen's d. Maths on arrays only: no model, no files.
"""

from __future__ import annotations

import numpy as np
import torch


def auroc_exact(pos: np.ndarray, neg: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """AUROC of pos (higher) vs neg per column: [n_pos, N], [n_neg, N] -> [N] (ties count 1/2).

    Mann-Whitney U from average ranks, as sklearn's roc_auc_score gives for a binary label.
    """
    from scipy.stats import rankdata

    n_pos, n_neg = pos.shape[0], neg.shape[0]
    out = np.empty(pos.shape[1], dtype=np.float64)
    for s in range(0, pos.shape[1], chunk):
        both = np.concatenate([pos[:, s:s + chunk], neg[:, s:s + chunk]]).astype(np.float64)
        ranks = rankdata(both, axis=0)[:n_pos].sum(0)
        out[s:s + chunk] = (ranks - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return out


def auroc_from_hist(pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AUROC and its error bound from per-neuron histograms on shared bins: [..., bins] each.

    Pairs in different bins are ordered exactly; a pair in the same bin is counted 1/2, so the
    error is at most half the share of pairs that share a bin: 0.5 * sum_b p_b q_b.
    """
    p = pos.double() / pos.sum(-1, keepdim=True).double()
    q = neg.double() / neg.sum(-1, keepdim=True).double()
    below = torch.cumsum(q, -1) - q  # share of negatives in lower bins
    same = (p * q).sum(-1)
    return (p * below).sum(-1) + 0.5 * same, 0.5 * same


def histogram_of(values: np.ndarray, lo: torch.Tensor, hi: torch.Tensor, bins: int,
                 chunk: int = 256) -> torch.Tensor:
    """Per-neuron histogram [L, W, bins] of exact pooled values [docs, L, W] (memory-mapped)."""
    L, W = lo.shape
    hist = torch.zeros(L * W * bins, dtype=torch.int64)
    scale = bins / (hi - lo)
    neuron = torch.arange(L * W).view(1, L, W)
    for s in range(0, values.shape[0], chunk):
        v = torch.from_numpy(np.asarray(values[s:s + chunk]))
        b = ((v - lo) * scale).floor_().clamp_(0, bins - 1).long()
        ones = torch.ones(b.numel(), dtype=torch.int64)
        hist.index_add_(0, (neuron * bins + b).reshape(-1), ones)
    return hist.view(L, W, bins)


def unshift(total: torch.Tensor, gram: torch.Tensor, shift: torch.Tensor, n):
    """Raw sums and Gram [..., d], [..., d, d] from those of x - shift, in float64."""
    k = shift.double()
    raw_total = total + n * k
    outer = total.unsqueeze(-1) * k.unsqueeze(-2)  # sum_t (x_t - k) k^T
    raw_gram = gram + outer + outer.transpose(-1, -2) + n * k.unsqueeze(-1) * k.unsqueeze(-2)
    return raw_total, raw_gram


EFFECT_CAP = 1e3  # |Cohen's d| reported for corpora separated without any spread


def cohens_d(n1, s1, ss1, n2, s2, ss2) -> torch.Tensor:
    """Cohen's d (pooled sample standard deviation) from counts, sums and sums of squares."""
    m1, m2 = s1 / n1, s2 / n2
    var1 = (ss1 - n1 * m1 * m1) / max(n1 - 1, 1)
    var2 = (ss2 - n2 * m2 * m2) / max(n2 - 1, 1)
    pooled = (((n1 - 1) * var1 + (n2 - 1) * var2) / max(n1 + n2 - 2, 1)).clamp(min=0).sqrt()
    # Two corpora without spread (e.g. a neuron that is a constant on each) have no finite d:
    # equal means give 0, different means +-EFFECT_CAP, so perfect separators rank first.
    spread = pooled > 1e-7 * (m1.abs() + m2.abs())
    d = (m1 - m2) / torch.where(spread, pooled, torch.ones_like(pooled))
    separated = torch.sign(m1 - m2) * (m1 != m2) * EFFECT_CAP
    return torch.where(spread, d.clamp(-EFFECT_CAP, EFFECT_CAP), separated)
