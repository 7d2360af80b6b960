"""Shared fixtures: hypothesis profile, backends, plugin registration, the compiled kernels, slow tests.

``tests/`` mirrors the code: core, reference, torch_backend, cupy_backend, kernels, cli,
datasets, plugins, oracles (MONAI, nnU-Net), docs; tests/gpu runs on a CUDA machine
(tests/gpu/run_all.sh). ``python -m pytest -m "not slow" -n 2`` is the quick development run
(the full command, the README's, runs everything): it leaves out what ``SLOW``/``SLOW_BUT`` below
name. Measured (``--durations=0`` of one full run, 2 cores under load): the quick set sums to
2107 s of the full run's 9877 s of test time (0.21; 2726 of 14291 tests); a long test (> ~20 s) goes
into ``SLOW``, or its parametrisation into ``SLOW_BUT`` keeping a quick case.

Collection never compiles the extension: tests that need the compiled kernels take the
``fused_kernels`` fixture, which builds (or loads) them when the first such test runs.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("SEGLOSS_HYPOTHESIS_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.load_profile("ci")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


BUILTIN_CPU_BACKENDS = ("numpy", "torch")


@pytest.fixture(params=BUILTIN_CPU_BACKENDS)
def backend(request) -> str:
    """Each built-in backend that runs on the CPU (the input contract, values and errors are theirs alike)."""
    return request.param


@pytest.fixture
def registered():
    """Register plugin objects for one test, as llm's conftest does: ``registered(obj, name)``."""
    from segloss_core import plugin_manager

    pm = plugin_manager()
    names = []

    def add(obj, name):
        pm.register(obj, name=name)
        names.append(name)

    yield add
    for name in names:
        pm.unregister(name=name)


@pytest.fixture(autouse=True)
def _fresh_dynamo_caches():
    """Forget what ``torch.compile`` cached once a test is done.

    Dynamo keys its cache by code object, so every loss module compiled in one worker process
    counts against the same ``forward``'s recompile limit (8): with ``fullgraph=True`` the ninth
    compiled loss of a worker fails, whichever test it is. Resetting after each test keeps the
    tests independent of how xdist distributes them (a no-op until torch._dynamo is imported).
    """
    yield
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        dynamo.reset()


@pytest.fixture(scope="session")
def fused_kernels():
    """``segloss_torch.fused`` with the compiled extension (built on first use, at run time); skip without it."""
    fused = pytest.importorskip("segloss_torch.fused")
    if not fused.is_built():
        pytest.skip(f"fused extension not built here: {fused.status_line()}")
    return fused


# Tests of the full run only (``-m "not slow"`` leaves them out): the long conformance matrix (its quick
# cases stay in), multi-process and training runs, compiled toolchains, and the longest single tests of
# each area (each area keeps a quick representative). By node id prefix, relative to tests/. Chosen from
# the durations of a full run (``--durations=0``, docs/architecture.md "Tests" has the figures).
SLOW = (
    "torch_backend/test_distributed.py::",
    "cli/test_examples.py::",
    "kernels/test_emulated_cuda.py::",
    "kernels/test_cuda_sources.py::",
    "test_build.py::test_two_venvs_and_checkouts_share_one_cpu_build_without_nvcc",  # a fresh venv and a build
    "plugins/test_example_plugins.py::test_jax_passes_the_quick_conformance_kit_on_core_losses",  # XLA per case
    "plugins/test_example_plugins.py::test_jax_conformance_leaves_x64_alone",  # the kit again, in float64
    "plugins/test_example_plugins.py::test_cldice_torch_passes_the_conformance_kit",  # (quick: numpy vs torch)
    "cli/test_cli.py::test_demo_runs_every_available_backend",  # the whole demo on every backend
    "cli/test_cli.py::test_demo_small",  # (quick: the console-script runs)
    "test_nvrtc.py::test_nvrtc_compiles_every_instantiation_the_torch_path_requests",  # (quick: the packing)
    "kernels/test_fused.py::test_torch_compile_inductor_cpu",  # (quick: torch.compile fullgraph)
)

# Long parametrised tests: every case but the named quick representatives (the ends of their ids) is slow.
SLOW_BUT = {
    "kernels/test_fused.py::test_gradcheck_fused_backward[": ("-dice_ce]",),  # every input variant, one loss
    "plugins/test_example_plugins.py::test_cldice_numpy_and_torch_agree[": ("cldice-2]", "cldice-4]", "cldice-6]"),
    "test_build.py::test_torch_compile_fullgraph_on_the_first_call_of_a_fresh_process[": ("[dice]",),
    "torch_backend/test_distance_losses.py::test_gradcheck[": ("[log_hausdorff_dt]", "[generalized_dice_boundary]"),
}


def is_slow(node: str) -> bool:
    """Whether the test with node id ``node`` (relative to tests/) runs in the full run only."""
    if node.startswith(SLOW):
        return True
    return any(node.startswith(prefix) and not node.endswith(kept) for prefix, kept in SLOW_BUT.items())


def pytest_collection_modifyitems(config, items):
    slow = pytest.mark.slow
    for item in items:
        if is_slow(item.nodeid.removeprefix("tests/")):
            item.add_marker(slow)
