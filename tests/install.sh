#!/usr/bin/env bash
# Install everything the test suite uses into the active Python environment (a venv), so that
# `python -m pytest -n 2` runs the whole suite: the package with its torch and test extras, the two
# example plugins as separate distributions, and the optional oracles/toolchains the tests use.
# The README's test command and .ci/run both call this script: what CI runs is what you run.
#
#   python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && bash tests/install.sh
#
# Optional parts that cannot be installed (no network to the package index, an unsupported
# platform) print a line and their tests skip with a reason. System packages are not installed
# here: the emulated CUDA tests need TBB (Debian: apt-get install libtbb-dev), and skip without it
# (CI installs it and makes that skip a failure).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip=(python -m pip install -q)

python -c "import torch" 2>/dev/null || "${pip[@]}" torch==2.13.0  # keeps any torch>=2.4 already installed
"${pip[@]}" -e ".[torch,test]"
# the example plugins, installed as separate distributions (docs/plugins.md): the clDice loss and the
# JAX backend (JAX on the CPU, ~90 MB). The tests then run the JAX backend's own checks (values and
# gradients vs the reference, jit, the quick kit on four losses: ~1.5 CPU-min); its whole conformance
# kit compiles every case with XLA (~13 CPU-min quick, ~27 full): docs/plugins.md section 7
"${pip[@]}" -e ./plugins/examples/segloss-cldice -e ./plugins/examples/segloss-jax
# differential oracle: nnU-Net's loss modules need only torch, so --no-deps pulls nothing else
"${pip[@]}" --no-deps nnunetv2==2.8.1 || echo "tests/install.sh: nnunetv2 not installable: tests/oracles/test_nnunet.py will skip"
# NVRTC (90 MB, no GPU needed): the tests compile the shared kernels exactly as CuPy will at run time
"${pip[@]}" "nvidia-cuda-nvrtc==13.0.*" || echo "tests/install.sh: NVRTC not installable: the NVRTC checks will skip"
# NVIDIA's Python bindings of NVRTC and the driver (cuda-bindings 13 loads that libnvrtc.so.13; ~15 MB):
# the shared NVRTC loader (segloss_csrc.nvrtc) and the torch backend's NVRTC launchers use them
"${pip[@]}" "cuda-bindings==13.*" "cuda-core>=1.0" || echo "tests/install.sh: cuda-core not installable: the NVRTC checks will skip"
