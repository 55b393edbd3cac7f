#!/usr/bin/env bash
# The long-context measurements of BENCHMARKS.md, one stage after another, each in its own process and time limit.
#   bench/long_context_suite.sh SHARED OUT STAGE...     (SHARED holds data/ and assets/, as ../shared does)
# Stages: samples, 8b-all, 8b-target, 8b-none, 8b-tiled_loss, 8b-tiled_mlp, 8b-offload, 8b-speed128k, 1b-all, 1b-none,
#         trl-8b, trl-1b. Results: OUT/long_context.jsonl; each stage's log: OUT/STAGE.log.
# LT_BENCH_GPU_GIB holds a larger GPU to a smaller one's memory (79.2: an H100 80GB).
set -u
shared=$1; out=$2; shift 2
here=$(cd "$(dirname "$0")" && pwd)
samples=${LT_BENCH_SAMPLES:-$out/samples.pt}; results=$out/long_context.jsonl  # LT_BENCH_SAMPLES: made earlier
[ -f "$samples" ] || python "$here/long_context.py" samples --shared "$shared" --out "$samples" > "$out/samples.log" 2>&1
search() {  # CONFIG START BUDGET_S
  timeout $(($3 + 60)) python "$here/long_context.py" search "$1" --shared "$shared" --samples "$samples" \
    --out "$results" --start "$2" --budget-s "$3"
}
for stage in "$@"; do
  echo "== $stage $(date +%T)"
  case $stage in
    samples) ;;
    8b-all) search 8b-lora-all 262144 240 ;;
    8b-target) search 8b-lora-all 409600 150 ;;  # from the 400K target up: two or three steps
    8b-none) search 8b-lora-none 16384 70 ;;
    8b-tiled_loss) search 8b-lora-tiled_loss 32768 90 ;;
    8b-tiled_mlp) search 8b-lora-tiled_mlp 32768 90 ;;
    8b-offload) search 8b-lora-offload 32768 90 ;;
    8b-speed128k) timeout 260 python "$here/long_context.py" speed 8b-lora-all --shared "$shared" --samples "$samples" \
                    --out "$results" --tokens 131072 --steps 2 ;;
    1b-all) search 1b-full-all 524288 150 ;;
    1b-none) search 1b-full-none 16384 60 ;;
    trl-8b) timeout 200 python "$here/long_context_trl.py" trl-8b-lora --shared "$shared" --samples "$samples" \
              --out "$results" --start 16384 --budget-s 140 ;;
    trl-1b) timeout 200 python "$here/long_context_trl.py" trl-1b-full --shared "$shared" --samples "$samples" \
              --out "$results" --start 32768 --budget-s 140 ;;
    *) echo "unknown stage $stage" ;;
  esac > "$out/$stage.log" 2>&1
  echo "rc=$? $(date +%T)"; grep -hE '^\{|^LONGEST' "$out/$stage.log" | cut -c1-400; grep -iE 'Traceback|Error' "$out/$stage.log" | tail -3
done
