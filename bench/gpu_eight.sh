#!/usr/bin/env bash
# Issue 19, the real launch on 8 GPUs (kind nvidia-h200-x8), in two device calls of at most 10 minutes:
#   bash bench/gpu_eight.sh throughput budget   # call 1: record batch on 1 and 8 GPUs; then a capped
#                                                # end-to-end run on 8 GPUs (its artifact lands in $OUT)
#   ARTIFACT=budget.ptz bash bench/gpu_eight.sh eval   # call 2: sliding + TTT scoring of the artifact on 8 GPUs over a
#                                                      # validation stand-in of FineWeb's size (~62 M tokens)
# Results: $OUT/eight.txt (JSON lines of bench_train.py), $OUT/budget.txt and $OUT/eval_big.txt (run logs).
# BUDGET_SECONDS (default 360) caps the end-to-end run so that call 1 fits; its quality means little: at
# this speed the 48 M-token proxy corpus is seen many times over.
source bench/device_setup.sh
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # keep multicast off (shared hosts)
nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c
ngpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
for m in "${@:-throughput}"; do
  case "$m" in
    throughput)
      for n in 1 "$ngpu"; do  # launch to first timed step is the compile_s + startup figure of each line
        DATA_DIR=data_corpus TRAIN_BATCH_TOKENS=786432 timeout 240 torchrun --standalone --nproc_per_node=$n \
          bench/bench_train.py --steps 6 --label "$n GPU" 2>&1 | grep "^{" | tee -a $OUT/eight.txt
      done ;;
    budget)
      DATA_DIR=data_corpus MAX_WALLCLOCK_SECONDS=${BUDGET_SECONDS:-360} TTT_ENABLED=1 LOGS_DIR=$OUT RUN_ID=budget \
        ARTIFACT_PATH=$OUT/budget.ptz MODEL_PATH=/tmp/budget.pt timeout 560 \
        torchrun --standalone --nproc_per_node=$ngpu train_gpt.py > /tmp/budget.out 2>&1
      echo "exit code: $? (every rank: see /tmp/budget.out)"; grep -c "error" /tmp/budget.out
      grep -E "startup|stopping|train_budget|calibration|Total sub|fits|val_bpb|legality|eval_total|compliance|run_complete" $OUT/budget.txt ;;
    eval)
      # FineWeb's val split is ~62 M tokens; the proxy's train split (48 M) read twice over stands in for it.
      python3 - <<'PY'
import glob, numpy as np, sys
sys.path.insert(0, ".")
import train_gpt as tg
need, out, i = 62_000_000, [], 0
files = sorted(glob.glob("data_corpus/datasets/fineweb10B_sp8192/fineweb_train_*.bin"))
while sum(map(len, out)) < need:
    out.append(tg.read_shard(files[i % len(files)])); i += 1
tokens = np.concatenate(out)[:need]
for k, part in enumerate(np.array_split(tokens, 8)):
    tg.write_shard(f"data_big/fineweb_val_{k:06d}.bin", part)
print("stand-in val tokens:", tokens.size)
PY
      DATA_DIR=data_corpus VAL_FILES='data_big/fineweb_val_*.bin' EVAL_ONLY=1 TTT_ENABLED=1 ARTIFACT_PATH=${ARTIFACT:?set ARTIFACT to the artifact to score} \
        LOGS_DIR=$OUT RUN_ID=eval_big timeout 590 torchrun --standalone --nproc_per_node=$ngpu train_gpt.py > /tmp/eval.out 2>&1
      echo "exit code: $?"; grep -E "eval_settings|val_bpb|legality|eval_total|compliance|error" $OUT/eval_big.txt ;;
    *) echo "unknown mode $m (throughput, budget, eval)"; exit 2 ;;
  esac
done
