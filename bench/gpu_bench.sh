#!/usr/bin/env bash
# One device call: prepare the shared corpus (if not already there), then the throughput and eval
# benchmarks for several attention variants. Results go to $OUT/bench.txt.
source bench/device_setup.sh
export DATA_DIR=data_corpus TRAIN_BATCH_TOKENS=${TRAIN_BATCH_TOKENS:-196608}
for variant in "$@"; do
  echo "=== $variant" | tee -a $OUT/bench.txt
  extra=""; [[ "$variant" == *PROFILE=1* ]] && extra=--profile
  # words of the form --inductor=KEY=JSON are passed to bench_train.py, the rest are environment settings
  settings=(); for w in $variant; do [[ $w == --inductor=* ]] && extra="$extra $w" || settings+=("$w"); done
  env "${settings[@]}" timeout 300 python3 bench/bench_train.py --steps 15 --label "$variant" $extra 2>&1 | grep -v "^warmup\|^loop_warmup" | tee -a $OUT/bench.txt | tail -45
done
[ -n "${EVAL_BENCH:-}" ] && timeout 300 python3 bench/bench_eval.py --tokens 262144 2>&1 | tee -a $OUT/bench.txt | tail -3
