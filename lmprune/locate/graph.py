"""Co-activation graphs: Pearson correlation from Gram statistics, positive edges, kNN."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch


def correlation_from_gram(gram: torch.Tensor, sums: torch.Tensor, tokens: int,
                          eps: float = 1e-12) -> tuple[np.ndarray, np.ndarray]:
    """Pearson correlation of token activations and the mask of live neurons.

    gram: [n, n] sum over tokens of a a^T; sums: [n]; tokens: how many tokens fed them.
    Dead neurons (zero variance) get zero correlation with everything (never NaN).
    """
    gram = gram.double()
    mean = sums.double() / tokens  # [n]
    cov = gram / tokens - torch.outer(mean, mean)
    var = cov.diagonal().clamp_min(0)
    alive = var > eps * max(float(var.max()), 1.0)
    std = torch.where(alive, var.sqrt(), torch.ones_like(var))
    corr = cov / torch.outer(std, std)
    corr[~alive, :] = 0
    corr[:, ~alive] = 0
    corr.clamp_(-1, 1)
    return corr.numpy(), alive.numpy()


def knn_affinity(corr: np.ndarray, k: int, alive: np.ndarray | None = None,
                 threshold: float = 0.0) -> sp.csr_matrix:
    """Symmetric sparse affinity: for each node its k strongest positive correlations.

    An edge is kept when either end chose it (union), weight = the correlation. With k <= 0,
    every positive correlation above `threshold` is kept instead.
    """
    n = corr.shape[0]
    weights = np.where(corr > threshold, corr, 0.0)
    np.fill_diagonal(weights, 0.0)
    if alive is not None:
        weights[~alive, :] = 0.0
        weights[:, ~alive] = 0.0
    if 0 < k < n - 1:
        top = np.argpartition(-weights, k, axis=1)[:, :k]  # [n, k]
        rows = np.repeat(np.arange(n), k)
        vals = weights[rows, top.ravel()]
        graph = sp.csr_matrix((vals, (rows, top.ravel())), shape=(n, n))
        graph.eliminate_zeros()
        graph = graph.maximum(graph.T)
    else:
        graph = sp.csr_matrix(weights)
    return graph.tocsr()


def ncut(affinity: sp.spmatrix, labels: np.ndarray) -> float:
    """Normalized cut: sum over clusters of (weight leaving the cluster) / (cluster's degree).

    Filan et al. 2021; lower means more modular. Clusters without any degree add nothing.
    """
    affinity = sp.csr_matrix(affinity)
    degree = np.asarray(affinity.sum(axis=1)).ravel()
    total = 0.0
    for c in np.unique(labels):
        inside = labels == c
        vol = degree[inside].sum()
        if vol <= 0:
            continue
        within = affinity[inside][:, inside].sum()
        total += (vol - within) / vol
    return float(total)


def shuffle_weights(affinity: sp.spmatrix, rng: np.random.Generator) -> sp.csr_matrix:
    """Permute the edge weights of a symmetric graph, keeping its structure (which pairs touch)."""
    upper = sp.triu(affinity, k=1).tocoo()
    weights = rng.permutation(upper.data)
    shuffled = sp.csr_matrix((weights, (upper.row, upper.col)), shape=affinity.shape)
    return (shuffled + shuffled.T).tocsr()
