#!/usr/bin/env bash
# One device call: the quality protocol for one seed (bench/gpu_protocol.sh), then a screening sweep on
# what that run wrote, under the protocol's settings: `eval` (bench/eval_sweep.py on the artifact) or
# `quant` (bench/quant_sweep.py on the float weights). The sweep's whole output is kept in $OUT.
#   bash bench/gpu_seed_sweep.sh eval|quant SEED SWEEP_BUDGET_S "VARIANT" ...
set -u -o pipefail
kind=$1 seed=$2 budget=$3; shift 3
bash bench/gpu_protocol.sh "$seed"
cp /tmp/final_model.int6.ptz "$OUT/seed$seed.ptz"
case $kind in
  eval) script=bench/eval_sweep.py; input=/tmp/final_model.int6.ptz ;;
  quant) script=bench/quant_sweep.py; input=/tmp/final_model.pt ;;
esac
export CASE_OPS=${CASE_OPS:-1}  # the protocol's default
source bench/device_setup.sh  # sets $data to the shards the protocol run used (built already: nothing to do)
DATA_DIR=$data TRAIN_BATCH_TOKENS=196608 GPTQ_CALIBRATION_BATCHES=16 PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 \
  python3 $script $input "$@" --budget "$budget" 2>&1 | tee "$OUT/${kind}_sweep.log" | grep -E '^\{|Error|error'
