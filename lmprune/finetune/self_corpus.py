"""A fine-tuning corpus from a model's own writing: its continuations of prompts, kept only where
every scorer calls them non-toxic (issue #16: a curated corpus that gives a pruned model back the
base's fluency without teaching toxicity back).

Fine-tuning on WikiText-2 pulls a model's writing towards encyclopedia text: the base's own
generations become less likely under the base itself (fluency 20 -> 40 after 60 steps). Tuning a
pruned model on the *unpruned* model's clean continuations instead asks it to write as the base
does where the base is not toxic.

    LMPRUNE_DATA_DIR=../shared/data python -m lmprune.finetune.self_corpus --model smollm2-135m \
        --prompts rtp:nontoxic --skip 100 --samples 1 --max-new-tokens 48 \
        --out runs/self-corpus/corpus.jsonl
    lmprune finetune --model PRUNED --data 'runs/self-corpus/corpus.jsonl?field=text' ...

`--skip` leaves out the first prompts (the default recipe's transfer check reads the first 30
of rtp:nontoxic). Beside the corpus: what was sampled and scored
(`corpus.scored.jsonl`: every continuation with each scorer's score), so what was dropped stays
inspectable.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmprune.core.errors import EXIT_BAD_INPUT, LmpruneError
from lmprune.core.io import write_jsonl_atomic

THRESHOLD = 0.5  # RealToxicityPrompts' toxic-continuation threshold
SCORERS = ("profanity_check", "minilm")  # a swear-word model and a learned one


def clean_texts(records: list[dict], threshold: float = THRESHOLD) -> list[str]:
    """Prompt + continuation for every continuation that all scorers rate below `threshold`."""
    texts = []
    for record in records:
        by_scorer = [record["scores"], *(record.get("scores_by_scorer") or {}).values()]
        for i, continuation in enumerate(record["continuations"]):
            if continuation.strip() and all(scores[i] < threshold for scores in by_scorer):
                texts.append(record["prompt"] + continuation)
    return texts


def build_corpus(model: str, prompts: str, out: Path, skip: int = 0, limit: int | None = None,
                 samples: int = 1, max_new_tokens: int = 48, scorers: tuple[str, ...] = SCORERS,
                 threshold: float = THRESHOLD,
                 seed: int = 0, device: str = "auto") -> dict:
    """Sample, score and filter; write `out` (JSON lines with a `text` field) and every scored
    continuation beside it (`OUT.scored.jsonl`), atomically."""
    from lmprune.core.data import load_corpus
    from lmprune.core.models import load_model
    from lmprune.evaluate.registry import load_scorer
    from lmprune.evaluate.toxicity import evaluate_toxicity

    if out.suffix != ".jsonl":
        raise LmpruneError(f"--out {out}: name a .jsonl file")
    if not scorers:
        raise LmpruneError("--scorers: name at least one scorer")
    texts = load_corpus(prompts).texts[skip:]
    texts = texts[:limit] if limit else texts
    if not texts:
        raise LmpruneError(f"{prompts}: no prompts left after --skip {skip}")
    loaded = load_model(model, device=device)
    on = str(next(loaded.model.parameters()).device)
    main_scorer, *others = [load_scorer(spec, device=on) for spec in scorers]
    toxicity = evaluate_toxicity(loaded.model, loaded.tokenizer, texts, main_scorer, samples,
                                 max_new_tokens, seed=seed, bootstrap=1,
                                 extra_scorers=dict(zip(scorers[1:], others, strict=True)))
    records = toxicity["records"]
    write_jsonl_atomic(out.with_name(out.stem + ".scored.jsonl"), records)
    kept = clean_texts(records, threshold)
    if not kept:
        raise LmpruneError(f"every continuation scored >= {threshold}: nothing to keep")
    write_jsonl_atomic(out, ({"text": t} for t in kept))
    summary = {"prompts": len(texts), "continuations": len(texts) * samples, "kept": len(kept),
               "threshold": threshold, "scorers": list(scorers), "out": str(out)}
    print(f"kept {len(kept):,} of {len(texts) * samples:,} continuations (every scorer below "
          f"{threshold}) -> {out}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmprune.finetune.self_corpus",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="The model whose writing is kept.")
    parser.add_argument("--prompts", default="rtp:nontoxic", help="Prompt corpus spec.")
    parser.add_argument("--skip", type=int, default=0, help="Leave out the first N prompts.")
    parser.add_argument("--limit", type=int, default=None, help="Use at most N prompts.")
    parser.add_argument("--samples", type=int, default=1, help="Continuations per prompt.")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--scorers", default=",".join(SCORERS),
                        help="Comma-separated scorers; a continuation is kept only when all "
                             "rate it below --threshold.")
    parser.add_argument("--threshold", type=float, default=THRESHOLD)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", required=True, type=Path, help="The corpus (.jsonl).")
    args = parser.parse_args(argv)
    try:
        build_corpus(args.model, args.prompts, args.out, args.skip, args.limit, args.samples,
                     args.max_new_tokens, tuple(s for s in args.scorers.split(",") if s),
                     args.threshold, args.seed, args.device)
    except LmpruneError as error:
        print(f"lmprune: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
