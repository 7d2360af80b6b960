"""The CUDA kernels of csrc/ executed on the CPU (HIP CPU Runtime), under AddressSanitizer and UBSan.

The launchers of ``csrc/cuda/*.cu`` and the kernels of ``csrc/kernels/*_device.cuh`` are compiled
unchanged by g++ against the HIP CPU Runtime (``-DSEGLOSS_HIP_CPU``, see
``csrc/kernels/cuda_target.cuh``), with ``tests/kernels/emulated_cuda/driver.cpp``, into one shared library,
once per source hash (a file lock keeps the pytest-xdist workers from building it twice). The
library runs in a subprocess with the ASan runtime preloaded (``tests/kernels/emulated_cuda/runner.py``).
Its results are compared with the CPU kernels (``torch.ops.segloss``) and the float64 reference.

This proves the kernels' logic (indexing, reductions, bounds, grid-stride loops, launch
configuration), not their speed nor anything of the GPU memory model; ``tests/gpu/run_all.sh`` on a
real GPU stays the truth for those.

The HIP CPU Runtime's headers are found through ``SEGLOSS_HIP_CPU`` (a folder) or at
``../shared/third_party/hip-cpu`` beside the repository; TBB from ``libtbb-dev``. Without them the
module skips, unless ``SEGLOSS_REQUIRE_EMULATED_CUDA=1`` (CI sets it), which turns the skip into a
failure.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.emulated_cuda

HERE = Path(__file__).resolve().parent
ROOT = next(p for p in HERE.parents if (p / "pyproject.toml").exists())
SUPPORT = HERE / "emulated_cuda"  # the driver and the runner, beside this module
DRIVER = SUPPORT / "driver.cpp"
RUNNER = SUPPORT / "runner.py"
_spec = importlib.util.spec_from_file_location("segloss_emulated_cuda_runner", RUNNER)
assert _spec is not None and _spec.loader is not None
protocol = importlib.util.module_from_spec(_spec)  # the runner's message framing, shared with this side
_spec.loader.exec_module(protocol)
LAUNCHERS = (ROOT / "csrc" / "cuda" / "region_stats.cu", ROOT / "csrc" / "cuda" / "edt.cu")
REQUIRE_ENV = "SEGLOSS_REQUIRE_EMULATED_CUDA"
HIP_CPU_ENV = "SEGLOSS_HIP_CPU"
HOW_TO_GET = (
    f"set {HIP_CPU_ENV} to a copy of the header-only HIP CPU Runtime (github.com/ROCm/HIP-CPU) or place it at "
    "../shared/third_party/hip-cpu beside the repository, and install TBB (Debian: apt-get install libtbb-dev)"
)
SANITIZE = ("-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer")
# -O1: the kernels' fibers run fast enough; -O0 saves little compile time (the runtime's headers dominate)
CXXFLAGS = ("-std=c++17", "-O1", "-g1", "-fPIC", "-DSEGLOSS_HIP_CPU", *SANITIZE)
LDFLAGS = ("-shared", *SANITIZE, "-ltbb", "-lpthread")

# codes of csrc/cuda/region_stats.h and edt.h
DTYPE_CODES = {np.dtype(np.float32): 0, np.dtype(np.float64): 1}
LABEL_CODES = {np.dtype(np.int64): 1, np.dtype(np.int32): 2, np.dtype(np.uint8): 3}
EDT_LABEL_CODES = {np.dtype(np.int64): 0, np.dtype(np.int32): 1, np.dtype(np.uint8): 2}
ACTIVATIONS = {"softmax": 0, "sigmoid": 1, "none": 2}
NUM_SLOTS = 12
INVALID_SLOT = 9
CUDA_ERROR_INVALID_VALUE = 1  # cudaErrorInvalidValue (hipErrorInvalidValue: the same value)
CUDA_ERROR_INVALID_CONFIGURATION = 9  # cudaErrorInvalidConfiguration (hipErrorInvalidConfiguration)


# ---------------------------------------------------------------------------------------------------
# finding the toolchain, building once


def hip_cpu_dir() -> Path:
    """The HIP CPU Runtime: ``$SEGLOSS_HIP_CPU``, else ``shared/third_party/hip-cpu`` beside the repository."""
    configured = os.environ.get(HIP_CPU_ENV)
    return Path(configured) if configured else ROOT.parent / "shared" / "third_party" / "hip-cpu"


def _compiler_output(*args: str) -> str:
    return subprocess.run(["g++", *args], capture_output=True, text=True, check=False).stdout.strip()


def missing_toolchain() -> str | None:
    """Why the emulated build cannot run here, or None."""
    if shutil.which("g++") is None:
        return "g++ not found"
    headers = hip_cpu_dir() / "include" / "hip" / "hip_runtime.h"
    if not headers.exists():
        return f"HIP CPU Runtime headers not found ({headers})"
    probe = subprocess.run(
        ["g++", "-std=c++17", "-E", "-x", "c++", "-"], input="#include <tbb/tbb.h>\n", capture_output=True, text=True
    )
    if probe.returncode != 0 or not Path(_compiler_output("-print-file-name=libtbb.so")).is_absolute():
        return "TBB not found (headers or libtbb.so)"
    for runtime in ("libasan.so", "libubsan.so"):
        if not Path(_compiler_output(f"-print-file-name={runtime}")).is_absolute():
            return f"the sanitizer runtime {runtime} of g++ not found"
    return None


def skip_or_fail(reason: str) -> None:
    """Skip with ``reason`` and how to get the toolchain; fail instead where SEGLOSS_REQUIRE_EMULATED_CUDA=1."""
    message = f"emulated CUDA kernels not run: {reason}; {HOW_TO_GET}"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{message} ({REQUIRE_ENV}=1 requires them)", pytrace=False)
    pytest.skip(message)


def build_inputs() -> tuple[list[Path], list[str]]:
    """Every file the library depends on (sources and included headers) and the compile flags."""
    files = sorted((ROOT / "csrc" / "kernels").glob("*.cuh")) + sorted((ROOT / "csrc" / "cuda").glob("*"))
    flags = [*CXXFLAGS, f"-I{hip_cpu_dir() / 'include'}"]
    return [*files, DRIVER], flags


def build_key() -> str:
    files, flags = build_inputs()
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(ROOT)).encode())
        digest.update(path.read_bytes())
    digest.update(" ".join(flags + list(LDFLAGS)).encode())
    digest.update(_compiler_output("--version").encode())
    return digest.hexdigest()[:16]


def build_root() -> Path:
    base = os.environ.get("SEGLOSS_BUILD_DIR")
    return (Path(base) if base else Path.home() / ".cache" / "segloss") / "emulated_cuda"


def build_library() -> Path:
    """The emulated library for the current sources: built if absent (one process builds, others wait)."""
    directory = build_root() / build_key()
    directory.mkdir(parents=True, exist_ok=True)
    library = directory / "libsegloss_emulated_cuda.so"
    with open(directory / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if library.exists():
            return library
        _, flags = build_inputs()
        objects, compiles = [], []
        for source in (*LAUNCHERS, DRIVER):  # the three translation units in parallel
            obj = directory / f"{source.stem}.o"
            objects.append(obj)
            command = ["g++", *flags, "-x", "c++", "-c", str(source), "-o", str(obj)]
            compiles.append((command, subprocess.Popen(command, stderr=subprocess.PIPE, text=True)))
        for command, process in compiles:
            _, err = process.communicate()
            assert process.returncode == 0, f"{' '.join(command)}\n{err[-6000:]}"
        partial = directory / "partial.so"
        linked = subprocess.run(
            ["g++", *map(str, objects), *LDFLAGS, "-o", str(partial)], capture_output=True, text=True
        )
        assert linked.returncode == 0, linked.stderr[-6000:]
        partial.replace(library)
    return library


class Emulator:
    """The library in a sanitized subprocess (tests/kernels/emulated_cuda/runner.py); restarted after a crash."""

    def __init__(self, library: Path, cores: set[int] | None = None):
        self.library = library
        self.cores = cores  # CPU affinity of the subprocess (the runtime's threads), None: every core
        self.process: subprocess.Popen[bytes] | None = None
        self.stderr: Any = None

    def _start(self) -> subprocess.Popen[bytes]:
        if self.stderr is not None:
            self.stderr.close()
        runtimes = " ".join(_compiler_output(f"-print-file-name={name}") for name in ("libasan.so", "libubsan.so"))
        env = dict(os.environ)
        env.update(
            LD_PRELOAD=runtimes,
            ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:detect_stack_use_after_return=0",
            UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1",
        )
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 - open while the process lives, read after it dies
        self.process = subprocess.Popen(
            [sys.executable, str(RUNNER), str(self.library)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            env=env,
            preexec_fn=None if self.cores is None else (lambda: os.sched_setaffinity(0, self.cores)),
        )
        return self.process

    def call(self, function: str, args: list[Any], outputs: list[int]) -> tuple[int, dict[int, np.ndarray]]:
        """``function(*args)`` in the library: (its return code, the arrays of ``outputs`` by index)."""
        process = self.process if self.process and self.process.poll() is None else self._start()
        assert process.stdin is not None and process.stdout is not None
        try:
            protocol.write_message(process.stdin, (function, args, outputs))
            reply = protocol.read_message(process.stdout)
        except BrokenPipeError:
            reply = None
        if reply is None:
            process.wait()
            self.stderr.seek(0)
            report = self.stderr.read().decode(errors="replace")
            self.process = None
            raise AssertionError(f"{function} killed the emulator (exit {process.returncode}):\n{report[:8000]}")
        return reply

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            self.process.wait(timeout=60)
        if self.stderr is not None:
            self.stderr.close()


def _emulator_session(cores: set[int] | None):
    reason = missing_toolchain()
    if reason is not None:
        skip_or_fail(reason)
    emulator = Emulator(build_library(), cores=cores)
    yield emulator
    emulator.close()


@pytest.fixture(scope="session")
def emulator():
    """The emulator on one core. On two cores some calls return wrong outputs (found 2026-12-02, present
    at eed74f1 as well): distance maps left at the squared distances of the envelope passes or at the
    output's zero initialisation, a region-statistics comparison off likewise, as if read before the
    last kernels ran; on one core every call is exact. Whether that is the HIP CPU Runtime running
    launches of the null stream concurrently or a race between blocks (which a GPU would show too) is
    not known yet: test_distance_maps_on_every_core keeps it in view (xfail, not strict), and GPU
    verification is pending."""
    yield from _emulator_session({min(os.sched_getaffinity(0))})


@pytest.fixture(scope="session")
def every_core_emulator():
    """The emulator with the runtime on every core (test_distance_maps_on_every_core)."""
    yield from _emulator_session(None)


@pytest.fixture(scope="session")
def cpu_ops():
    """torch.ops.segloss with the CPU kernels (the extension built for this torch)."""
    torch = pytest.importorskip("torch")
    from segloss_torch import fused

    if not fused.is_built():
        pytest.fail("the CPU extension is needed to compare with: it did not build")
    return torch.ops.segloss


def test_missing_toolchain_skips_with_how_to_get_it_or_fails_when_required(monkeypatch, tmp_path):
    monkeypatch.setenv(HIP_CPU_ENV, str(tmp_path / "nowhere"))
    reason = missing_toolchain()
    assert reason is not None and "HIP CPU Runtime headers not found" in reason
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"SEGLOSS_HIP_CPU.*libtbb-dev"):
        skip_or_fail(reason)
    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match=r"SEGLOSS_REQUIRE_EMULATED_CUDA=1 requires them"):
        skip_or_fail(reason)


def test_build_is_keyed_by_sources_and_flags(monkeypatch, tmp_path):
    key = build_key()
    assert key == build_key()
    monkeypatch.setenv(HIP_CPU_ENV, str(tmp_path))  # other headers: another build
    assert build_key() != key


@pytest.mark.parametrize(
    ("kind", "report"),
    [(0, "AddressSanitizer: heap-buffer-overflow"), (1, "runtime error: signed integer overflow")],
    ids=["asan", "ubsan"],
)
def test_sanitizers_are_live_in_the_emulator(emulator, kind, report):
    """A planted bug kills the emulator with the sanitizer's report (and the next call starts a new one)."""
    with pytest.raises(AssertionError, match=report):
        emulator.call("segloss_emulated_planted_bug", [("int32", kind), ("int32", 5)], [])
    assert emulated_forward(emulator, region_case(2, voxels=3, batch=1)).shape == (1, 2, NUM_SLOTS)


# ---------------------------------------------------------------------------------------------------
# region statistics


@dataclass
class RegionCase:
    logits: np.ndarray  # (B, C, N)
    labels: np.ndarray | None  # (B, N)
    target: np.ndarray | None  # (B, C, N)
    mask: np.ndarray | None  # (Mb, N), accumulation dtype
    activation: str
    ignore_index: int | None
    regions: tuple[tuple[int, ...], ...] | None = None  # region-based training: labels in [0, largest region label]
    field_pred: np.ndarray | None = None  # (B, C, N), accumulation dtype: φ of Σ w·p·φ
    field_sq_err: np.ndarray | None = None  # F of Σ w·(p − g)²·F

    @property
    def table(self) -> np.ndarray | None:
        """The membership table the kernels read (segloss_core.regions.membership_table)."""
        from segloss_core.regions import membership_table

        return None if self.regions is None else np.array(membership_table(self.regions), dtype=np.int64)

    @property
    def acc(self) -> np.dtype:
        return np.dtype(np.float64 if self.logits.dtype == np.float64 else np.float32)


def region_case(
    channels: int,
    *,
    dtype: Any = np.float64,
    label_type: Any = np.int64,
    activation: str = "softmax",
    voxels: int = 5037,
    batch: int = 2,
    soft: bool = False,
    ignore_index: int | None = None,
    mask_batch: int = 0,
    fields: str = "",
    seed: int = 0,
    regions: tuple[tuple[int, ...], ...] | None = None,
) -> RegionCase:
    """Random inputs with an absent class (the last, when C > 2) and, with ignore_index, ignored voxels; with
    ``regions`` (C = their number) labels in [0, largest region label], the largest absent from sample 0;
    ``fields`` names the fields to add: "p" (φ, signed), "e" (F, non-negative) or "pe"."""
    rng = np.random.default_rng(seed)
    shape = (batch, channels, voxels)
    if activation == "none":
        logits = rng.uniform(0.05, 0.95, shape)
    else:
        logits = rng.normal(0.0, 2.0, shape)
    labels = target = mask = None
    label_max = 2 if channels == 1 and activation != "softmax" else channels
    if soft:
        target = rng.uniform(0.0, 1.0, shape).astype(dtype)
        target[:, :, ::7] = 0.0
    else:
        present = label_max - 1 if label_max > 2 else label_max  # the last class absent
        if regions is not None:
            present = max(max(r) for r in regions) + 1
        labels = rng.integers(0, present, (batch, voxels))
        if regions is not None:
            labels[0][labels[0] == present - 1] = 0  # the regions of the largest label alone: empty in sample 0
        if ignore_index is not None:
            labels[:, rng.random(voxels) < 0.1] = ignore_index
        labels = labels.astype(label_type)
    if mask_batch:
        mask = rng.uniform(0.0, 1.0, (mask_batch, voxels))
        mask[:, ::5] = 0.0
    case = RegionCase(logits.astype(dtype), labels, target, None, activation, ignore_index, regions)
    case.mask = None if mask is None else mask.astype(case.acc)
    if "p" in fields:
        case.field_pred = rng.normal(0.0, 3.0, shape).astype(case.acc)
    if "e" in fields:
        case.field_sq_err = rng.uniform(0.0, 9.0, shape).astype(case.acc)
    return case


def _region_args(case: RegionCase) -> list[Any]:
    batch, channels, voxels = case.logits.shape
    labels = case.labels
    return [
        case.logits,
        ("int32", DTYPE_CODES[case.logits.dtype]),
        ("int64", batch),
        ("int64", channels),
        ("int64", voxels),
        labels,
        ("int32", 0 if labels is None else LABEL_CODES[labels.dtype]),
        case.target,
        case.mask,
        ("int64", 0 if case.mask is None else case.mask.shape[0]),
        ("int32", ACTIVATIONS[case.activation]),
        ("int64", 0 if case.ignore_index is None else case.ignore_index),
        ("int32", int(case.ignore_index is not None)),
        case.table,
        ("int64", 0 if case.table is None else case.table.size),
        case.field_pred,
        case.field_sq_err,
    ]


def emulated_forward(emulator: Emulator, case: RegionCase) -> np.ndarray:
    batch, channels, _ = case.logits.shape
    out = np.full((batch, channels, NUM_SLOTS), np.nan, dtype=case.acc)
    args = [*_region_args(case), ("int32", 1), out]
    rc, outputs = emulator.call("segloss_emulated_region_stats", args, [len(args) - 1])
    assert rc == 0, f"region_stats_forward returned CUDA error {rc}"
    return outputs[len(args) - 1]


def emulated_backward(emulator: Emulator, case: RegionCase, upstream: np.ndarray, max_blocks: int = 0) -> np.ndarray:
    grad = np.full(case.logits.shape, np.nan, dtype=case.logits.dtype)
    args = [*_region_args(case), upstream.astype(case.acc), ("int64", max_blocks), grad]
    rc, outputs = emulator.call("segloss_emulated_region_stats_backward", args, [len(args) - 1])
    assert rc == 0, f"region_stats_backward returned CUDA error {rc}"
    return outputs[len(args) - 1]


def _torch_inputs(case: RegionCase) -> tuple[Any, ...]:
    import torch

    def tensor(a: np.ndarray | None) -> Any:
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a))

    mask = None if case.mask is None else tensor(case.mask[:, None, :])
    ignore = case.ignore_index
    activation = ACTIVATIONS[case.activation]
    ignore_value = 0 if ignore is None else ignore
    return (
        tensor(case.logits),
        tensor(case.labels),
        tensor(case.target),
        mask,
        activation,
        ignore_value,
        ignore is not None,
    )


def _torch_table(case: RegionCase) -> Any:
    import torch

    return None if case.table is None else torch.from_numpy(case.table)


def cpu_forward(ops: Any, case: RegionCase) -> np.ndarray:
    return ops.region_stats(*_torch_inputs(case), True, False, _torch_table(case), *_torch_fields(case)).numpy()


def cpu_backward(ops: Any, case: RegionCase, upstream: np.ndarray) -> np.ndarray:
    import torch

    up = torch.from_numpy(upstream.astype(case.acc))
    return ops.region_stats_backward(up, *_torch_inputs(case), _torch_table(case), *_torch_fields(case)).numpy()


def _torch_fields(case: RegionCase) -> tuple[Any, Any]:
    import torch

    return tuple(None if f is None else torch.from_numpy(f) for f in (case.field_pred, case.field_sq_err))


def _reference_names(case: RegionCase) -> dict[str, int]:
    from segloss_core.statistics import FUSED_FIELD_SLOTS, FUSED_SLOTS

    names = {n: FUSED_SLOTS[n] for n in FUSED_SLOTS if FUSED_SLOTS[n] < INVALID_SLOT}
    if case.field_pred is not None:
        names["field_pred_sum:phi"] = FUSED_FIELD_SLOTS["field_pred_sum"]
    if case.field_sq_err is not None:
        names["field_sq_err_sum:weight"] = FUSED_FIELD_SLOTS["field_sq_err_sum"]
    if case.activation == "softmax":
        names.pop("ce_neg", None)  # sigmoid/none only
    return names


def _prepared(case: RegionCase) -> Any:
    from segloss_core.validation import PreparedInputs

    channels = case.logits.shape[1]
    return PreparedInputs(
        pred=case.logits.astype(np.float64),
        labels=None if case.labels is None else case.labels.astype(np.int64),
        target=None if case.target is None else case.target.astype(np.float64),
        mask=None if case.mask is None else case.mask.astype(np.float64)[:, None, :],
        num_classes=channels,
        ignore_index=case.ignore_index,
        activation=case.activation,
        regions=case.regions,
        fields={
            name: field.astype(np.float64)
            for name, field in (("phi", case.field_pred), ("weight", case.field_sq_err))
            if field is not None
        },
    )


def reference_forward(case: RegionCase) -> dict[int, np.ndarray]:
    from segloss_core.reference import statistics as reference

    names = _reference_names(case)
    values, _ = reference.compute(_prepared(case), names)
    return {slot: values[name] for name, slot in names.items()}


def reference_backward(case: RegionCase, upstream: np.ndarray) -> np.ndarray:
    from segloss_core.reference import statistics as reference

    names = _reference_names(case)
    _, vjp = reference.compute(_prepared(case), names)
    return vjp({name: upstream[:, :, slot] for name, slot in names.items()})


def tolerance(case: RegionCase) -> dict[str, float]:
    return {"rtol": 1e-10, "atol": 1e-9} if case.logits.dtype == np.float64 else {"rtol": 2e-4, "atol": 2e-3}


def check_region_case(emulator: Emulator, ops: Any, case: RegionCase, seed: int = 1) -> None:
    """Forward and backward of the emulated CUDA kernels vs the CPU kernels and the float64 reference."""
    stats = emulated_forward(emulator, case)
    cpu = cpu_forward(ops, case)
    tol = tolerance(case)
    sums = [s for s in range(NUM_SLOTS) if s != INVALID_SLOT]
    np.testing.assert_allclose(stats[..., sums], cpu[..., sums], **tol)
    np.testing.assert_array_equal(stats[..., INVALID_SLOT], cpu[..., INVALID_SLOT])
    for slot, expected in reference_forward(case).items():
        np.testing.assert_allclose(stats[..., slot], expected, **tol, err_msg=f"slot {slot}")

    rng = np.random.default_rng(seed)
    upstream = rng.normal(size=stats.shape)
    if case.activation == "softmax":
        upstream[..., 7] = 0.0  # ce_neg: not a softmax statistic
    grad = emulated_backward(emulator, case, upstream)
    np.testing.assert_allclose(grad, cpu_backward(ops, case, upstream), **tol)
    np.testing.assert_allclose(grad, reference_backward(case, upstream), **tol)


@pytest.mark.parametrize("channels", [1, 2, 8, 9, 14])
@pytest.mark.parametrize("activation", ["softmax", "sigmoid", "none"])
def test_region_stats_class_groups(emulator, cpu_ops, channels, activation):
    """C on both sides of the class group (8): one group, a full group, a group of one, two groups."""
    ignore = 2 if channels > 2 else None  # a real class as ignore_index
    check_region_case(emulator, cpu_ops, region_case(channels, activation=activation, ignore_index=ignore))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("label_type", [np.int64, np.int32, np.uint8])
def test_region_stats_label_types_and_dtypes(emulator, cpu_ops, dtype, label_type):
    ignore = 255 if label_type == np.uint8 else -100
    case = region_case(9, dtype=dtype, label_type=label_type, ignore_index=ignore, mask_batch=2, seed=3)
    check_region_case(emulator, cpu_ops, case)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("activation", ["softmax", "sigmoid", "none"])
def test_region_stats_soft_targets_and_shared_mask(emulator, cpu_ops, dtype, activation):
    case = region_case(9, dtype=dtype, activation=activation, soft=True, mask_batch=1, seed=4)
    check_region_case(emulator, cpu_ops, case)


@pytest.mark.parametrize("fields", ["p", "e", "pe"])
@pytest.mark.parametrize(
    ("activation", "channels", "soft"), [("softmax", 9, False), ("sigmoid", 3, False), ("none", 2, True)]
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_region_stats_with_fields(emulator, cpu_ops, fields, activation, channels, soft, dtype):
    """The field statistics Σ w·p·φ and Σ w·(p − g)²·F (boundary, Hausdorff-DT) and their gradient,
    with ignored voxels, a mask, two class groups (C = 9)."""
    ignore = None if soft else 1
    case = region_case(
        channels,
        dtype=dtype,
        activation=activation,
        soft=soft,
        ignore_index=ignore,
        mask_batch=2,
        fields=fields,
        seed=11,
    )
    check_region_case(emulator, cpu_ops, case)


@pytest.mark.parametrize(
    ("voxels", "batch", "channels"),
    [(1, 1, 3), (37, 3, 9), (255, 2, 2), (256, 1, 9), (4096, 1, 2), (4097, 2, 8), (8193, 1, 14)],
    ids=lambda v: str(v),
)
def test_region_stats_volume_sizes_around_block_and_chunk(emulator, cpu_ops, voxels, batch, channels):
    """Volumes smaller than, equal to and one past the block (256) and the chunk (4096 voxels)."""
    case = region_case(channels, dtype=np.float32, voxels=voxels, batch=batch, ignore_index=0, seed=voxels)
    check_region_case(emulator, cpu_ops, case)


def test_region_stats_empty_volume_and_invalid_labels(emulator, cpu_ops):
    empty = region_case(3, voxels=0)
    np.testing.assert_array_equal(emulated_forward(emulator, empty), np.zeros((2, 3, NUM_SLOTS)))
    case = region_case(9, label_type=np.int32, ignore_index=-1, seed=5)
    case.labels[0, :17] = 9  # outside [0, C)
    case.labels[1, 3] = -7
    stats = emulated_forward(emulator, case)
    assert stats[0, 0, INVALID_SLOT] == 17 and stats[1, 0, INVALID_SLOT] == 1
    assert not stats[:, 1:, INVALID_SLOT].any()  # counted by the first class group only
    np.testing.assert_allclose(stats, cpu_forward(cpu_ops, case), rtol=1e-10, atol=1e-9)


def test_region_stats_backward_grid_stride_with_a_grid_smaller_than_the_volume(emulator, cpu_ops):
    """3 blocks of 256 threads for 2 · 5037 voxels: every thread takes 13 or 14 voxels."""
    case = region_case(14, dtype=np.float32, activation="sigmoid", ignore_index=3, mask_batch=2, seed=6)
    upstream = np.random.default_rng(7).normal(size=(2, 14, NUM_SLOTS))
    strided = emulated_backward(emulator, case, upstream, max_blocks=3)
    np.testing.assert_array_equal(strided, emulated_backward(emulator, case, upstream))
    np.testing.assert_allclose(strided, cpu_backward(cpu_ops, case, upstream), rtol=2e-4, atol=2e-3)


def test_region_stats_bitwise_deterministic(emulator):
    """The blocks run on several threads in any order; the fixed-order reductions give the same bits."""
    case = region_case(14, dtype=np.float32, voxels=9001, ignore_index=1, mask_batch=2, seed=8)
    upstream = np.random.default_rng(9).normal(size=(2, 14, NUM_SLOTS))
    first, second = emulated_forward(emulator, case), emulated_forward(emulator, case)
    assert first.tobytes() == second.tobytes()
    assert (
        emulated_backward(emulator, case, upstream).tobytes() == emulated_backward(emulator, case, upstream).tobytes()
    )


BRATS = ((1, 2, 3), (2, 3), (3,))


@pytest.mark.parametrize(
    "regions",
    [BRATS, ((1,), (2,), (1, 2)), ((0, 5), (3,), (1, 2, 4)), tuple((c,) for c in range(1, 10))],
    ids=["brats", "kits-like", "background-in-a-region", "nine-regions-two-groups"],
)
@pytest.mark.parametrize("activation", ["sigmoid", "none"])
def test_region_stats_regions(emulator, cpu_ops, regions, activation):
    """Region targets from the membership table (region-based training): vs the CPU kernels and the reference,
    with ignored voxels and an empty region; nine regions take two class groups."""
    case = region_case(len(regions), activation=activation, ignore_index=200, regions=regions, mask_batch=2, seed=10)
    check_region_case(emulator, cpu_ops, case)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("label_type", [np.int64, np.int32, np.uint8])
def test_region_stats_regions_label_types_and_volumes(emulator, cpu_ops, dtype, label_type):
    for voxels, batch in ((1, 1), (257, 2), (4097, 1)):
        case = region_case(3, dtype=dtype, label_type=label_type, activation="sigmoid", voxels=voxels, batch=batch,
                           ignore_index=255, regions=BRATS, seed=voxels)  # fmt: skip
        check_region_case(emulator, cpu_ops, case)


def test_region_stats_regions_all_ignored_and_labels_beyond_the_table(emulator, cpu_ops):
    """Every voxel ignored: every statistic 0. Labels beyond the table (or negative) are counted as invalid and
    weigh 0: no table entry is read for them (ASan would report a read past the table's end)."""
    case = region_case(3, activation="sigmoid", ignore_index=7, regions=BRATS, seed=11)
    case.labels[:] = 7
    stats = emulated_forward(emulator, case)
    np.testing.assert_array_equal(stats, np.zeros_like(stats))
    check_region_case(emulator, cpu_ops, case)
    case = region_case(3, label_type=np.int32, activation="sigmoid", regions=BRATS, seed=12)
    case.labels[0, :13] = 4  # one past the table
    case.labels[1, 5] = 1 << 30
    case.labels[1, 6] = -1
    stats = emulated_forward(emulator, case)
    assert stats[0, 0, INVALID_SLOT] == 13 and stats[1, 0, INVALID_SLOT] == 2
    np.testing.assert_allclose(stats, cpu_forward(cpu_ops, case), rtol=1e-10, atol=1e-9)
    upstream = np.random.default_rng(13).normal(size=stats.shape)
    np.testing.assert_allclose(
        emulated_backward(emulator, case, upstream), cpu_backward(cpu_ops, case, upstream), rtol=1e-10, atol=1e-9
    )


def test_region_stats_launch_configuration_errors(emulator):
    """More samples than the grid's z dimension (65535): cudaErrorInvalidConfiguration, nothing launched."""
    case = region_case(1, voxels=1, batch=65536)
    out = np.zeros((65536, 1, NUM_SLOTS))
    rc, _ = emulator.call("segloss_emulated_region_stats", [*_region_args(case), ("int32", 1), out], [])
    assert rc == CUDA_ERROR_INVALID_CONFIGURATION
    # float16/bfloat16 are not instantiated on the emulated target (csrc/kernels/cuda_target.cuh)
    args = _region_args(region_case(2, voxels=8, batch=1))
    args[1] = ("int32", 2)
    rc, _ = emulator.call("segloss_emulated_region_stats", [*args, ("int32", 1), np.zeros((1, 2, NUM_SLOTS))], [])
    assert rc == CUDA_ERROR_INVALID_VALUE


# ---------------------------------------------------------------------------------------------------
# distance maps


def emulated_distance_maps(
    emulator: Emulator,
    labels: np.ndarray,
    classes: int,
    spacing: tuple[float, ...],
    kind: int,
    *,
    masks: bool = False,
    ignore_index: int | None = None,
    no_boundary_value: float = 0.0,
) -> tuple[int, np.ndarray]:
    batch = labels.shape[0]
    spatial = labels.shape[2:] if masks else labels.shape[1:]
    out = np.full((batch, classes, *spatial), np.nan, dtype=np.float32)
    args = [
        labels,
        ("int32", 0 if masks else EDT_LABEL_CODES[labels.dtype]),
        ("int32", int(masks)),
        ("int64", batch),
        ("int64", classes),
        ("int32", len(spatial)),
        np.array(spatial, dtype=np.int64),
        np.array(spacing, dtype=np.float64),
        ("int32", kind),
        ("float32", no_boundary_value),
        ("int64", 0 if ignore_index is None else ignore_index),
        ("int32", int(ignore_index is not None)),
        out,
    ]
    rc, outputs = emulator.call("segloss_emulated_distance_maps", args, [len(args) - 1])
    return rc, outputs[len(args) - 1]


def label_maps_with_special_classes(shape: tuple[int, ...], classes: int, dtype: Any, seed: int) -> np.ndarray:
    """Blobs of classes 0..C-3 in sample 0, class C-2 a single voxel there, class C-1 absent everywhere;
    sample 1 all class 0 (full; every other class absent)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((2, *shape), dtype=np.int64)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    for c in range(1, classes - 2):
        center = np.array([rng.integers(0, s) for s in shape]).reshape(-1, *([1] * len(shape)))
        radius = rng.uniform(1.0, max(shape) / 2.5)
        labels[0][((grid - center) ** 2).sum(axis=0) <= radius**2] = c
    labels[0][tuple(s // 2 for s in shape)] = classes - 2
    return labels.astype(dtype)


def check_label_maps(emulator, cpu_ops, labels, classes, spacing, kinds=(0, 1, 3), ignore_index=None):
    import torch

    from segloss_core import distance_maps as reference

    names = reference.CONVENTIONS + reference.REGIONS
    for kind in kinds:
        rc, maps = emulated_distance_maps(emulator, labels, classes, spacing, kind, ignore_index=ignore_index)
        assert rc == 0, f"distance_maps returned CUDA error {rc}"
        cpu = cpu_ops.label_distance_maps(
            torch.from_numpy(labels), classes, list(spacing), kind, 0.0, ignore_index or 0, ignore_index is not None
        ).numpy()
        np.testing.assert_allclose(maps, cpu, rtol=1e-6, atol=1e-5, err_msg=names[kind])
        name = names[kind]
        int_labels = labels.astype(np.int64)
        if name in reference.CONVENTIONS:
            expected = reference.signed_distance_map(
                int_labels, classes, spacing, convention=name, ignore_index=ignore_index, reference=True
            )
        else:
            expected = reference.distance_map(
                int_labels, classes, spacing, region=name, ignore_index=ignore_index, reference=True
            )
        np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-4, err_msg=name)


@pytest.mark.parametrize(
    ("shape", "spacing", "label_type"),
    [
        ((37,), (0.7,), np.uint8),
        ((13, 9), (1.0, 1.0), np.int32),
        ((11, 9), (0.5, 2.0), np.int64),
        ((13, 9, 7), (0.8, 1.0, 2.5), np.int64),
    ],
    ids=["1d", "2d", "2d-anisotropic", "3d-anisotropic"],
)
def test_label_distance_maps(emulator, cpu_ops, shape, spacing, label_type):
    """Every kind where it is cheap (2D), three elsewhere; absent, full and single-voxel classes."""
    labels = label_maps_with_special_classes(shape, 5, label_type, seed=len(shape))
    kinds = range(6) if shape == (13, 9) else (0, 1, 3)
    check_label_maps(emulator, cpu_ops, labels, 5, spacing, kinds)


def test_label_distance_maps_with_ignore_index(emulator, cpu_ops):
    labels = label_maps_with_special_classes((9, 8, 5), 4, np.int64, seed=11)
    labels[0, 0, :, :] = 1
    check_label_maps(emulator, cpu_ops, labels, 4, (1.0, 1.5, 1.0), kinds=(1, 4), ignore_index=1)


def test_parabola_pass_grid_stride_beyond_its_thread_limit(emulator, cpu_ops):
    """2 · 6 maps × 900 lines along axis 0: more lines than the 8192 threads of an envelope pass."""
    labels = label_maps_with_special_classes((4, 30, 30), 6, np.int32, seed=12)
    check_label_maps(emulator, cpu_ops, labels, 6, (2.0, 1.0, 0.5), kinds=(1,))


@pytest.mark.parametrize("shape", [(23,), (9, 11), (7, 6, 5)], ids=["1d", "2d", "3d"])
def test_mask_distance_maps(emulator, cpu_ops, shape):
    """Masks (B, C, *S): random, empty, full, one voxel."""
    import torch

    from segloss_core import distance_maps as reference

    rng = np.random.default_rng(len(shape))
    masks = (rng.random((2, 4, *shape)) < 0.4).astype(np.uint8)
    masks[0, 1] = 0
    masks[0, 2] = 1
    masks[1, 3] = 0
    masks[1, 3][tuple(s // 2 for s in shape)] = 1
    spacing = tuple(1.0 + 0.5 * i for i in range(len(shape)))
    names = reference.CONVENTIONS + reference.REGIONS
    for kind in (0, 2, 3, 5):
        rc, maps = emulated_distance_maps(emulator, masks, 4, spacing, kind, masks=True, no_boundary_value=-1.0)
        assert rc == 0, f"distance_maps returned CUDA error {rc}"
        cpu = cpu_ops.mask_distance_maps(torch.from_numpy(masks), list(spacing), kind, -1.0).numpy()
        np.testing.assert_allclose(maps, cpu, rtol=1e-6, atol=1e-5, err_msg=names[kind])
        expected = reference.mask_distance_map(masks.astype(bool), spacing, kind=names[kind], no_boundary_value=-1.0)
        np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-4, err_msg=names[kind])


@pytest.mark.xfail(
    strict=False,
    reason="on two cores the emulated distance maps are wrong in some calls (see the emulator fixture); "
    "not yet known whether the HIP CPU Runtime or a race between blocks",
)
def test_distance_maps_on_every_core(every_core_emulator, cpu_ops):
    """The label-map and mask comparisons above, repeated with the runtime on every core."""
    for _ in range(3):
        for shape, spacing in (((37,), (0.7,)), ((13, 9), (1.0, 1.0)), ((13, 9, 7), (0.8, 1.0, 2.5))):
            labels = label_maps_with_special_classes(shape, 5, np.int64, seed=len(shape))
            check_label_maps(every_core_emulator, cpu_ops, labels, 5, spacing, kinds=(0,))


def test_distance_maps_bitwise_deterministic(emulator):
    labels = label_maps_with_special_classes((12, 10, 9), 5, np.int64, seed=13)
    first = emulated_distance_maps(emulator, labels, 5, (1.0, 0.5, 2.0), 0)[1]
    assert first.tobytes() == emulated_distance_maps(emulator, labels, 5, (1.0, 0.5, 2.0), 0)[1].tobytes()


def test_distance_maps_too_many_maps_for_the_grid(emulator):
    """The documented error (csrc/cuda/edt.h): cudaErrorInvalidConfiguration before any launch; the Python
    side refuses the same counts first (segloss_core.distance_maps.check_cuda_volumes)."""
    from segloss_core.distance_maps import CUDA_MAX_VOLUMES

    labels = np.zeros((CUDA_MAX_VOLUMES + 1, 1), dtype=np.uint8)
    assert emulated_distance_maps(emulator, labels, 2, (1.0,), 0)[0] == CUDA_ERROR_INVALID_CONFIGURATION
    masks = np.zeros((1, CUDA_MAX_VOLUMES + 1, 1), dtype=np.uint8)
    assert emulated_distance_maps(emulator, masks, CUDA_MAX_VOLUMES + 1, (1.0,), 0, masks=True)[0] == (
        CUDA_ERROR_INVALID_CONFIGURATION
    )


def test_ci_installs_tbb_and_requires_the_emulated_tests():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "apt-get install -y -qq libtbb-dev" in ci
    assert f"export {REQUIRE_ENV}=1" in ci
