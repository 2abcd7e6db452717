#!/usr/bin/env bash
# One call on a multi-GPU machine: throughput at the record batch on each GPU count given (default 1 2),
# one JSON line each in $OUT/multi.txt. E2E=1 adds a short end-to-end run on 2 GPUs (DDP, split Muon,
# summed Hessians, artifact broadcast, distributed TTT).
#   bash bench/gpu_multi.sh 1 2 4
source bench/device_setup.sh
export DATA_DIR=data_corpus TRAIN_BATCH_TOKENS=786432
nvidia-smi --query-gpu=name --format=csv,noheader
counts=("$@"); [ ${#counts[@]} -eq 0 ] && counts=(1 2)
for n in "${counts[@]}"; do
  timeout 200 torchrun --standalone --nproc_per_node=$n bench/bench_train.py --steps 6 --label "$n GPU" 2>&1 | grep "^{" | tee -a $OUT/multi.txt
done
if [ -n "${E2E:-}" ]; then
  TRAIN_BATCH_TOKENS=196608 MAX_WALLCLOCK_SECONDS=45 GPTQ_CALIBRATION_BATCHES=16 TTT_ENABLED=1 TRAIN_LOG_EVERY=50 \
    MODEL_PATH=/tmp/fm.pt ARTIFACT_PATH=/tmp/fm.ptz LOGS_DIR=$OUT RUN_ID=two_gpu timeout 330 \
    torchrun --standalone --nproc_per_node=2 train_gpt.py 2>&1 | grep -v "^  " | grep -E "derived|startup|train_loss|stopping|peak|calib|budget|val_bpb|Total|fits|legality|eval_total|error|Error|run_complete" | tail -30
fi
