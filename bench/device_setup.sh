# Sourced by the bench/gpu_*.sh device scripts: brotli from the carried wheel (.whl/), and the shared
# corpus turned into shards in data_corpus/ unless this warm machine has them already (.gpu/corpus is
# a copy of ../shared/corpus, carried with the call).
set -u -o pipefail
export PYTHONUNBUFFERED=1
export PYTHONPATH=/tmp/site  # skip the install when a parent script already did it (parallel runs share /tmp/site)
python3 -c "import brotli" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .whl/*.whl
[ -f data_corpus/datasets/fineweb10B_sp8192/fineweb_val_000000.bin ] || \
  python3 data/prepare.py text --input .gpu/corpus/docs_train.jsonl.xz --val-input .gpu/corpus/docs_val.jsonl.xz \
    --tokenizer .gpu/corpus/sp8192.model --out data_corpus > /dev/null
# CASE_OPS=1 (bench/gpu_protocol.sh's default): the same documents as case-operator shards in data_case/, with the
# committed case-op tokenizer (data/case_ops/, trained on train documents only), for issue 16's item 8.
if [ "${CASE_OPS:-0}" = 1 ] && [ ! -f data_case/datasets/fineweb10B_sp8192/fineweb_val_000000.bin ]; then
  python3 data/prepare.py text --input .gpu/corpus/docs_train.jsonl.xz --val-input .gpu/corpus/docs_val.jsonl.xz \
    --tokenizer data/case_ops/fineweb_8192_bpe.model --case-ops --out data_case > /dev/null
fi
