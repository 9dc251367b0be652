#!/bin/bash
# README "The full protocol, like with like": the comparison recipe on all 598 RealToxicityPrompts
# challenging dev prompts x 10 samples (both scorers, fluency under the base, BLiMP 30 x 67,
# WikiText-2 test perplexity on 16,384 tokens), reduced to the rows the targets read: the base,
# the headline module pruning (1% of the neurons), one random same-size control and AURA, each
# before and after the same 60 WikiText-2 steps. Cached per stage: rerun to resume.
cd "$(dirname "$0")/../.."
export LMPRUNE_DATA_DIR=${LMPRUNE_DATA_DIR:-../shared/data}
lmprune compare recipes/compare-smollm2.yaml --out runs/full-fair \
    --set 'modules={candidate-modules-1pct: {rank_by: causal, select: "budget:1%", locate: {candidates: 1024, k: 8, general: none, matched: false}}}' \
    --set 'compare.random_seeds=[0]' --set compare.top_auroc=false \
    --set 'compare.frontier_budgets=[]' --set 'compare.aura_strengths=[]' --set induce=null
