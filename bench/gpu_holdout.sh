#!/usr/bin/env bash
# Issue 16's held-out check: do the gains we measured on the val split hold on documents we never tuned on?
# The held-out documents are the last 2,566 of the shared corpus's train file (bench/device_setup.sh, HOLDOUT=1);
# they are outside the repository, past the text both tokenizers were trained on, and left out of these runs'
# training. Arm A is the baseline (commit a204fbc's settings, on this file: quintic Newton-Schulz, no LR floor,
# no gates, no document mask, the fixed 12 s GPTQ reserve, plain shards); arm B is this file's defaults on
# case-operator shards. Both score the same held-out documents, their bytes counted on the original text.
#   bash bench/gpu_holdout.sh SEED SECONDS [a|b|ab]
#   bash bench/gpu_holdout.sh 42 180 a   then   bash bench/gpu_holdout.sh 42 180 b   (two warm calls, ~310 s each)
# Each arm takes about SECONDS + 130 s, plus ~45 s the first time a machine builds its held-out shards. Logs:
# $OUT/a/, $OUT/b/; with both arms in one call, the comparison (tools/ab_table.py) in $OUT/ab_table.md.
set -u -o pipefail
seed=$1 seconds=$2 arms=${3:-ab}
baseline="MUON_NS_COEFFS=quintic MIN_LR=0 ATTN_GATE=0 SMEAR_GATE=0 DOC_MASK=0 GPTQ_RESERVE_AUTO=0"
out=$OUT
for arm in a b; do
  [[ $arms == *$arm* ]] || continue
  case_ops=1 settings=""; [ "$arm" = a ] && case_ops=0 settings=$baseline
  mkdir -p "$out/$arm"
  echo "== held-out arm $arm: CASE_OPS=$case_ops MAX_WALLCLOCK_SECONDS=$seconds $settings"
  HOLDOUT=1 CASE_OPS=$case_ops OUT="$out/$arm" PROTO_EXTRA="MAX_WALLCLOCK_SECONDS=$seconds $settings" \
    bash bench/gpu_protocol.sh "$seed"
done
if [ "$arms" = ab ]; then
  python3 tools/ab_table.py --a "$out/a/train_seed$seed.log" --b "$out/b/train_seed$seed.log" | tee "$out/ab_table.md"
fi
