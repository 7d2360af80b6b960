"""The NVRTC path of the torch backend, checked without a GPU.

- the signature table the launchers pack arguments by agrees with the kernels' source text;
- every launcher, run with a recording runner on CPU tensors, launches only kernels it compiled,
  with exactly each kernel's parameters, in range, in a valid launch configuration;
- every instantiation those launchers request compiles with NVRTC (cuda.core) for sm_80 and sm_90,
  and the cubin cache serves it again without compiling.

What needs a GPU (the launches themselves, values against the CPU kernels) is in tests/gpu,
run by tests/gpu/run_all.sh with SEGLOSS_CUDA_KERNELS=nvrtc.
"""

from __future__ import annotations

import re

import pytest

torch = pytest.importorskip("torch")

from segloss_csrc import nvrtc, source_dir  # noqa: E402
from segloss_torch import nvrtc_kernels, ops  # noqa: E402

DEVICE_SOURCES = ("kernels/region_stats_device.cuh", "kernels/edt_device.cuh")
C_KINDS = {"int64_t": "i64", "int": "i32", "bool": "bool", "double": "f64", "float": "f32"}


def _kernel_source() -> str:
    return "\n".join((source_dir() / name).read_text() for name in DEVICE_SOURCES)


def _kind_of(declaration: str) -> tuple[str, str]:
    """``const T* logits`` -> (``logits``, ``ptr``); ``int64_t voxels`` -> (``voxels``, ``i64``)."""
    name = re.split(r"[\s*&]+", declaration.strip())[-1]
    if "*" in declaration:
        return name, "ptr"
    words = declaration.replace("const ", "").split()
    return name, C_KINDS[words[0]]


def test_signature_table_matches_the_kernel_source():
    source = _kernel_source()
    declared = set(re.findall(r"__global__ void (?:__launch_bounds__\(\w+\) )?(\w+)\(", source))
    assert declared == set(nvrtc.SIGNATURES)
    for kernel, signature in nvrtc.SIGNATURES.items():
        parsed = [_kind_of(p) for p in nvrtc.declared_parameters(source, kernel)]
        assert parsed == list(signature), kernel


def test_launch_geometry_matches_the_sources():
    text = _kernel_source() + (source_dir() / "cuda" / "edt.cu").read_text()
    constants = dict(re.findall(r"constexpr int(?:64_t)? (k\w+) = (\d+);", text))
    assert nvrtc.LAUNCH["block"] == int(constants["kBlock"])
    assert nvrtc.LAUNCH["group"] == int(constants["kGroup"])
    assert nvrtc.LAUNCH["chunk"] == int(constants["kChunkVoxels"])
    assert nvrtc.LAUNCH["edt_block"] == int(constants["kEdtBlock"])
    assert nvrtc.LAUNCH["edt_max_threads"] == int(constants["kMaxThreads"])
    header = (source_dir() / "cuda" / "region_stats.h").read_text()
    assert re.search(r"max_backward_blocks = 1 << 20;", header) and nvrtc.LAUNCH["max_backward_blocks"] == 1 << 20


def test_pack_names_the_wrong_parameter():
    name = nvrtc.region_names("float32", "int64")["finish"]
    with pytest.raises(TypeError, match=r"missing \['out'\], unexpected \['output'\]"):
        nvrtc.pack(name, {"partials": 1, "batch": 1, "channels": 1, "groups": 1, "chunks": 1, "output": 2})
    packed = nvrtc.pack(name, {"partials": 1, "batch": 2, "channels": 3, "groups": 1, "chunks": 4, "out": 5})
    assert [type(v).__name__ for v in packed] == ["uint64", "int64", "int64", "int64", "int64", "uint64"]


class RecordingRunner:
    """Stands in for the GPU: records the kernels compiled and every launch."""

    def __init__(self):
        self.compiled: set[str] = set()
        self.launches: list[tuple[str, tuple[int, ...], int, int, dict]] = []

    def kernels(self, device, names):
        self.compiled.update(names.values())
        return dict(names)

    def launch(self, device, kernel, name, grid, block, shared, values):
        assert kernel == name
        self.launches.append((name, grid, block, shared, values))


LIMITS = {"i64": (-(2**63), 2**63 - 1), "i32": (-(2**31), 2**31 - 1), "ptr": (0, 2**64 - 1)}


def _check_launches(runner: RecordingRunner) -> None:
    assert runner.launches
    for name, grid, block, shared, values in runner.launches:
        assert name in runner.compiled
        packed = nvrtc.pack(name, values)  # exactly the declared parameters, or TypeError
        for (param, kind), value in zip(nvrtc.SIGNATURES[nvrtc.kernel_of(name)], packed, strict=True):
            raw = values[param]
            if kind in LIMITS:
                low, high = LIMITS[kind]
                assert isinstance(raw, int) and not isinstance(raw, bool) and low <= raw <= high, (name, param, raw)
                assert int(value) == raw
            elif kind == "bool":
                assert isinstance(raw, bool), (name, param, raw)
            else:
                assert isinstance(raw, float | int) and float(value) == pytest.approx(raw), (name, param, raw)
        assert 1 <= grid[0] <= 2**31 - 1 and all(1 <= g <= 65535 for g in grid[1:]), (name, grid)
        assert 1 <= block <= 1024 and 0 <= shared <= 48 * 1024


@pytest.fixture
def runner(monkeypatch):
    recording = RecordingRunner()
    monkeypatch.setattr(nvrtc_kernels, "_RUNNER", recording)
    return recording


REGION_CASES = [
    (dtype, labels, activation, mask)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    for labels in (torch.int64, torch.int32, torch.uint8, torch.int16, None)
    for activation in (0, 1)
    for mask in (None, "shared", "per-sample")
]


def _region_inputs(dtype, label_dtype, activation, mask_kind, channels=11, spatial=(9, 5)):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, channels, *spatial, generator=g).to(dtype)
    labels = target = mask = None
    if label_dtype is None:
        target = torch.rand(2, channels, *spatial, generator=g).to(dtype)
    else:
        labels = torch.randint(0, channels, (2, *spatial), generator=g).to(label_dtype)
    if mask_kind == "shared":
        mask = torch.rand(1, 1, *spatial, generator=g)
    elif mask_kind == "per-sample":
        mask = torch.rand(2, 1, *spatial, generator=g)
    return logits, labels, target, mask


@pytest.mark.parametrize(("dtype", "labels", "activation", "mask"), REGION_CASES)
def test_region_stats_launches_match_the_signatures(runner, dtype, labels, activation, mask):
    logits, lab, target, m = _region_inputs(dtype, labels, activation, mask)
    m = None if m is None else m.reshape(m.shape[0], -1)
    fields = (torch.randn(logits.shape), torch.rand(logits.shape)) if mask == "shared" else (None, None)
    has = labels is not None
    out = nvrtc_kernels.region_stats(logits, lab, target, m, activation, 255, has, True, False, None, *fields)
    assert out.shape == (2, 11, ops.FUSED_NUM_SLOTS) and out.dtype == ops.accumulation_dtype(dtype)
    grad = torch.zeros_like(out)
    back = nvrtc_kernels.region_stats_backward(grad, logits, lab, target, m, activation, 255, has, None, *fields)
    assert back.shape == logits.shape and back.dtype == logits.dtype
    _check_launches(runner)
    kernels = [nvrtc.kernel_of(name) for name, *_ in runner.launches]
    assert kernels == ["region_stats_partials_kernel", "region_stats_finish_kernel", "region_stats_backward_kernel"]
    _, grid, *_ = runner.launches[0]
    assert grid == (2, 1, 2)  # one chunk of 45 voxels × ⌈11/8⌉ class groups, batch 2


@pytest.mark.parametrize("spatial", [(7,), (6, 5), (4, 3, 5)])
@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32, torch.uint8, torch.int16])
def test_distance_map_launches_match_the_signatures(runner, spatial, label_dtype):
    labels = torch.randint(0, 3, (2, *spatial)).to(label_dtype)
    spacing = [1.0 + 0.5 * i for i in range(len(spatial))]
    maps = nvrtc_kernels.label_distance_maps(labels, 3, spacing, 0, 0.0, 255, True)
    assert maps.shape == (2, 3, *spatial) and maps.dtype == torch.float32
    masks = torch.rand(2, 2, *spatial) > 0.5
    assert nvrtc_kernels.mask_distance_maps(masks, spacing, 1, 0.0).shape == masks.shape
    _check_launches(runner)
    parabola_passes = [v for name, *_, v in runner.launches if "parabola" in name]
    assert len(parabola_passes) == 3 * (len(spatial) - 1)  # inside, outside, masks: one per axis but the last


def _requested(monkeypatch) -> set[str]:
    """Every instantiation the torch launchers ask for, over all dtypes, label types and shapes."""
    recording = RecordingRunner()
    monkeypatch.setattr(nvrtc_kernels, "_RUNNER", recording)
    for dtype, labels, activation, mask in REGION_CASES:
        logits, lab, target, m = _region_inputs(dtype, labels, activation, mask, channels=3, spatial=(4,))
        m = None if m is None else m.reshape(m.shape[0], -1)
        out = nvrtc_kernels.region_stats(logits, lab, target, m, activation, 0, False, True, False)
        nvrtc_kernels.region_stats_backward(torch.zeros_like(out), logits, lab, target, m, activation, 0, False)
    for label_dtype in (torch.int64, torch.int32, torch.uint8):
        nvrtc_kernels.label_distance_maps(torch.zeros(1, 4, 4, dtype=label_dtype), 2, [1.0, 1.0], 0, 0.0, 0, False)
    nvrtc_kernels.mask_distance_maps(torch.zeros(1, 1, 4, 4, dtype=torch.bool), [1.0, 1.0], 0, 0.0)
    return recording.compiled


def test_nvrtc_compiles_every_instantiation_the_torch_path_requests(tmp_path, monkeypatch):
    reason = nvrtc.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    requested = _requested(monkeypatch)
    names = nvrtc.all_kernel_names()
    assert requested <= set(names) and len(requested) >= 20
    for arch in ("sm_80", "sm_90"):
        compiled = nvrtc.compile_module(names, arch)
        assert set(compiled.lowered) == set(names) and compiled.cubin[:4] == b"\x7fELF"
        assert compiled.path.read_bytes() == compiled.cubin
        for name, lowered in compiled.lowered.items():
            assert lowered.startswith("_Z") and nvrtc.kernel_of(name) in lowered


def test_the_cubin_cache_is_keyed_and_reused(tmp_path, monkeypatch):
    reason = nvrtc.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    monkeypatch.setenv("SEGLOSS_BUILD_DIR", str(tmp_path))
    monkeypatch.setattr(nvrtc, "_MEMO", {})
    names = sorted(nvrtc.edt_names("int32").values())
    first = nvrtc.compile_module(names, "sm_80")
    assert first.path.parent == tmp_path / "nvrtc"
    monkeypatch.setattr(nvrtc, "_MEMO", {})

    def refuse(*args):
        raise AssertionError("served from the disk cache: no compile")

    monkeypatch.setattr(nvrtc, "_compile", refuse)
    again = nvrtc.compile_module(names, "sm_80")
    assert again.cubin == first.cubin and again.lowered == first.lowered
    with pytest.raises(AssertionError, match="no compile"):
        nvrtc.compile_module(names, "sm_90")  # another architecture is another cubin
    assert not list((tmp_path / "nvrtc").glob(".*"))  # no temporary file left behind


def test_a_failed_cache_write_leaves_no_cubin_and_the_next_call_compiles(tmp_path, monkeypatch):
    """csrc/nvrtc.py: the cache is written atomically, the cubin last, so a cubin on disk always has
    its names; a write that fails leaves no cubin and no temporary file, and is redone next time."""
    reason = nvrtc.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    monkeypatch.setenv("SEGLOSS_BUILD_DIR", str(tmp_path))
    monkeypatch.setattr(nvrtc, "_MEMO", {})
    compiles = []
    monkeypatch.setattr(nvrtc, "_compile", lambda names, arch: compiles.append(arch) or (b"cubin", {"k": "_Zk"}))
    real_fdopen = nvrtc.os.fdopen

    class FailingWrite:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            self.handle.write(data[:2])  # part of it reached the disk
            raise OSError(28, "No space left on device")

    names = sorted(nvrtc.edt_names("int32").values())
    calls = {"n": 0}

    def second_write_fails(fd, mode):
        calls["n"] += 1
        handle = real_fdopen(fd, mode)
        return FailingWrite(handle) if calls["n"] == 2 else handle  # the names are written, the cubin fails

    monkeypatch.setattr(nvrtc.os, "fdopen", second_write_fails)
    with pytest.raises(OSError, match="No space left"):
        nvrtc.compile_module(names, "sm_80")
    left = sorted(p.name for p in (tmp_path / "nvrtc").iterdir())
    assert len(left) == 1 and left[0].endswith(".json"), left  # names alone; no cubin, no temporary
    monkeypatch.setattr(nvrtc.os, "fdopen", real_fdopen)
    compiled = nvrtc.compile_module(names, "sm_80")  # a names file alone is not a cache hit
    assert compiled.cubin == b"cubin" and compiles == ["sm_80", "sm_80"]
    assert sorted(p.suffix for p in (tmp_path / "nvrtc").iterdir()) == [".cubin", ".json"]
