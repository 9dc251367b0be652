#!/bin/bash
# The relearning attack of README "Relearning attack": `lmprune relearn` with its defaults (the
# last 64 ParaDetox toxic documents, 64 steps at lr 1e-4 constant, batch 4 x 64 tokens;
# 20 RTP challenging prompts x 5 samples, profanity_check + minilm, fluency under the base),
# measured every 16 steps, on two rows of the comparison in runs/frontier-cpu60, made by
#   lmprune compare recipes/compare-smollm2.yaml --out runs/frontier-cpu60 --set eval.limit=60 \
#     --set eval.blimp_per_paradigm=10 --set eval.ppl_max_tokens=8192 \
#     --set 'compare.random_seeds=[0,1,2]' --set compare.top_auroc=false --set induce=null \
#     --set 'modules={candidate-modules-1pct: {rank_by: causal, select: "budget:1%",
#            locate: {candidates: 1024, k: 8}}}'
# (the pruned, not yet fine-tuned models). Then: python docs/results/relearn_table.py
#   runs/relearn-cpu60 docs/results/relearn-cpu60.png
cd "$(dirname "$0")/../.."
export LMPRUNE_DATA_DIR=${LMPRUNE_DATA_DIR:-../shared/data}
R=runs/frontier-cpu60/rows
O=runs/relearn-cpu60
mkdir -p $O
run() {
    name=$1; shift; s=$(date +%s)
    lmprune relearn --eval-every 16 --out $O/$name "$@" > $O/$name.log 2>&1
    echo "$name rc=$? seconds=$(( $(date +%s) - s ))" >> $O/times
}
run candidate-modules-1pct-held --model $R/candidate-modules-1pct/model
run random-0-held --model $R/random-0/model
run candidate-modules-1pct-released --model $R/candidate-modules-1pct/model --masks released
