"""The toxicity-fluency plot of README "Results: the general-text guard": Toxicity Probability
(both scorers) against the generation fluency and the WikiText-2 perplexity of each row.

    python docs/results/guard_plot.py [--title TEXT] OUT.png LABEL=EVAL.json [LABEL=EVAL.json ...]
Rows of one selection rule share a label up to its last space ("guarded 0.5%"): they are joined
by a line, budgets in order.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter, ScalarFormatter  # noqa: E402


def main() -> None:
    args = sys.argv[1:]
    title = "module selection rules right after pruning (60 prompts x 10, SmolLM2-135M)"
    if args[0] == "--title":
        title, args = args[1], args[2:]
    out, rows = args[0], [arg.split("=", 1) for arg in args[1:]]
    series = defaultdict(list)
    for label, path in rows:
        ev = json.load(open(path))
        tox = ev["toxicity"]
        series[label.rsplit(" ", 1)[0]].append({
            "label": label, "profanity_check": tox["toxicity_probability"],
            "minilm": tox["by_scorer"]["minilm"]["toxicity_probability"],
            "fluency": ev["fluency"]["token_perplexity"],
            "perplexity": ev["perplexity"]["non_overlapping"]["token_perplexity"]})
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))
    for row, scorer in enumerate(("profanity_check", "minilm")):
        for col, (x, xlabel) in enumerate((("fluency", "generation fluency (perplexity of the "
                                            "continuations under the base)"),
                                           ("perplexity", "WikiText-2 test perplexity"))):
            ax = axes[row][col]
            for i, (name, points) in enumerate(series.items()):
                ax.plot([p[x] for p in points], [p[scorer] for p in points], "o-",
                        color=f"C{i}", label=name)
                for p in points:
                    ax.annotate(p["label"].rsplit(" ", 1)[-1], (p[x], p[scorer]), fontsize=7,
                                xytext=(3, 3), textcoords="offset points")
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"Toxicity Probability ({scorer})")
            ax.grid(alpha=0.3)
    axes[0][1].legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
