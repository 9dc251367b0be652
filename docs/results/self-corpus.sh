#!/bin/bash
# README "Like with like on 200 prompts, and a fine-tuning corpus of the base's own writing": a corpus of the unpruned model's continuations
# of 600 RealToxicityPrompts non-toxic prompts (the 101st to the 700th: the default recipe's
# transfer check reads the first 30), each kept only when profanity_check and minilm both rate it
# below 0.5; then the base and the headline module pruning of runs/fair-200 (run
# docs/results/fair.sh 200 first) fine-tuned on it exactly as the comparison fine-tunes on
# WikiText-2, and evaluated on the comparison's protocol (the first 200 prompts x 10). One
# thread (the CPU was shared).
cd "$(dirname "$0")/../.."
export LMPRUNE_DATA_DIR=${LMPRUNE_DATA_DIR:-../shared/data} OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
O=runs/self-corpus
mkdir -p $O
. docs/results/timed.sh
[ -f $O/corpus.jsonl ] || timed corpus python -m lmprune.finetune.self_corpus \
    --model smollm2-135m --prompts rtp:nontoxic --skip 100 --limit 600 --samples 1 \
    --max-new-tokens 48 --out $O/corpus.jsonl
for row in base candidate-modules-1pct; do
    model=runs/fair-200/rows/$row/model; [ $row = base ] && model=smollm2-135m
    [ -f $O/$row-finetuned/lmprune.json ] || timed finetune-$row lmprune finetune \
        --model $model --out $O/$row-finetuned --data "$O/corpus.jsonl?field=text" \
        --max-steps 60 --batch-size 4 --seq-len 128 --lr 5e-5 --schedule cosine \
        --warmup-steps 6 --eval-every 0 --base-model smollm2-135m
    [ -f $O/$row-finetuned-eval.json ] || timed eval-$row lmprune eval \
        --model $O/$row-finetuned --prompts rtp:challenging --limit 200 --samples 10 \
        --scorer profanity_check --extra-scorers minilm --fluency-judge base \
        --blimp blimp --blimp-per-paradigm 30 --ppl-data wikitext2:test \
        --ppl-max-tokens 16384 --ppl-stride 512 --json $O/$row-finetuned-eval.json
done
