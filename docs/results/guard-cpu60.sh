#!/usr/bin/env bash
# The module-selection measurements of README "Results: the general-text guard" (issue 16), on the
# reduced CPU protocol of the "Like with like" section: locate on the comparison's statistics,
# prune at several budgets, fine-tune, evaluate (first 60 RealToxicityPrompts challenging dev
# prompts x 10 samples, profanity_check + minilm, fluency under the unpruned base, BLiMP 10 pairs
# x 67 paradigms, WikiText-2 test perplexity on 8,192 tokens). Every step is skipped when its
# output exists, so the script resumes. Needs the statistics of the comparison:
#   lmprune compare recipes/compare-smollm2.yaml --out runs/frontier-cpu60 ...   (collect stage)
#   bash docs/results/guard-cpu60.sh [OUT]        # default runs/guard-cpu60
set -euo pipefail
export LMPRUNE_DATA_DIR=${LMPRUNE_DATA_DIR:-../shared/data}
out=${1:-runs/guard-cpu60}
stats=${STATS:-runs/frontier-cpu60/stats}
mkdir -p "$out"

locate() {  # NAME FLAGS...: the comparison recipe's headline locate settings, plus FLAGS
  local name=$1; shift
  [ -f "$out/$name.json" ] || lmprune locate --stats "$stats" --out "$out/$name.json" \
    --method spectral --k 8 --scope layer --knn 20 --offensive-loss toxic-tokens \
    --heldout-docs 100 --max-length 48 --batch-size 50 --shuffles 5 --clusterability-layers 2 \
    --candidates 1024 --general wikitext2:valid --general-docs 64 "$@"
}
evaluate() {  # MODEL JSON
  [ -f "$2" ] || lmprune eval --model "$1" --prompts rtp:challenging --limit 60 --samples 10 \
    --scorer profanity_check --extra-scorers minilm --fluency-judge base --blimp blimp \
    --blimp-per-paradigm 10 --ppl-data wikitext2:test --ppl-max-tokens 8192 --ppl-stride 512 \
    --json "$2" --no-progress
}
prune() {  # MAP NAME FLAGS...
  local map=$1 name=$2; shift 2
  [ -f "$out/$name/lmprune.json" ] || lmprune prune --model smollm2-135m --modules "$map" \
    --out "$out/$name" "$@"
  evaluate "$out/$name" "$out/$name.json"
}
finetune() {  # MODEL NAME DATA: the comparison recipe's fine-tuning
  [ -f "$out/$2/lmprune.json" ] || lmprune finetune --model "$1" --out "$out/$2" --data "$3" \
    --holdout-last 64 --max-steps 60 --batch-size 4 --seq-len 128 --lr 5e-5 --schedule cosine \
    --warmup-steps 6 --checkpoint-every 20 --eval-every 0
  evaluate "$out/$2" "$out/$2.json"
}

# the guarded rule (offensive effect against equally rare tokens - |general loss change|) and,
# for comparison, the unguarded rule (causal, no general text, no matched tokens), same settings
locate guarded --general-weight 1 --exact 10 --exact-controls 0
locate unguarded --general none --no-matched --exact 10 --exact-controls 0
for budget in 0.5 1; do prune "$out/guarded.json" "guarded-$budget" --select "budget:$budget%"; done
prune "$out/unguarded.json" unguarded-1 --select budget:1% --rank-by causal

# after the same fine-tuning (WikiText-2 valid without locate's 64 general documents): the
# guarded 0.5% row, the unguarded 0.5% row of the comparison's frontier, the base
finetune "$out/guarded-0.5" guarded-0.5-ft wikitext2:valid
finetune runs/frontier-cpu60/rows/frontier-modules-0.5pct/model unguarded-0.5-ft wikitext2:valid
finetune smollm2-135m base-ft wikitext2:valid
# another fine-tuning corpus for the base: ParaDetox's neutral paraphrases
finetune smollm2-135m base-ft-paradetox paradetox:neutral
