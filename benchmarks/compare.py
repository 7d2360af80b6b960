"""segloss against its peers, in one process, on the same inputs: time and extra peak memory.

    python benchmarks/compare.py                  # CPU, the default workloads
    python benchmarks/compare.py --quick          # small shapes (a smoke run)
    python benchmarks/compare.py --json out.json  # also write the results as JSON
    python benchmarks/compare.py --device cuda    # on a GPU

Every workload is one training step of the loss alone — forward and backward on the same logits
and labels — plus the forward alone. Times are the median of ``--repeat`` runs after
``--warmup`` runs. *Extra peak memory* is the peak resident memory (CPU: VmHWM, reset through
/proc/self/clear_refs before each run; CUDA: max_memory_allocated) above what was in use before
the step, as a multiple of the logits' size: 1.0 is the gradient itself, the least any loss can
allocate. The *floor* row is ``(x * 1.0).sum()`` forward + backward: it does nothing but read the
logits, allocate and write a gradient. Output format: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

# glibc keeps freed memory for reuse unless large blocks are always mmap'd: fix the threshold so
# that freed tensors leave the resident set and each run's peak is its own.
if "MALLOC_MMAP_THRESHOLD_" not in os.environ and sys.platform.startswith("linux"):
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch

from segloss_core import get_loss

warnings.simplefilter("ignore")


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
    peer: str | None = None


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


def _implementations(workload: str, channels: int) -> dict[str, Callable[[], Callable]]:
    """name -> factory of a callable loss(logits, labels) for this workload."""
    impls: dict[str, Callable[[], Callable]] = {}
    name = workload
    impls["segloss fused"] = lambda: get_loss(name, backend="torch", impl="fused")
    impls["segloss native"] = lambda: get_loss(name, backend="torch", impl="native")
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


def run(shapes: list[tuple[int, ...]], workloads: list[str], device: str, warmup: int, repeat: int) -> list[Result]:
    results: list[Result] = []
    for shape in shapes:
        torch.manual_seed(0)
        logits = torch.randn(*shape, device=device)
        labels = torch.randint(0, shape[1], (shape[0], *shape[2:]), device=device)
        logit_bytes = logits.numel() * logits.element_size()
        for workload in workloads:
            rows: list[Result] = []
            for impl, factory in _implementations(workload, shape[1]).items():
                loss = factory()

                def step(loss=loss, logits=logits, labels=labels) -> None:
                    x = logits.detach().requires_grad_(True)
                    loss(x, labels).backward()

                def forward(loss=loss, logits=logits, labels=labels) -> None:
                    with torch.no_grad():
                        loss(logits, labels)

                step()  # build, allocator warm-up
                peak = measure_peak(step, device)
                rows.append(
                    Result(
                        workload=workload,
                        shape="x".join(map(str, shape)),
                        implementation=impl,
                        forward_backward_ms=median_ms(step, device, warmup, repeat),
                        forward_ms=median_ms(forward, device, warmup, repeat),
                        extra_peak_mb=peak / 2**20,
                        extra_peak_x_logits=peak / logit_bytes,
                    )
                )
            peer = next((r for r in rows if r.implementation == "MONAI"), None)
            for r in rows:
                if peer is not None and r is not peer:
                    r.speedup_vs_peer = peer.forward_backward_ms / r.forward_backward_ms
                    r.peer = "MONAI"
            results.extend(rows)
    return results


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def format_table(results: list[Result], device: str) -> str:
    head = (
        "| workload | shape (B×C×D×H×W) | implementation | fwd+bwd ms | fwd ms | extra peak MB | × logits "
        "| speed-up vs MONAI |"
    )
    lines = [
        f"device: {device} — {machine() if device == 'cpu' else torch.cuda.get_device_name()}",
        "",
        head,
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        speed = f"{r.speedup_vs_peer:.1f}×" if r.speedup_vs_peer is not None else "—"
        lines.append(
            f"| {r.workload} | {r.shape} | {r.implementation} | {r.forward_backward_ms:.1f} | {r.forward_ms:.1f} "
            f"| {r.extra_peak_mb:.0f} | {r.extra_peak_x_logits:.2f} | {speed} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats (smoke run)")
    parser.add_argument("--workload", action="append", choices=("dice", "dice_ce"))
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    shapes = [(2, 4, 32, 32, 32)] if args.quick else [(2, 4, 128, 128, 128), (1, 14, 128, 128, 128)]
    repeat = 2 if args.quick else args.repeat
    results = run(shapes, args.workload or ["dice", "dice_ce"], args.device, 1 if args.quick else args.warmup, repeat)
    print(format_table(results, args.device))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"machine": machine(), "device": args.device, "results": [asdict(r) for r in results]}, f, indent=2
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
