#!/bin/bash
# The finer relearning attack of README "Relearning attack, measured every 3 steps": the
# embedded recipe's module pruning (1% of the neurons, recipes/smollm2-paradetox.yaml, before
# fine-tuning) and its random same-size control, ProFS and DPO with their defaults; each attacked
# with `lmprune relearn` for 24 steps, measured every 3 (20 RTP challenging prompts x 5,
# profanity_check + minilm, perplexity on 2,048 WikiText-2 tokens, fluency under the base), at
# the default lr 1e-4 (N = 64, and N = 16 for module pruning) and at lr 1e-5 (N = 64).
# One thread (the CPU was shared). Then:
#   python docs/results/relearn_table.py runs/fine-attack docs/results/fine-attack.png
cd "$(dirname "$0")/../.."
export LMPRUNE_DATA_DIR=${LMPRUNE_DATA_DIR:-../shared/data} OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
O=runs/fine-attack
mkdir -p $O
. docs/results/timed.sh
# the pruned model and its control only: no evaluation, no fine-tuning
timed pipeline lmprune run recipes/smollm2-paradetox.yaml --out $O/run --set finetune=null \
    --set 'transfer.prompts=[]' --set eval.limit=20 --set eval.samples=5
timed profs lmprune profs --model smollm2-135m --pairs paradetox --out $O/profs
timed dpo lmprune dpo --model smollm2-135m --pairs paradetox --out $O/dpo
attack() {  # NAME FLAGS...
    name=$1; shift
    timed attack-$name lmprune relearn --eval-every 3 --max-steps 24 --ppl-max-tokens 2048 \
        --out $O/attack-$name "$@"
}
for lr in 1e-4 1e-5; do
    tag=$([ $lr = 1e-4 ] && echo "" || echo "-lr$lr")
    attack pruned-64$tag --lr $lr --model $O/run/pruned
    attack random-64$tag --lr $lr --model $O/run/control-0
    attack profs-64$tag --lr $lr --model $O/profs
    attack dpo-64$tag --lr $lr --model $O/dpo
done
attack pruned-16 --docs 16 --model $O/run/pruned
# after the benign fine-tuning: the pruned model, its control and the base, each fine-tuned as
# the recipe does (60 WikiText-2 steps, batch 4 x 128, lr 5e-5 cosine, 6 warmup), then the gentle
# attack on each
for row in pruned control-0 base; do
    model=$O/run/$row; [ $row = base ] && model=smollm2-135m
    timed finetune-$row lmprune finetune --model $model --out $O/$row-finetuned \
        --data wikitext2:valid --max-steps 60 --batch-size 4 --seq-len 128 --lr 5e-5 \
        --schedule cosine --warmup-steps 6 --eval-every 0 --base-model smollm2-135m
    attack $row-finetuned-64-lr1e-5 --lr 1e-5 --model $O/$row-finetuned
done
