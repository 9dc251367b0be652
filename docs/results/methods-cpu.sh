#!/bin/bash
# The methods table of README "Methods side by side": every family on one protocol. Rows made
# here (ProFS, DPO, Linear-AcT, the induced module and its random control) are measured like the
# rows of the comparison in runs/frontier-cpu60 (command in docs/results/relearn-cpu60.sh): eval
# on 60 RTP challenging prompts x 10 samples, profanity_check + minilm, generation fluency under
# the base, WikiText-2 perplexity on 8,192 tokens, BLiMP 10 pairs per paradigm; then the
# relearning attack of docs/results/relearn-cpu60.sh (last 64 ParaDetox toxic documents, 64 steps
# at lr 1e-4, measured every 16 steps on 20 prompts x 5). The induced model comes from
# `lmprune induce` in runs/induce-scale/example (README "Induce, then remove").
# Usage: bash docs/results/methods-cpu.sh [ROW ...]; then: python docs/results/methods_table.py
cd "$(dirname "$0")/../.."
export LMPRUNE_DATA_DIR=${LMPRUNE_DATA_DIR:-../shared/data}
O=runs/methods-cpu
mkdir -p $O
. docs/results/timed.sh
evaluate() {
    timed $1-eval lmprune eval --model $O/$1/model --prompts rtp:challenging --limit 60 \
        --samples 10 --scorer profanity_check --extra-scorers minilm --fluency-judge base \
        --ppl-data wikitext2:test --ppl-max-tokens 8192 --blimp blimp --blimp-per-paradigm 10 \
        --json $O/$1/eval.json
}
attack() {  # NAME MODEL
    timed $1-relearn lmprune relearn --model $2 --eval-every 16 --out $O/$1/relearn
}
row() {  # NAME: made (by the caller), evaluated, attacked
    evaluate $1
    attack $1 $O/$1/model
}
I=runs/induce-scale/example
make_induced() {
    timed induced-prune lmprune prune --model $I --mode modules --modules $I/modules.json \
        --select ids:0 --out $O/induced/model
    row induced
    timed induced-random-0-prune lmprune prune --model $I --mode random \
        --like $I/modules.json --select ids:0 --seed 0 --out $O/induced-random-0/model
    evaluate induced-random-0
}
make_profs() {
    timed profs-make lmprune profs --model smollm2-135m --pairs paradetox --out $O/profs/model
    row profs
}
make_dpo() {
    timed dpo-make lmprune dpo --model smollm2-135m --pairs paradetox --out $O/dpo/model
    row dpo
}
make_act() {
    # strength 1 (the paper's) breaks SmolLM2 as a weight edit (README lmprune act): 0.25
    timed act-make lmprune act --model smollm2-135m --strength 0.25 --out $O/act/model
    row act
}
make_aura() {
    attack aura runs/frontier-cpu60/rows/aura/model
}
# the rows to make: all of them by default, or the ones named (induced profs dpo act aura)
for name in ${@:-induced profs dpo act aura}; do
    make_$name
done
