"""segloss against its peers, in one process, on the same inputs: time and extra peak memory.

    python benchmarks/compare.py                  # CPU, the default workloads
    python benchmarks/compare.py --quick          # small shapes (a smoke run)
    python benchmarks/compare.py --json out.json  # also write the results as JSON
    python benchmarks/compare.py --device cuda    # on a GPU
    python benchmarks/compare.py --dtype bfloat16 --only "segloss native" --only MONAI --only floor
    python benchmarks/compare.py --threads 1      # one thread: on a machine other processes load
    python benchmarks/compare.py --workload boundary_precomputed --workload hausdorff_dt  # distance losses
    python benchmarks/compare.py --workload boundary_on_the_fly   # φ each step, against a fused Dice+CE step

On a loaded machine (load average above the core count) every multi-threaded torch op waits for
its threads to be scheduled, so an implementation of many small ops (segloss native: a few dozen
per chunk of voxels) pays per op what one of few large ops (MONAI) pays once; ``--threads 1``
compares the work itself.

Every workload is one training step of the loss alone — forward and backward on the same logits and
labels — plus the forward alone. Times are the median of ``--repeat`` runs after ``--warmup`` runs;
on the CPU they come from a child process with glibc's default allocator settings
(``--same-process-times``: from this one), as a training process runs: the fixed mmap threshold of
the memory measurement makes every block above 128 KiB a fresh mapping whose pages fault in on first
touch, which would charge code of many mid-size temporaries (the chunked native path) for page
faults it does not have in training. *Extra peak memory* is the peak resident memory (CPU: VmHWM,
reset through /proc/self/clear_refs before each run; CUDA: max_memory_allocated) above what was in
use before the step (the freed blocks the fused CPU kernels keep for reuse,
``segloss_torch.fused.host_cache_bytes``, unmapped first), as a multiple of the logits' size: 1.0 is
the gradient itself, the least any loss can allocate. The *floor* row is ``(x * 1.0).sum()`` forward
+ backward: it does nothing but read the logits, allocate and write a gradient. On CUDA, *% copy bw*
relates each step to the device's measured copy bandwidth (``y.copy_(x)`` on the logits): the bytes
a fused step must move (read the logits and labels in the forward and again in the backward, write
the gradient) divided by the step's time, as a percentage of that bandwidth. Output format:
docs/benchmarks.md.

The distance workloads run on smooth multi-class blobs (not voxel noise: a map of noise labels
has no long distances), each at its own shape: ``boundary_precomputed`` (2×4×128³; φ from
``signed_distance_map`` once, outside the timing; peer: the LIVIAETS boundary-loss form
``einsum("bkxyz,bkxyz->bkxyz", softmax(x)[:, idc], φ[:, idc]).mean()``), ``hausdorff_dt`` and
``log_hausdorff_dt`` (1×4×96³; peer: MONAI's HausdorffDTLoss / LogHausdorffDTLoss, the maps of
prediction and target computed every step by every implementation), and ``boundary_on_the_fly``
(2×4×128³; φ computed by the loss from the labels every step; the peer row is the fused Dice+CE
step it is added to in training, measured in the same run: the *speed-up vs peer* column is then
1 / (boundary step ÷ Dice+CE step), e.g. 0.25× for a boundary step of 4 Dice+CE steps; the row
*signed maps alone* is ``signed_distance_map`` of the labels, no backward).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

# glibc keeps freed memory for reuse unless large blocks are always mmap'd: fix the threshold so
# that freed tensors leave the resident set and each run's peak is its own. (The times come from a
# child process with glibc's default settings, TIMES_CHILD: see main.)
if (
    "MALLOC_MMAP_THRESHOLD_" not in os.environ
    and sys.platform.startswith("linux")
    and "SEGLOSS_COMPARE_TIMES_CHILD" not in os.environ
):
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch

from segloss_core import get_loss
from segloss_torch import fused

warnings.simplefilter("ignore")

TIMES_CHILD = "SEGLOSS_COMPARE_TIMES_CHILD"  # set in the child process that measures the CPU times


@dataclass
class Result:
    workload: str
    shape: str
    implementation: str
    forward_backward_ms: float
    forward_ms: float
    extra_peak_mb: float
    extra_peak_x_logits: float
    speedup_vs_peer: float | None = None
    memory_ratio_vs_peer: float | None = None  # the peer's extra peak memory / this row's
    peer: str | None = None
    percent_of_copy_bandwidth: float | None = None  # CUDA only: minimal bytes / time vs a device copy


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def measure_peak(fn: Callable[[], None], device: str) -> float:
    """Extra peak bytes of one call of ``fn`` above the memory in use before it."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - before)
    # the freed blocks the fused CPU kernels keep for reuse (segloss_torch.fused.host_cache_bytes) are
    # unmapped first: resident, they would hide the step's own blocks, or count against another row
    fused.empty_host_cache()
    _reset_peak()
    before = _rss_kb("VmRSS:")
    fn()
    return float(_rss_kb("VmHWM:") - before) * 1024.0


def median_ms(fn: Callable[[], None], device: str, warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return 1e3 * statistics.median(samples)


def _cupy_loss(workload: str) -> Callable | None:
    """The CuPy backend on the same CUDA tensors (zero-copy through DLPack), or None without CuPy.

    CuPy allocates through torch's caching allocator here, so ``max_memory_allocated`` sees its
    memory and the extra-peak column compares like with like. With ``requires_grad`` logits the
    call is ``value_and_grad`` (a training step), otherwise the forward alone."""
    try:
        import cupy

        from segloss_core import list_backends

        if not any(b.name == "cupy" and b.available for b in list_backends()):
            return None
        from segloss_cupy import use_torch_allocator

        use_torch_allocator()
        loss = get_loss(workload, backend="cupy")
    except Exception as exc:  # noqa: BLE001 - a benchmark row, never a failure of the run
        print(f"segloss cupy row skipped: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None

    def call(x: torch.Tensor, y: torch.Tensor) -> None:
        xc, yc = cupy.from_dlpack(x.detach()), cupy.from_dlpack(y)
        if x.requires_grad:
            loss.value_and_grad(xc, yc)
        else:
            loss(xc, yc)

    return call


REGION_WORKLOADS = ("dice", "dice_ce")
DISTANCE_SHAPES: dict[str, tuple[int, ...]] = {
    "boundary_precomputed": (2, 4, 128, 128, 128),
    "boundary_on_the_fly": (2, 4, 128, 128, 128),
    "hausdorff_dt": (1, 4, 96, 96, 96),
    "log_hausdorff_dt": (1, 4, 96, 96, 96),
}
FUSED_DICE_CE = "segloss fused dice_ce"
# the peer of the speed-up columns (else MONAI); boundary_on_the_fly's is the fused Dice+CE step it is
# added to in training (its "speed-up" is then 1 / the cost of the boundary step in Dice+CE steps)
PEERS = {"boundary_precomputed": "LIVIAETS einsum", "boundary_on_the_fly": FUSED_DICE_CE}


def blob_inputs(shape: tuple[int, ...], device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of smooth multi-class blobs: labels the argmax of upsampled coarse noise
    (objects a few voxels to tens of voxels across), logits N(0, 1) + 3 on each voxel's label."""
    g = torch.Generator().manual_seed(seed)
    batch, channels, *spatial = shape
    coarse = torch.randn(batch, channels, *(max(2, s // 16) for s in spatial), generator=g)
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(spatial)]
    labels = torch.nn.functional.interpolate(coarse, size=tuple(spatial), mode=mode).argmax(1)
    logits = torch.randn(shape, generator=g)
    logits.scatter_add_(1, labels[:, None], torch.full_like(labels[:, None], 3.0, dtype=torch.float32))
    return logits.contiguous().to(device), labels.to(device)


def _distance_implementations(workload: str, channels: int, labels: torch.Tensor) -> dict[str, Callable[[], Callable]]:
    impls: dict[str, Callable[[], Callable]] = {}
    if workload == "boundary_precomputed":
        from segloss_torch import signed_distance_map

        phi = signed_distance_map(labels, channels)  # the map of `segloss distmap`: not timed
        idc = list(range(1, channels))  # SurfaceLoss(idc=[1, …]), as segloss's include_background=False
        for impl in ("fused", "native"):
            impls[f"segloss {impl}"] = lambda impl=impl: (lambda module: lambda x, y: module(x, y, distance_map=phi))(
                get_loss("boundary", backend="torch", impl=impl)
            )
        impls["LIVIAETS einsum"] = lambda: (
            lambda x, y: torch.einsum("bkxyz,bkxyz->bkxyz", torch.softmax(x, 1)[:, idc], phi[:, idc]).mean()
        )
    elif workload == "boundary_on_the_fly":
        from segloss_torch import signed_distance_map

        for impl in ("fused", "native"):
            impls[f"segloss {impl}"] = lambda impl=impl: get_loss("boundary", backend="torch", impl=impl)
        impls[FUSED_DICE_CE] = lambda: get_loss("dice_ce", backend="torch", impl="fused")
        # the maps alone (what the loss computes first), no backward
        impls["signed maps alone"] = lambda: lambda x, y: (signed_distance_map(y, channels), None)[1]
    else:
        for impl in ("fused", "native"):
            impls[f"segloss {impl}"] = lambda impl=impl: get_loss(workload, backend="torch", impl=impl)
        try:
            from monai.losses import HausdorffDTLoss, LogHausdorffDTLoss

            peer = (HausdorffDTLoss if workload == "hausdorff_dt" else LogHausdorffDTLoss)(
                softmax=True, to_onehot_y=True
            )
            impls["MONAI"] = lambda: lambda x, y: peer(x, y[:, None])
        except ImportError:
            pass
    impls["floor (x*1).sum()"] = lambda: lambda x, y: (x * 1.0).sum()
    return impls


def _implementations(workload: str, channels: int, device: str = "cpu") -> dict[str, Callable[[], Callable]]:
    """name -> factory of a callable loss(logits, labels) for this (region) workload."""
    impls: dict[str, Callable[[], Callable]] = {}
    name = workload
    impls["segloss fused"] = lambda: get_loss(name, backend="torch", impl="fused")
    impls["segloss native"] = lambda: get_loss(name, backend="torch", impl="native")
    if device == "cuda":
        cupy_call = _cupy_loss(workload)
        if cupy_call is not None:
            impls["segloss cupy"] = lambda: cupy_call
    try:
        from monai.losses import DiceCELoss, DiceLoss

        if workload == "dice":
            monai = DiceLoss(softmax=True, to_onehot_y=True)
        else:
            monai = DiceCELoss(softmax=True, to_onehot_y=True)
        impls["MONAI"] = lambda: lambda x, y: monai(x, y[:, None])
    except ImportError:
        pass
    try:
        from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
        from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
        from nnunetv2.utilities.helpers import softmax_helper_dim1

        kwargs = {"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}
        if workload == "dice":
            nnunet = MemoryEfficientSoftDiceLoss(softmax_helper_dim1, **kwargs)
        else:
            nnunet = DC_and_CE_loss(kwargs, {}, dice_class=MemoryEfficientSoftDiceLoss)
        impls["nnU-Net"] = lambda: lambda x, y: nnunet(x, y[:, None])
    except ImportError:
        pass
    impls["floor (x*1).sum()"] = lambda: lambda x, y: (x * 1.0).sum()
    return impls


def copy_bandwidth(x: torch.Tensor, warmup: int, repeat: int) -> float:
    """Bytes per second of ``y.copy_(x)`` (one read and one write of ``x``) on x's device."""
    y = torch.empty_like(x)
    seconds = median_ms(lambda: y.copy_(x), x.device.type, warmup, repeat) / 1e3
    return 2 * x.numel() * x.element_size() / seconds


def run(
    shapes: list[tuple[int, ...]],
    workloads: list[str],
    device: str,
    warmup: int,
    repeat: int,
    dtype: torch.dtype = torch.float32,
    only: list[str] | None = None,
    times: bool = True,
    memory: bool = True,
    distance_shapes: dict[str, tuple[int, ...]] | None = None,
) -> list[Result]:
    """Rows for every shape × region workload and every distance workload (at its shape in
    ``distance_shapes``, default :data:`DISTANCE_SHAPES`) × implementation (those whose name starts
    with one of ``only``, when given), logits in ``dtype``; without ``times`` (``memory``) those
    columns are 0."""
    distance_shapes = distance_shapes or {}
    results: list[Result] = []
    cases = [(shape, w) for shape in shapes for w in workloads if w in REGION_WORKLOADS]
    cases += [(distance_shapes.get(w, DISTANCE_SHAPES[w]), w) for w in workloads if w in DISTANCE_SHAPES]
    for shape, workload in cases:
        torch.manual_seed(0)
        if workload in DISTANCE_SHAPES:
            logits, labels = blob_inputs(shape, device)
            logits = logits.to(dtype)
            implementations = _distance_implementations(workload, shape[1], labels)
        else:
            logits = torch.randn(*shape, device=device).to(dtype)
            labels = torch.randint(0, shape[1], (shape[0], *shape[2:]), device=device)
            implementations = _implementations(workload, shape[1], device)
        logit_bytes = logits.numel() * logits.element_size()
        label_bytes = labels.numel() * labels.element_size()
        minimal_bytes = 3 * logit_bytes + 2 * label_bytes  # fwd read, bwd read, gradient write
        bandwidth = copy_bandwidth(logits, warmup, repeat) if device == "cuda" else None
        rows: list[Result] = []
        for impl, factory in implementations.items():
            if only and not any(impl.startswith(prefix) for prefix in only):
                continue
            loss = factory()

            def step(loss=loss, logits=logits, labels=labels) -> None:
                x = logits.detach().requires_grad_(True)
                out = loss(x, labels)
                if out is not None:  # the CuPy row computes value and gradient in one call (the maps row: none)
                    out.backward()

            def forward(loss=loss, logits=logits, labels=labels) -> None:
                with torch.no_grad():
                    loss(logits, labels)

            step()  # build, allocator warm-up
            peak = measure_peak(step, device) if memory else 0.0
            rows.append(
                Result(
                    workload=workload,
                    shape="x".join(map(str, shape)),
                    implementation=impl,
                    forward_backward_ms=median_ms(step, device, warmup, repeat) if times else 0.0,
                    forward_ms=median_ms(forward, device, warmup, repeat) if times else 0.0,
                    extra_peak_mb=peak / 2**20,
                    extra_peak_x_logits=peak / logit_bytes,
                )
            )
            if bandwidth is not None:
                rows[-1].percent_of_copy_bandwidth = minimal_bytes / bandwidth  # × 100 / seconds below
        results.extend(rows)
    return results


def compare_to_peer(results: list[Result]) -> None:
    """Speed-up and memory saving of every row against its peer's row of the same workload and shape
    (MONAI, or :data:`PEERS`);
    on CUDA the % of copy bandwidth (``run`` left the minimal seconds at full bandwidth there)."""
    for r in results:
        if r.percent_of_copy_bandwidth is not None and r.forward_backward_ms > 0:
            r.percent_of_copy_bandwidth = 100 * r.percent_of_copy_bandwidth / (r.forward_backward_ms / 1e3)
        name = PEERS.get(r.workload, "MONAI")
        peer = next(
            (p for p in results if p.implementation == name and (p.workload, p.shape) == (r.workload, r.shape)),
            None,
        )
        if peer is not None and r is not peer:
            r.speedup_vs_peer = peer.forward_backward_ms / max(r.forward_backward_ms, 1e-9)
            r.memory_ratio_vs_peer = peer.extra_peak_x_logits / max(r.extra_peak_x_logits, 1e-9)
            r.peer = name


def child_times(argv: list[str]) -> dict[tuple[str, str, str], tuple[float, float]]:
    """(fwd+bwd ms, fwd ms) per (workload, shape, implementation) from a child process that runs
    with glibc's default allocator settings (no fixed mmap threshold)."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    env[TIMES_CHILD] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "times.json")
        subprocess.run(
            [sys.executable, os.path.abspath(__file__), *argv, "--json", path],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        with open(path) as f:
            rows = json.load(f)["results"]
    return {(r["workload"], r["shape"], r["implementation"]): (r["forward_backward_ms"], r["forward_ms"]) for r in rows}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def format_table(results: list[Result], device: str) -> str:
    cuda = device == "cuda"
    head = (
        "| workload | shape (B×C×D×H×W) | implementation | fwd+bwd ms | fwd ms | extra peak MB | × logits "
        "| speed-up vs peer | memory saving vs peer |" + (" % copy bw |" if cuda else "")
    )
    lines = [
        f"device: {device} — {machine() if device == 'cpu' else torch.cuda.get_device_name()}",
        "",
        head,
        "|---|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if cuda else ""),
    ]
    for r in results:
        speed = f"{r.speedup_vs_peer:.1f}×" if r.speedup_vs_peer is not None else "—"
        memory = f"{r.memory_ratio_vs_peer:.2f}×" if r.memory_ratio_vs_peer is not None else "—"
        bw = f" {r.percent_of_copy_bandwidth:.0f} % |" if cuda and r.percent_of_copy_bandwidth is not None else ""
        lines.append(
            f"| {r.workload} | {r.shape} | {r.implementation} | {r.forward_backward_ms:.1f} | {r.forward_ms:.1f} "
            f"| {r.extra_peak_mb:.0f} | {r.extra_peak_x_logits:.2f} | {speed} | {memory} |{bw}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats (smoke run)")
    parser.add_argument("--workload", action="append", choices=(*REGION_WORKLOADS, *DISTANCE_SHAPES))
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "float64"))
    parser.add_argument(
        "--only", action="append", metavar="PREFIX", help="only implementations named so (repeatable), e.g. MONAI"
    )
    parser.add_argument(
        "--threads", type=int, help="torch.set_num_threads for every row (default: torch's); 1 on a loaded machine"
    )
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument(
        "--same-process-times",
        action="store_true",
        help="time in this process, under the fixed mmap threshold of the memory measurement",
    )
    args = parser.parse_args(argv)
    child = TIMES_CHILD in os.environ
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    shapes = [(2, 4, 32, 32, 32)] if args.quick else [(2, 4, 128, 128, 128), (1, 14, 128, 128, 128)]
    repeat = 2 if args.quick else args.repeat
    # CPU times from a child with glibc's default allocator (unless --same-process-times): the fixed
    # mmap threshold makes every allocation above 128 KiB a fresh mapping whose pages fault in on first
    # touch, which a training process (whose threshold adapts upwards) does not pay for mid-size blocks
    separate = args.device == "cpu" and not args.same_process_times and not child
    quick_distance = {w: (1, 4, 24, 24, 24) for w in DISTANCE_SHAPES} if args.quick else None
    results = run(
        shapes,
        args.workload or list(REGION_WORKLOADS),
        args.device,
        1 if args.quick else args.warmup,
        repeat,
        getattr(torch, args.dtype),
        args.only,
        times=not separate,
        memory=not child,
        distance_shapes=quick_distance,
    )
    if separate:
        given = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--json=")]
        if "--json" in given:
            at = given.index("--json")
            del given[at : at + 2]
        times = child_times(given)
        for r in results:
            r.forward_backward_ms, r.forward_ms = times[(r.workload, r.shape, r.implementation)]
    compare_to_peer(results)
    print(f"logits: {args.dtype}")
    print(format_table(results, args.device))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine": machine(),
                    "device": args.device,
                    "dtype": args.dtype,
                    "results": [asdict(r) for r in results],
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
