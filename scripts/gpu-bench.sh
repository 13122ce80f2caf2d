#!/usr/bin/env bash
# On the lent GPU machine (no network): install the carried wheels (.whl/, made here by scripts/gpu-carry.sh), unpack
# the slim ComfyUI 0.33.0 and 0.3.75 trees, then run one benchmark with its results under $OUT. One call, e.g.:
#   bash scripts/gpu-bench.sh users warmup first bf16 cq_fp8 fp8fast fp8@8 v075   # bench_users.py setups
#   bash scripts/gpu-bench.sh lowp gemm attention block                          # bench_lowp.py sections
# BUDGET_S (default 480) is how long bench_users may start new setups; each setup runs in a process of its own.
set -euo pipefail
cd "$(dirname "$0")/.."
what=$1
shift
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
for v in 033 075; do
    if [ ! -d "/tmp/c$v" ]; then
        mkdir -p "/tmp/unpack$v" && tar xzf ".whl/comfy$v.tar.gz" -C "/tmp/unpack$v" && mv "/tmp/unpack$v/ComfyUI" "/tmp/c$v"
    fi
done
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
out=${OUT:-/tmp/out}
case "$what" in
    users)
        skip=()
        [ -f /tmp/zb/int8cr.safetensors ] && skip=(--skip-prepare)  # a warm machine keeps the checkpoints
        python3 benchmarks/bench_users.py --comfy033 /tmp/c033 --comfy075 /tmp/c075 --work /tmp/zb \
            --out "$out/users.json" --budget-s "${BUDGET_S:-480}" "${skip[@]}" --setups "$@" ;;
    lowp)
        python3 benchmarks/bench_lowp.py --out "$out/lowp" --repeat 10 --sections "$@" ;;
    *)
        echo "usage: $0 users SETUP... | lowp SECTION..." >&2
        exit 2 ;;
esac
