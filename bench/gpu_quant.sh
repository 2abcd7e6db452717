#!/usr/bin/env bash
# One device call: the quality protocol for one seed (bench/gpu_protocol.sh), then bench/quant_sweep.py on
# the float weights that run wrote, under the protocol's settings; the sweep's whole output is kept.
#   bash bench/gpu_quant.sh SEED SWEEP_BUDGET_S "VARIANT" ...
set -u -o pipefail
seed=$1 budget=$2; shift 2
bash bench/gpu_protocol.sh "$seed"
DATA_DIR=data_corpus TRAIN_BATCH_TOKENS=196608 GPTQ_CALIBRATION_BATCHES=16 PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 \
  python3 bench/quant_sweep.py /tmp/final_model.pt "$@" --budget "$budget" 2>&1 | tee "$OUT/quant_sweep.log" | grep -E '^\{|Error|error'
