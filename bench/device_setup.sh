# Sourced by the bench/gpu_*.sh device scripts: brotli from the carried wheel (.whl/), and the shared
# corpus turned into shards in data_corpus/ unless this warm machine has them already (.gpu/corpus is
# a copy of ../shared/corpus, carried with the call). Every shard folder here is in .gitignore, so a warm
# machine keeps it from one call to the next. Sets $data to the folder this call's CASE_OPS and HOLDOUT select.
set -u -o pipefail
export PYTHONUNBUFFERED=1
export PYTHONPATH=/tmp/site  # skip the install when a parent script already did it (parallel runs share /tmp/site)
python3 -c "import brotli" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .whl/*.whl
if [ "${HOLDOUT:-0}" = 1 ]; then
  # HOLDOUT=1 (bench/gpu_holdout.sh): issue 16's held-out check. The last 2,566 documents of the train file (as
  # many as the val split has; past the first 50 MB of text both tokenizers were trained on) are the val split of
  # data_holdout_corpus/ (plain) or data_holdout_case/ (CASE_OPS=1), the other train documents its train split.
  # The val split we tune on is in neither folder.
  data=data_holdout_corpus tokenizer=.gpu/corpus/sp8192.model ops=()
  [ "${CASE_OPS:-0}" = 1 ] && data=data_holdout_case tokenizer=data/case_ops/fineweb_8192_bpe.model ops=(--case-ops)
  [ -f $data/datasets/fineweb10B_sp8192/fineweb_val_000000.bin ] || \
    python3 data/prepare.py text --input .gpu/corpus/docs_train.jsonl.xz --val-last 2566 --tokenizer $tokenizer \
      "${ops[@]}" --out $data > /dev/null
else
  data=data_corpus
  [ -f data_corpus/datasets/fineweb10B_sp8192/fineweb_val_000000.bin ] || \
    python3 data/prepare.py text --input .gpu/corpus/docs_train.jsonl.xz --val-input .gpu/corpus/docs_val.jsonl.xz \
      --tokenizer .gpu/corpus/sp8192.model --out data_corpus > /dev/null
  # CASE_OPS=1 (bench/gpu_protocol.sh's default): the same documents as case-operator shards in data_case/, with the
  # committed case-op tokenizer (data/case_ops/, trained on train documents only), for issue 16's item 8.
  if [ "${CASE_OPS:-0}" = 1 ]; then
    data=data_case
    [ -f data_case/datasets/fineweb10B_sp8192/fineweb_val_000000.bin ] || \
      python3 data/prepare.py text --input .gpu/corpus/docs_train.jsonl.xz --val-input .gpu/corpus/docs_val.jsonl.xz \
        --tokenizer data/case_ops/fineweb_8192_bpe.model --case-ops --out data_case > /dev/null
  fi
fi
