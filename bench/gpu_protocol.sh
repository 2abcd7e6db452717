#!/usr/bin/env bash
# One device call for the quality protocol of notes/quality.md: prepare the shared corpus (if this warm
# machine doesn't have it yet), then run the given seeds through tools/run_seeds.py; the seed logs land
# in $OUT. Extra settings: PROTO_EXTRA="KEY=VALUE ..." in the environment. Since the evening of 2026-12-03 the
# protocol trains and scores on the case-operator shards (data_case/: issue 16, item 8, kept); CASE_OPS=0 uses
# the plain shards (data_corpus/) as before. The val documents and their counted bytes are the same in both.
export CASE_OPS=${CASE_OPS:-1}  # before the setup, which builds data_case/ only when it is set
source bench/device_setup.sh  # sets $data: data_case/, data_corpus/, or with HOLDOUT=1 (bench/gpu_holdout.sh) a held-out folder
envs=(DATA_DIR=$data TRAIN_BATCH_TOKENS=196608 MAX_WALLCLOCK_SECONDS=180 MUON_MOMENTUM_WARMUP_STEPS=150
      EMA_DECAY=0.97 GPTQ_CALIBRATION_BATCHES=16 TTT_ENABLED=1 TRAIN_LOG_EVERY=50 MODEL_PATH=/tmp/final_model.pt
      ARTIFACT_PATH=/tmp/final_model.int6.ptz LOGS_DIR=/tmp/logs ${PROTO_EXTRA:-})
args=(); for e in "${envs[@]}"; do args+=(--env "$e"); done
python3 tools/run_seeds.py --nproc 1 --seeds "$@" --logs-dir "$OUT" "${args[@]}" 2>&1 | grep -v "^  " \
  | grep -E "train_loss|stopping|peak|startup|calibration|train_budget|val_bpb|Total|Code size|Serialized|fits|eval_total|error|warning|legality|layer_loop" | tail -60
