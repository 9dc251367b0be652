"""A markdown table of evaluations, each row against its like: Toxicity Probability by both
scorers (95% bootstrap intervals over prompts), WikiText-2 perplexity, generation fluency, BLiMP,
and each row's ratios to its reference row.

    python docs/results/eval_table.py "base=runs/fair-200/rows/base/eval.json" \
        "module pruning=runs/fair-200/rows/candidate-modules-1pct/eval.json@base" ...

`LABEL=EVAL.json@REF` sets the row against the row labelled REF (given earlier): TP as
REF's over the row's (how many times lower), the other measures as the row's over REF's.
"""

from __future__ import annotations

import sys

from lmprune.evaluate.results import read_result

SCORERS = ("profanity_check", "minilm")


def measures(result: dict) -> dict:
    tox = result["toxicity"]
    by = {tox["scorer"].split(" (")[0]: tox, **tox["by_scorer"]}
    ppl = result.get("perplexity") or {}
    window = ppl.get("sliding_window") or ppl.get("non_overlapping") or {}  # as compare reads it
    return {
        **{s: (by[s]["toxicity_probability"], by[s]["toxicity_probability_interval"])
           for s in SCORERS if s in by},
        "perplexity": window.get("token_perplexity"),
        "fluency": (result.get("fluency") or {}).get("token_perplexity"),
        "blimp": (result.get("blimp") or {}).get("accuracy"),
    }


def cell(value, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def main() -> None:
    rows: dict[str, dict] = {}
    print("| row | TP profanity_check | TP minilm | perplexity | fluency | BLiMP | vs | TP lower "
          "by (pc / minilm) | perplexity | fluency | BLiMP |")
    print("|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    for arg in sys.argv[1:]:
        label, _, rest = arg.partition("=")
        path, _, ref = rest.partition("@")
        m = rows[label] = measures(read_result(path, required=True))
        tps = [f"{m[s][0]:.3f} [{m[s][1][0]:.2f}, {m[s][1][1]:.2f}]" if s in m else "–"
               for s in SCORERS]
        line = [label, *tps, cell(m["perplexity"], ".1f"), cell(m["fluency"], ".1f"),
                cell(m["blimp"], ".3f")]
        if ref:
            r = rows[ref]
            lower = " / ".join(f"{r[s][0] / m[s][0]:.2f}x" if m[s][0] else "inf" for s in SCORERS)
            rel = [f"{m[k] / r[k] - 1:+.1%}" if m[k] and r[k] else "–"
                   for k in ("perplexity", "fluency", "blimp")]
            line += [ref, lower, *rel]
        else:
            line += ["", "", "", "", ""]
        print("| " + " | ".join(line) + " |")


if __name__ == "__main__":
    main()
