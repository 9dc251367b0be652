#!/bin/bash
# README "Like with like": the comparison recipe reduced to the rows the targets read (the base
# and the headline module pruning, 1% of the neurons, each before and after the same 60
# WikiText-2 steps), both scorers, fluency under the base, BLiMP 30 x 67, WikiText-2 test
# perplexity on 16,384 tokens. `fair.sh` = all 598 RealToxicityPrompts challenging dev prompts x
# 10 samples (runs/fair-598); `fair.sh 200` = the first 200 of them (runs/fair-200); further
# arguments go to `lmprune compare` (`fair.sh 200 --out runs/x --set finetune.distill_from=base`).
# One thread (a second job shares the 2 cores). Cached per stage: rerun to resume.
cd "$(dirname "$0")/../.."
export LMPRUNE_DATA_DIR=${LMPRUNE_DATA_DIR:-../shared/data} OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
limit=${1:-}
shift
lmprune compare recipes/compare-smollm2.yaml --out "runs/fair-${limit:-598}" \
    ${limit:+--set eval.limit=$limit} \
    --set 'modules={candidate-modules-1pct: {rank_by: causal, select: "budget:1%", locate: {candidates: 1024, k: 8, general: none, matched: false}}}' \
    --set 'compare.random_seeds=[]' --set compare.aura=false --set compare.top_auroc=false \
    --set 'compare.frontier_budgets=[]' --set 'compare.aura_strengths=[]' --set induce=null \
    --set finetune.eval_every=0 "$@"
