#!/usr/bin/env bash
# One call on a 2-GPU machine: throughput on 1 and on 2 GPUs (same host, record batch), then a short
# end-to-end run on 2 GPUs (DDP, split Muon, summed Hessians, artifact broadcast, distributed TTT).
source bench/device_setup.sh
export DATA_DIR=data_corpus TRAIN_BATCH_TOKENS=786432
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 200 python3 bench/bench_train.py --steps 6 --label "1 GPU" 2>&1 | grep "^{" | tee -a $OUT/multi.txt
timeout 200 torchrun --standalone --nproc_per_node=2 bench/bench_train.py --steps 6 --label "2 GPUs" 2>&1 | grep "^{" | tee -a $OUT/multi.txt
TRAIN_BATCH_TOKENS=196608 MAX_WALLCLOCK_SECONDS=45 GPTQ_CALIBRATION_BATCHES=16 TTT_ENABLED=1 TRAIN_LOG_EVERY=50 \
  MODEL_PATH=/tmp/fm.pt ARTIFACT_PATH=/tmp/fm.ptz LOGS_DIR=$OUT RUN_ID=two_gpu timeout 330 \
  torchrun --standalone --nproc_per_node=2 train_gpt.py 2>&1 | grep -v "^  " | grep -E "derived|startup|train_loss|stopping|peak|calib|budget|val_bpb|Total|fits|legality|eval_total|error|Error|run_complete" | tail -30
