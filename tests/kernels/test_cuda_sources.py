"""The framework-free CUDA kernels and launchers compile with nvcc (no GPU, no torch build needed).

Kept apart from tests/kernels/test_fused.py, whose tests need the CPU extension: a failed CPU build must
not hide a CUDA syntax error.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_sources_compile_with_nvcc(tmp_path):
    """Every framework-free CUDA file compiles alone for sm_80 and sm_90 (no GPU needed)."""
    for source in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        result = subprocess.run(
            [
                "nvcc",
                "-c",
                "-std=c++17",
                "-O3",
                "-gencode",
                "arch=compute_80,code=sm_80",
                "-gencode",
                "arch=compute_90,code=sm_90",
                "-o",
                str(tmp_path / (source.stem + ".o")),
                str(source),
            ],
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert result.returncode == 0, result.stderr[-4000:]
