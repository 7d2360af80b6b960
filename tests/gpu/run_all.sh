#!/usr/bin/env bash
# The whole GPU check in one call (a lent H100/H200, or any CUDA machine): install, build the
# fused kernels, run the GPU tests and the conformance suite on CUDA (both CUDA paths: the
# nvcc-built library, then SEGLOSS_CUDA_KERNELS=nvrtc), compute-sanitizer memcheck,
# and the benchmark against MONAI/nnU-Net. Results go to $OUT (default ./gpu-results).
#
#   tests/gpu/run_all.sh
#
# On the lent device machines (no registry): put array-api-compat, monai, hypothesis (and
# nnunetv2) wheels in .whl/ (see docs/benchmarks.md) and carry .whl.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
step() { echo "== $*"; }

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . || python3 -m pip install -q --no-deps -e . || status=1

step "device"
nvidia-smi | tee "$OUT/nvidia-smi.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee "$OUT/versions.txt"

step "build"
segloss build 2>&1 | tail -5 | tee "$OUT/build.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "tests (GPU + fused + conformance)"
python3 -c "import cupy; print('cupy', cupy.__version__)" | tee -a "$OUT/versions.txt" \
  || echo "cupy not importable: the CuPy tests (tests/gpu/test_cupy.py) will skip" | tee -a "$OUT/versions.txt"
python3 -m pytest -q -p no:cacheprovider tests/gpu tests/kernels/test_fused.py tests/plugins/test_conformance.py 2>&1 \
  | tee "$OUT/tests.txt" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "tests on the NVRTC path (no nvcc library: csrc/kernels compiled at run time, cuda.core launches)"
python3 -m pip install -q "cuda-core>=1.0" "cuda-bindings==$(python3 -c 'import torch; print(torch.version.cuda.split(".")[0])').*" \
  2>&1 | tail -2 || true
SEGLOSS_CUDA_KERNELS=nvrtc python3 -c "from segloss_torch import build; s = build.load(); print('cuda path:', s.cuda_path, s.cuda_error)" \
  | tee "$OUT/nvrtc_build.txt"
SEGLOSS_CUDA_KERNELS=nvrtc python3 -m pytest -q -p no:cacheprovider tests/gpu/test_cuda.py tests/test_nvrtc.py 2>&1 \
  | tee "$OUT/tests_nvrtc.txt" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
SEGLOSS_CUDA_KERNELS=nvrtc python3 benchmarks/compare.py --device cuda --json "$OUT/compare_cuda_nvrtc.json" 2>&1 \
  | tee "$OUT/compare_cuda_nvrtc.txt" | tail -20

step "compute-sanitizer memcheck"
if command -v compute-sanitizer >/dev/null; then
  compute-sanitizer --tool memcheck --error-exitcode 3 python3 tests/gpu/sanitize_inputs.py 2>&1 \
    | tail -20 | tee "$OUT/memcheck.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
else
  echo "compute-sanitizer not found" | tee "$OUT/memcheck.txt"
fi

step "benchmark"
python3 benchmarks/compare.py --device cuda --json "$OUT/compare_cuda.json" 2>&1 | tee "$OUT/compare_cuda.txt"
if [ -f benchmarks/distance_maps.py ]; then
  python3 benchmarks/distance_maps.py --device cuda --json "$OUT/distance_cuda.json" 2>&1 | tee "$OUT/distance_cuda.txt"
fi

echo "== done (status $status); results in $OUT"
exit $status
