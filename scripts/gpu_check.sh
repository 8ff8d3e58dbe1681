#!/usr/bin/env bash
# GPU checks of the attention kernels, for a machine with one CUDA GPU (the device machine: H200, no
# package registry, python3 with torch/triton/pytest installed). Runs from a copy of the repo, in
# well under 8 minutes:
#   1. the CUDA tests: every path (flex in fp32 and bf16, forward and backward) against the
#      reference, key extents, and flex's compile count over five map sizes;
#   2. the GPU benchmark (layer and kernel timings at the detection size, no memory subprocesses).
# Results go to $OUT (or the first argument, or ./gpu_check_out): env.txt, pytest-gpu.log,
# pytest-gpu.xml, benchmark.json, benchmark.log. Exits non-zero if there is no CUDA device or any
# step failed.
#
# Environment: the machine's own python3 (its torch, not our pinned 2.13 CPU wheel) with this
# checkout on PYTHONPATH; nothing is installed from an index. The benchmark imports vil_hf, which
# needs transformers >= 5.24: if the machine's is older, carry wheels in .whl (pip download
# --no-deps ... -d .whl transformers==5.24.0, see the device README) and they are installed to
# /tmp/vil-site first.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-${1:-gpu_check_out}}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/vil-site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/vil-site:$PYTHONPATH"
fi

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "gpu_check: FAILED: $PYTHON cannot import torch; set PYTHON to the python that has it." >&2
    exit 2
fi

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    "$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: FAILED: torch sees no CUDA device (see $OUT/env.txt); run this on the GPU machine." >&2
    exit 2
fi

status=0

# 1. CUDA tests (4 minutes at most; most of the time goes to Triton compiling FlexAttention's kernels)
timeout 240 "$PYTHON" -m pytest tests/test_kernels.py tests/test_flex.py -k "cuda or gpu" -p no:cacheprovider \
    -q -rA -s --junitxml="$OUT/pytest-gpu.xml" 2>&1 | tee "$OUT/pytest-gpu.log"
if [ "${PIPESTATUS[0]}" -ne 0 ]; then
    echo "gpu_check: FAILED: CUDA tests (see $OUT/pytest-gpu.log)" >&2
    status=1
fi

# 2. the GPU benchmark in the GPU target's setting (bfloat16 autocast, batch 2): ViL backbone at 800x1216,
#    layer and kernel at 200x304
if "$PYTHON" -c "import vil_hf" 2>"$OUT/benchmark.log"; then
    timeout 200 "$PYTHON" scripts/benchmark.py --device cuda --batch 2 --dtype bfloat16 --repeats 3 \
        --only backbone classifier detector layer kernel \
        --json "$OUT/benchmark.json" 2>&1 | tee -a "$OUT/benchmark.log"
    if [ "${PIPESTATUS[0]}" -ne 0 ]; then
        echo "gpu_check: FAILED: benchmark (see $OUT/benchmark.log)" >&2
        status=1
    fi
else
    echo "gpu_check: FAILED: vil_hf does not import here (see $OUT/benchmark.log; carry transformers>=5.24 in .whl)" >&2
    status=1
fi

if [ "$status" -eq 0 ]; then echo "gpu_check: all passed"; fi
exit "$status"
