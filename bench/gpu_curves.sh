#!/usr/bin/env bash
# Numerics check of the speed work (issue 8): the first 200 training steps of the plain path (eager, no
# fused kernels) and of the optimized path, same seed, plus the plain path with another seed as the noise
# yardstick; one GPU each, in parallel (GPUs 0, 1, 2). Logs land in $OUT; compare them with
#   python tools/compare_curves.py curve_plain.txt curve_fast.txt --noise curve_plain_seed2.txt
# Steps, not the wallclock, drive the schedule here (MAX_WALLCLOCK_SECONDS=0), so looping switches on at
# the same step on both paths. Micro-batches of 24 sequences keep the eager path's memory low.
# FAST_EXTRA="KEY=VALUE ..." adds settings to the optimized run only (e.g. FAST_EXTRA="ATTENTION_BACKEND=sdpa_cudnn").
source bench/device_setup.sh
common=(DATA_DIR=data_corpus TRAIN_BATCH_TOKENS=196608 MICRO_BATCH_TOKENS=49152 ITERATIONS=200 MAX_WALLCLOCK_SECONDS=0
        TRAIN_LOG_EVERY=10 VAL_LOSS_EVERY=0 SLIDING_WINDOW_ENABLED=0 TTT_ENABLED=0 GPTQ_CALIBRATION_BATCHES=4 LOGS_DIR=$OUT)
run() {  # gpu run_id extra settings...
  local gpu=$1 id=$2; shift 2
  CUDA_VISIBLE_DEVICES=$gpu env "${common[@]}" RUN_ID=$id MODEL_PATH=/tmp/$id.pt ARTIFACT_PATH=/tmp/$id.ptz "$@" \
    timeout 480 python3 train_gpt.py > $OUT/$id.out 2>&1
}
run 0 curve_plain SEED=1337 COMPILE=0 FUSED_CE=0 &
run 1 curve_fast SEED=1337 ${FAST_EXTRA:-} &
run 2 curve_plain_seed2 SEED=1338 COMPILE=0 FUSED_CE=0 &
wait
for id in curve_plain curve_fast curve_plain_seed2; do
  echo "== $id"; grep -E "^attention:|startup|^200/200|peak|^quantized val|error" $OUT/$id.txt | head -8
done
python3 tools/compare_curves.py $OUT/curve_plain.txt $OUT/curve_fast.txt --noise $OUT/curve_plain_seed2.txt | tee $OUT/curves.json
