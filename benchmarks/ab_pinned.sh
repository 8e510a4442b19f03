#!/usr/bin/env bash
# Two checkouts' evaluation batches (micro.py --sections eval) at the same time, one core and one
# thread each, then again with the cores swapped: on a shared VM whose steal time changes from minute
# to minute, both sides then see the same machine, which runs one after the other do not.
#
#   bash benchmarks/ab_pinned.sh OLD_CHECKOUT NEW_CHECKOUT OUT_DIR
#
# Writes OUT_DIR/micro-{old,new}-{a,b}.json (a: old on core 0, b: old on core 1); the ratios are
# read as in benchmarks/README.md ("The one-engine changes against a134ec5").
set -euo pipefail
old=$(realpath "$1") new=$(realpath "$2") out=$(realpath -m "$3")
mkdir -p "$out"
run() { # checkout tag core round
  (cd "$1" && PYTHONPATH="$1/workflow" taskset -c "$3" python benchmarks/micro.py --sections eval \
    --batch-sizes 24 --reps 3 --threads 1 --no-lora-eval --no-profile --out "$out/micro-$2-$4.json" \
    > "$out/micro-$2-$4.log" 2>&1)
}
run "$old" old 0 a & run "$new" new 1 a & wait
run "$old" old 1 b & run "$new" new 0 b & wait
