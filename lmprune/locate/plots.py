"""Plots of a module map: specificity vs causal effect, modules across layers, n-cut vs shuffled."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lmprune.core.io import save_figure_atomic  # noqa: E402


def plot_modules(result: dict, prefix: Path) -> list[Path]:
    """Write `<prefix>_specificity.png`, `_layers.png` and (if measured) `_ncut.png`."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    written = []
    modules = result["modules"]

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    exact = [m for m in modules if m["scores"]["causal_measured"] == "ablation"]
    for m in exact:
        values = m["scores"].get("control_values")
        if values:
            ax.scatter([m["scores"]["auroc_mean"]] * len(values), values, s=8, c="0.7",
                       label="random same-size controls" if m is exact[0] else None)
    ax.scatter([m["scores"]["auroc_mean"] for m in exact], [m["scores"]["causal"] for m in exact],
               s=[8 + m["size"] / 4 for m in exact], c="tab:red", label="modules (ablated)")
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_xlabel("mean AUROC of members (offensive vs clean input)")
    ax.set_ylabel("causal effect: Δloss offensive − Δloss clean")
    ax.set_title("Module specificity vs what removing it does")
    ax.legend(loc="best", fontsize=8)
    written.append(_save(fig, f"{prefix}_specificity.png"))

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for m in modules:
        for layer in m["layers"]:
            ax.scatter(layer, m["scores"]["causal"], s=6 + m["size"] / 4, alpha=0.6,
                       c="tab:red" if m["scores"]["causal_measured"] == "ablation" else "0.6")
    ax.set_xlabel("layer")
    ax.set_ylabel("causal effect")
    ax.set_title("Where the modules sit (red: ablated, grey: first-order estimate)")
    written.append(_save(fig, f"{prefix}_layers.png"))

    per_graph = result["clusterability"].get("per_graph", {})
    if per_graph:
        fig, axes = plt.subplots(1, len(per_graph), figsize=(2.6 * len(per_graph), 3),
                                 squeeze=False)
        for ax, (graph, c) in zip(axes[0], per_graph.items(), strict=True):
            ax.hist(c["shuffled_ncuts"], bins=10, color="0.7")
            ax.axvline(c["ncut"], color="tab:red")
            ax.set_title(f"graph {graph}: z={c['z']:.1f}", fontsize=9)
            ax.set_xlabel("n-cut")
        fig.suptitle("n-cut of the real graph (red) vs weight-shuffled graphs", fontsize=10)
        written.append(_save(fig, f"{prefix}_ncut.png"))
    return written


def _save(fig, path: str) -> Path:
    return save_figure_atomic(fig, path, dpi=110)
