"""Partition a co-activation graph into modules and ask whether the partition beats chance."""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp

from lmprune.core.errors import LmpruneError
from lmprune.locate.graph import ncut, shuffle_weights


def spectral(affinity: sp.spmatrix, k: int, seed: int = 0) -> np.ndarray:
    """Spectral clustering on a precomputed sparse affinity (Filan et al. use this, k=12)."""
    from sklearn.cluster import SpectralClustering

    n = affinity.shape[0]
    if k < 2 or k > n:
        raise LmpruneError(f"spectral clustering needs 2 <= k <= number of nodes ({n}), got {k}")
    # Isolated nodes make the graph Laplacian singular; a tiny self-loop keeps them solvable
    # (they end up in clusters of their own or with their weak neighbours).
    affinity = sp.csr_matrix(affinity) + sp.identity(n, format="csr") * 1e-6
    model = SpectralClustering(n_clusters=k, affinity="precomputed", random_state=seed,
                               assign_labels="cluster_qr")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "graph is not fully connected"
        return model.fit_predict(affinity)


def leiden(affinity: sp.spmatrix, resolution: float = 1.0, seed: int = 0) -> np.ndarray:
    """Leiden modularity clustering (leidenalg + igraph): the number of modules is found."""
    import igraph as ig
    import leidenalg

    upper = sp.triu(affinity, k=1).tocoo()
    graph = ig.Graph(n=affinity.shape[0], edges=list(zip(upper.row.tolist(),
                                                        upper.col.tolist(), strict=True)))
    graph.es["weight"] = upper.data.tolist()
    partition = leidenalg.find_partition(
        graph, leidenalg.RBConfigurationVertexPartition, weights="weight",
        resolution_parameter=resolution, seed=seed,
    )
    return np.asarray(partition.membership)


def cluster(affinity: sp.spmatrix, method: str, k: int, resolution: float,
            seed: int) -> np.ndarray:
    if method == "spectral":
        return spectral(affinity, k, seed)
    if method == "leiden":
        return leiden(affinity, resolution, seed)
    raise LmpruneError(f"unknown clustering method '{method}': use spectral or leiden")


def clusterability(affinity: sp.spmatrix, labels: np.ndarray, method: str, k: int,
                   resolution: float, shuffles: int, seed: int) -> dict:
    """n-cut of the partition against the same clustering of weight-shuffled graphs.

    p = (r + 1) / (n + 1) with r the shuffled graphs whose n-cut is at most the real one
    (Filan et al. 2021); z = (real - mean) / std, negative when the real graph is more modular.
    """
    real = ncut(affinity, labels)
    rng = np.random.default_rng(seed)
    shuffled = []
    for _ in range(shuffles):
        graph = shuffle_weights(affinity, rng)
        shuffled.append(ncut(graph, cluster(graph, method, k, resolution, seed)))
    shuffled = np.asarray(shuffled)
    std = float(shuffled.std(ddof=1)) if shuffles > 1 else float("nan")
    return {
        "ncut": real,
        "shuffled_mean": float(shuffled.mean()),
        "shuffled_std": std,
        "z": (real - float(shuffled.mean())) / std if std > 0 else float("nan"),
        "p": (int((shuffled <= real).sum()) + 1) / (shuffles + 1),
        "num_shuffles": shuffles,
        "shuffled_ncuts": shuffled.tolist(),
    }
