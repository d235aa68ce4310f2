#!/usr/bin/env bash
# The GPU run of issue 19: the test suite on CUDA, then the layer, training and model benchmarks in bfloat16 on
# CUDA, each table written to an output folder (default gpu-results/, or $1). Installs nothing: run it in an
# environment that already has deepmoe, torch with CUDA, transformers and pytest (PYTHON picks the interpreter;
# default: the repository's .venv if there is one, else python). Exits 1 if tests or a benchmark failed.
#
#     bash benchmarks/gpu.sh [OUT_DIR]
set -euo pipefail

out="$(realpath -m "${1:-gpu-results}")"
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu.sh: nvidia-smi not found: this needs a machine with an NVIDIA GPU and its driver" >&2
    exit 1
fi
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu.sh: $PYTHON's torch sees no CUDA device (torch.cuda.is_available() is False): a CPU-only torch build?" >&2
    exit 1
fi

mkdir -p "$out"
nvidia-smi | tee "$out/nvidia-smi.txt"
failed=()

run() {  # run NAME COMMAND...: the command's output to the terminal and to $out/NAME.txt
    local name="$1"
    shift
    echo
    echo "== $name: $*"
    if ! "$@" 2>&1 | tee "$out/$name.txt"; then
        failed+=("$name")
    fi
}

run tests "$PYTHON" -m pytest --device cuda -q
run moe_layer "$PYTHON" benchmarks/moe_layer.py --device cuda --dtypes bfloat16
run train "$PYTHON" benchmarks/train.py --device cuda --dtype bfloat16
run model "$PYTHON" benchmarks/model.py --device cuda --dtype bfloat16

echo
echo "gpu.sh: the tables are in $out: $(cd "$out" && ls | tr '\n' ' ')"
if ((${#failed[@]})); then
    echo "gpu.sh: failed: ${failed[*]} (see their .txt files)" >&2
    exit 1
fi
