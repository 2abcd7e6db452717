#!/usr/bin/env bash
# One device call: screen evaluation settings on a carried artifact with bench/eval_sweep.py.
#   bash bench/gpu_eval_sweep.sh ARTIFACT DATA_DIR BUDGET_S "VARIANT" ...
# Carry the artifact and a DATA_DIR holding only the val shards and the tokenizer (no training data is
# read by evaluation). Everything the sweep prints, errors included, lands in $OUT/sweep.log.
set -u -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site
python3 -c "import brotli" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .whl/*.whl
artifact=$1 data=$2 budget=$3; shift 3
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
DATA_DIR=$data python3 bench/eval_sweep.py "$artifact" "$@" --budget "$budget" 2>&1 | tee "$OUT/sweep.log" | grep -E '^\{|Error|error'
