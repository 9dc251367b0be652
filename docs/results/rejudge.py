"""Judge the stored continuations of evaluations again, by another model (no resampling): the
fluency of the same texts under an independent judge, first LIMIT prompts of each.

    python docs/results/rejudge.py --judge gemma3-270m --limit 100 --out runs/rejudge.json \
        "base, fine-tuned=runs/full-fair/rows/base/eval-finetuned.json" ...

Prints a markdown table (token-weighted perplexity with its 95% bootstrap interval over
prompts, median per-continuation perplexity) and writes every block to --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmprune.core.models import load_model
from lmprune.evaluate.fluency import judge_fluency
from lmprune.evaluate.results import read_records, read_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", nargs="+", metavar="LABEL=EVAL_JSON")
    parser.add_argument("--judge", default="gemma3-270m")
    parser.add_argument("--limit", type=int, default=100, help="First N prompts of each.")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    judge = load_model(args.judge, dtype="float32", device="cpu")
    blocks = {}
    print(f"| row | fluency under {args.judge} | median |\n|---|---:|---:|")
    for row in args.rows:
        label, _, path = row.rpartition("=")
        records = read_records(Path(path), read_result(path, required=True))[:args.limit]
        block = judge_fluency(judge.model, judge.tokenizer, [r["prompt"] for r in records],
                              [r["continuations"] for r in records], judge.identity)
        block.pop("per_continuation")
        blocks[label] = {"eval": path, "prompts": len(records), **block}
        low, high = block["token_perplexity_interval"]
        print(f"| {label} | {block['token_perplexity']:.1f} [{low:.1f}, {high:.1f}] | "
              f"{block['median_perplexity']:.1f} |", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(blocks, indent=2) + "\n")


if __name__ == "__main__":
    main()
