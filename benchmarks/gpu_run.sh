#!/usr/bin/env bash
# Protocol `gpu` on a machine with an NVIDIA GPU and PyTorch but no package index, in one
# time-boxed run (a lent GPU is billed by the second):
#
#   python benchmarks/offline_bundle.py BUNDLE          # here, where pip works
#   bash benchmarks/gpu_run.sh BUNDLE OUT [BUDGET_S]    # there, from the repository root
#   STEPS=models,compare bash benchmarks/gpu_run.sh ...  # a subset (env runs unless SKIP_ENV=1)
#
# Steps, each with its own time limit, cut to what is left of BUDGET_S (default 560 s). The
# default ones need about 11 minutes on an H200 (compare alone about 5.5), more than one 10-minute
# call: split them with STEPS.
#   env       versions, the GPU, imports of both tools
#   models    a Qwen3-0.6B-shaped random model folder, bf16 (benchmarks/random_model.py)
#   micro06   ablation apply+reset vs the bandwidth bound, and evaluation batches, 0.6B bf16
#   eval06    only the evaluation batches of micro06 (continuous batching vs CUDA graphs)
#   static06  the same base-model batches also through transformers' generate() with a static cache,
#             compiled: the rival the fixed-shape decoder must beat to stay (issue 29; not yet run)
#   ablate06  only the ablation of micro06, LoRA route: the stacked batched edit against the
#             per-component loop, profiled (PATHS=batched: the batched edit alone)
#   ablate4b  the same on the Qwen3-4B shape
#   load06    where a rule's model load goes (CUDA start-up, CPU load + .to(cuda) vs device_map)
#   compare   both tools end to end on that model (benchmarks/compare.py --protocol gpu)
#   pytest    the tests marked gpu (bitsandbytes 4/8-bit cycle and CPU merge, CUDA-graph decoding)
#   micro4bit the 0.6B folder loaded bitsandbytes 4-bit: LoRA-route ablation and evaluation
#   micro4b   a Qwen3-4B-shaped random model in bf16: ablation and evaluation
# and, only when named in STEPS: compare4bit (both tools in bitsandbytes 4-bit), models4b and
# compare4b (both tools on a Qwen3-4B-shaped folder), and workers2 (on a machine with two GPUs: one
# study shared by 1 and by 2 workers, a GPU each, benchmarks/workers_scaling.py; issue 27's target is
# 2 workers at >= 1.8x one worker's trials per hour; not yet run).
# Logs and result JSONs are packed into OUT/gpu-results.tar.gz after every step, so a run cut
# short still returns what it measured; OUT/gpu_run.log has the step summaries.
set -u
BUNDLE=$(realpath "$1")
OUT=$(realpath "$2")
BUDGET=${3:-560}
STEPS=${STEPS:-models,micro06,compare,pytest,micro4bit,micro4b}
REPO=$(cd "$(dirname "$0")/.." && pwd)
START=$(date +%s)
RES=/tmp/gpu-results
WORK=/tmp/gpu-work
DAY=$(date -u +%Y-%m-%d)
mkdir -p "$OUT" "$RES" "$WORK"
exec > >(tee -a "$OUT/gpu_run.log") 2>&1

elapsed() { echo $(( $(date +%s) - START )); }
pack() { tar czf "$OUT/gpu-results.tar.gz" -C "$(dirname "$RES")" "$(basename "$RES")"; }
step() {  # step NAME LIMIT_S TAIL_LINES COMMAND...
    local name=$1 limit=$2 lines=$3
    shift 3
    if [[ $name != env && ",$STEPS," != *",$name,"* ]]; then return; fi
    if [[ $name == env && ${SKIP_ENV:-0} == 1 ]]; then return; fi
    local left=$(( BUDGET - $(elapsed) - 20 ))
    (( limit > left )) && limit=$left
    if (( limit < 20 )); then echo "### $name skipped: $left s left"; return; fi
    echo "### $name: limit $limit s, at $(elapsed) s"
    local t0=$(date +%s)
    timeout -k 10 "$limit" "$@" > "$RES/$name.log" 2>&1
    echo "### $name: rc=$? after $(( $(date +%s) - t0 )) s"
    tail -n "$lines" "$RES/$name.log"
    pack
}

SITE=/tmp/abliterate-site
for part in common ours heretic; do
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE/$part" \
        "$BUNDLE"/wheels/$part/*.whl || { echo "install of $part failed"; exit 1; }
done
echo "### installed at $(elapsed) s"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
export ABLITERATE_SHARED_PROMPTS=$BUNDLE/prompts
export PYTHONPATH=$SITE/ours:$SITE/common:$BUNDLE/site:$REPO/workflow
HERETIC_PY=$WORK/heretic-python
printf '#!/bin/sh\nPYTHONPATH=%s exec python3 "$@"\n' "$SITE/heretic:$SITE/common:$BUNDLE/site" > "$HERETIC_PY"
chmod +x "$HERETIC_PY"
TOK=$BUNDLE/tokenizer
MODEL=$WORK/qwen3-0.6b

cat > "$WORK/env.sh" <<ENV
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 - <<'PY'
import sys, torch, transformers, peft, optuna, snakemake, bitsandbytes
print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
print("transformers", transformers.__version__, "peft", peft.__version__, "optuna", optuna.__version__,
      "snakemake", snakemake.__version__, "bitsandbytes", bitsandbytes.__version__)
PY
$HERETIC_PY - <<'PY'
import heretic.main, optuna, transformers
from importlib.metadata import version
print("heretic", version("heretic-llm"), "optuna", optuna.__version__, "transformers", transformers.__version__)
PY
ENV
step env 60 12 bash "$WORK/env.sh"
step models 60 3 python3 benchmarks/random_model.py qwen3-0.6b "$MODEL" --device cuda --tokenizer "$TOK"
PATHS=${PATHS:-per_component,batched}
step pytest 90 8 python3 -m pytest -q -rP -p no:cacheprovider -m gpu tests/test_quantized.py \
    tests/test_fixed_decoding.py tests/test_batched_ablation.py
step load06 60 30 python3 benchmarks/load_time.py "$MODEL" --out "$RES/load-cuda-bf16-qwen3-0.6b-$DAY.json"
step ablate06 75 30 python3 benchmarks/micro.py --device cuda --dtype bfloat16 --sections ablation \
    --model qwen3-0.6b-shape --tokenizer "$TOK" --reps 20 --routes lora --paths "$PATHS" \
    --out "$RES/micro-cuda-bf16-qwen3-0.6b-ablation-$DAY.json"
step micro06 75 30 python3 benchmarks/micro.py --device cuda --dtype bfloat16 --sections ablation,eval \
    --model qwen3-0.6b-shape --eval-model qwen3-0.6b-shape --tokenizer "$TOK" --batch-sizes 64 \
    --max-new-tokens 64 --reps 3 --no-profile --out "$RES/micro-cuda-bf16-qwen3-0.6b-$DAY.json"
step eval06 90 20 python3 benchmarks/micro.py --device cuda --dtype bfloat16 --sections eval \
    --eval-model qwen3-0.6b-shape --tokenizer "$TOK" --batch-sizes 64 \
    --max-new-tokens 64 --reps 3 --out "$RES/micro-cuda-bf16-qwen3-0.6b-eval-$DAY.json"
step static06 90 20 python3 benchmarks/micro.py --device cuda --dtype bfloat16 --sections eval \
    --eval-model qwen3-0.6b-shape --tokenizer "$TOK" --batch-sizes 64 --no-lora-eval --hf-static \
    --max-new-tokens 64 --reps 3 --out "$RES/micro-cuda-bf16-qwen3-0.6b-static-$DAY.json"
compare() {  # compare NAME LABEL MODEL_DIR [compare.py options...]: both tools, then where their time went
    local name=$1 label=$2 model=$3
    shift 3
    step "$name" 400 25 python3 benchmarks/compare.py --protocol gpu --model "$model" \
        --heretic-python "$HERETIC_PY" --work "$WORK/$name" --out "$RES/gpu-$DAY-$label.json" "$@"
    [[ -d $WORK/$name ]] || return
    cp -r "$WORK/$name/logs" "$RES/$name-logs" 2>/dev/null
    cp -r "$WORK/$name/ours/results/logs" "$RES/$name-ours-rule-logs" 2>/dev/null
    cp "$WORK/$name/ours/results/bench-gpu/summary.json" "$RES/$name-ours-summary.json" 2>/dev/null
    cp "$WORK/$name/heretic/result.json" "$RES/$name-heretic-result.json" 2>/dev/null
    pack
}
compare compare qwen3-0.6b "$MODEL"
step ablate4b 100 30 python3 benchmarks/micro.py --device cuda --dtype bfloat16 --sections ablation \
    --model qwen3-4b-shape --tokenizer "$TOK" --reps 20 --routes lora --paths "$PATHS" --no-profile \
    --out "$RES/micro-cuda-bf16-qwen3-4b-ablation-$DAY.json"
step micro4bit 100 25 python3 benchmarks/micro.py --device cuda --dtype bfloat16 --quantization bnb_4bit \
    --routes lora --sections ablation,eval --model "$MODEL" --eval-model "$MODEL" --batch-sizes 64 \
    --max-new-tokens 64 --reps 3 --no-profile --out "$RES/micro-cuda-bnb4-qwen3-0.6b-$DAY.json"
step micro4b 100 30 python3 benchmarks/micro.py --device cuda --dtype bfloat16 --sections ablation,eval \
    --model qwen3-4b-shape --eval-model qwen3-4b-shape --tokenizer "$TOK" --batch-sizes 64 \
    --max-new-tokens 64 --reps 3 --no-profile --no-lora-eval --out "$RES/micro-cuda-bf16-qwen3-4b-$DAY.json"
# Not in the default STEPS (each needs most of a call): both tools in bitsandbytes 4-bit, and on
# the Qwen3-4B shape (models4b saves its 8 GB folder first).
compare compare4bit qwen3-0.6b-bnb_4bit "$MODEL" --quantization bnb_4bit
step models4b 90 3 python3 benchmarks/random_model.py qwen3-4b "$WORK/qwen3-4b" --device cuda --tokenizer "$TOK"
compare compare4b qwen3-4b "$WORK/qwen3-4b"
step workers2 400 10 python3 benchmarks/workers_scaling.py --device cuda --workers 1,2 --model "$MODEL" \
    --n-trials 24 --tokens 64 --batch 64 --work "$WORK/workers" --out "$RES/workers-cuda-qwen3-0.6b-$DAY.json"
echo "### done at $(elapsed) s"
