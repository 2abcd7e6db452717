#!/usr/bin/env bash
# One device call, so one machine: an A/B of two settings on the protocol of notes/quality.md
# (bench/gpu_protocol.sh) with a shorter training clock, so that both arms fit in the call's 600 s. Machines
# of one kind differ by ~0.002 bpb for the same file (notes/quality.md, late evening of 2026-12-03), as much
# as the changes we screen; two arms in two calls that start cold may not share a machine.
#   bash bench/gpu_ab.sh SEED SECONDS "A settings" "B settings"
#   bash bench/gpu_ab.sh 42 120 "" "DOC_MASK=1"
# Each arm takes about SECONDS + 130 s (start-up, compile, GPTQ, evaluation; more when the settings compile
# new graphs), and a fresh machine first builds the shards (~45 s): SECONDS <= 120 on a fresh machine, <= 150
# on a warm one. Logs: $OUT/a/ and $OUT/b/; the comparison (tools/ab_table.py): $OUT/ab_table.md.
set -u -o pipefail
seed=$1 seconds=$2 settings_a=$3 settings_b=$4
out=$OUT
for arm in a b; do
  settings=$settings_a; [ "$arm" = b ] && settings=$settings_b
  mkdir -p "$out/$arm"
  echo "== arm $arm: MAX_WALLCLOCK_SECONDS=$seconds $settings"
  OUT="$out/$arm" PROTO_EXTRA="MAX_WALLCLOCK_SECONDS=$seconds $settings" bash bench/gpu_protocol.sh "$seed"
done
python3 tools/ab_table.py --a "$out/a/train_seed$seed.log" --b "$out/b/train_seed$seed.log" | tee "$out/ab_table.md"
