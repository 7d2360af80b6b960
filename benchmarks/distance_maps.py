"""Signed distance maps of a realistic 3D label volume: segloss against scipy, seung-lab edt, cupyx.

    python benchmarks/distance_maps.py                    # CPU: 128³ and 256³, isotropic and anisotropic
    python benchmarks/distance_maps.py --quick            # 64³ only
    python benchmarks/distance_maps.py --device cuda      # GPU: segloss vs cupyx per class
    python benchmarks/distance_maps.py --json out.json
    python benchmarks/distance_maps.py --size 128 --spacing anisotropic --threads 2   # one row set

The volume has K = 4 classes made of smooth blobs (a large organ, two touching structures and
background), like a medical label map, not noise. Every implementation computes the signed
maps of all K classes in the boundary-loss convention (LIVIAETS ``one_hot2dist``):
scipy's ``distance_transform_edt`` called per class (twice: inside and outside, as
``one_hot2dist``), seung-lab ``edt.edt`` per class (``parallel`` = all cores), cupyx per class
on the GPU, and ``segloss_torch.signed_distance_map`` (one batched call). Median of
``--repeat`` runs after one warm-up; the ``cpu ms`` column is the process's CPU time of the same
runs (all threads), which a loaded machine disturbs less than the wall time, and the header gives
the load average. Every result is compared with scipy's float64 maps: the
``max |error|`` column, and the exit status is 1 when an error exceeds ``--tolerance`` (relative to
the largest distance; default 1e-5, several float32 roundings), so a fast wrong answer cannot pass.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial

import numpy as np


@dataclass
class Result:
    shape: str
    spacing: str
    implementation: str
    ms: float
    max_abs_error: float
    speedup_vs_scipy: float | None = None
    cpu_ms: float | None = None


def blob_volume(size: int, seed: int = 0) -> np.ndarray:
    """A (size,)*3 label map with 4 classes of smooth blobs."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, size, dtype=np.float32)] * 3, indexing="ij"))
    labels = np.zeros((size,) * 3, dtype=np.int64)

    def blob(centre, radii, wobble):
        r = (
            (
                (grid - np.asarray(centre, np.float32)[:, None, None, None])
                / np.asarray(radii, np.float32)[:, None, None, None]
            )
            ** 2
        ).sum(0)
        return r < 1 + wobble * np.sin(5 * grid[0] + 3 * grid[1]) * np.cos(4 * grid[2])

    labels[blob((0.0, 0.0, 0.0), (0.7, 0.55, 0.6), 0.15)] = 1
    labels[blob((0.25, -0.1, 0.1), (0.25, 0.3, 0.2), 0.1)] = 2
    labels[blob((-0.3, 0.2, -0.15), (0.2, 0.15, 0.25), 0.1)] = 3
    del rng
    return labels


def scipy_one_hot2dist(labels: np.ndarray, k: int, spacing: tuple[float, ...]) -> np.ndarray:
    from scipy.ndimage import distance_transform_edt as edt

    out = np.zeros((k, *labels.shape), dtype=np.float32)
    for c in range(k):
        pos = labels == c
        if pos.any() and not pos.all():
            neg = ~pos
            out[c] = edt(neg, sampling=spacing) * neg - (edt(pos, sampling=spacing) - 1) * pos
    return out


def seunglab_edt(labels: np.ndarray, k: int, spacing: tuple[float, ...]) -> np.ndarray:
    import edt

    out = np.zeros((k, *labels.shape), dtype=np.float32)
    threads = os.cpu_count() or 1
    for c in range(k):
        pos = labels == c
        if pos.any() and not pos.all():
            inside = edt.edt(pos, anisotropy=spacing, parallel=threads)
            outside = edt.edt(~pos, anisotropy=spacing, parallel=threads)
            out[c] = np.where(pos, -(inside - 1), outside)
    return out


def segloss_torch_maps(labels_tensor, k: int, spacing: tuple[float, ...]):
    from segloss_torch import signed_distance_map

    return signed_distance_map(labels_tensor[None], k, spacing)[0]


def median_ms(fn: Callable[[], object], repeat: int, sync: Callable[[], None] = lambda: None) -> tuple[float, object]:
    return timed(fn, repeat, sync)[::2]


def timed(
    fn: Callable[[], object], repeat: int, sync: Callable[[], None] = lambda: None
) -> tuple[float, float, object]:
    """(median wall ms, median process CPU ms, the last result) of ``repeat`` runs after a warm-up."""
    result = fn()
    sync()
    walls, cpus = [], []
    for _ in range(repeat):
        cpu, start = time.process_time(), time.perf_counter()
        result = fn()
        sync()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    return 1e3 * statistics.median(walls), 1e3 * statistics.median(cpus), result


def run(sizes: list[int], spacings: list[tuple[float, ...]], device: str, repeat: int) -> list[Result]:
    import torch

    k = 4
    results: list[Result] = []
    for size in sizes:
        labels = blob_volume(size)
        for spacing in spacings:
            ms_ref, cpu_ref, reference = timed(partial(scipy_one_hot2dist, labels, k, spacing), max(1, repeat // 2))
            rows = [Result(f"{size}³", str(spacing), "scipy per class (one_hot2dist)", ms_ref, 0.0, cpu_ms=cpu_ref)]
            if device == "cpu":
                try:
                    import edt  # noqa: F401

                    ms, cpu, out = timed(partial(seunglab_edt, labels, k, spacing), repeat)
                    rows.append(
                        Result(
                            f"{size}³",
                            str(spacing),
                            "seung-lab edt per class",
                            ms,
                            float(np.abs(out - reference).max()),
                            cpu_ms=cpu,
                        )
                    )
                except ImportError:
                    pass
                tensor = torch.from_numpy(labels)
                ms, cpu, out = timed(partial(segloss_torch_maps, tensor, k, spacing), repeat)
                rows.append(
                    Result(
                        f"{size}³",
                        str(spacing),
                        "segloss (CPU, one call)",
                        ms,
                        float(np.abs(out.numpy() - reference).max()),
                        cpu_ms=cpu,
                    )
                )
            else:
                import cupy
                from cupyx.scipy.ndimage import distance_transform_edt as cupy_edt

                labels_gpu = cupy.asarray(labels)

                def cupyx_maps(labels_gpu=labels_gpu, spacing=spacing):
                    out = cupy.zeros((k, *labels_gpu.shape), dtype=cupy.float32)
                    for c in range(k):
                        pos = labels_gpu == c
                        if bool(pos.any()) and not bool(pos.all()):  # one_hot2dist: 0 without a boundary
                            out[c] = cupy.where(
                                pos, -(cupy_edt(pos, sampling=spacing) - 1), cupy_edt(~pos, sampling=spacing)
                            )
                    return out

                ms, out = median_ms(cupyx_maps, repeat, cupy.cuda.Device().synchronize)
                rows.append(
                    Result(
                        f"{size}³",
                        str(spacing),
                        "cupyx per class",
                        ms,
                        float(np.abs(cupy.asnumpy(out) - reference).max()),
                    )
                )
                try:
                    from segloss_cupy import signed_distance_map as cupy_maps

                    ms, out = median_ms(
                        partial(cupy_maps, labels_gpu[None], k, spacing), repeat, cupy.cuda.Device().synchronize
                    )
                    rows.append(
                        Result(
                            f"{size}³",
                            str(spacing),
                            "segloss (CuPy kernels, one call)",
                            ms,
                            float(np.abs(cupy.asnumpy(out[0]) - reference).max()),
                        )
                    )
                except ImportError:
                    pass
                tensor = torch.from_numpy(labels).cuda()
                ms, out = median_ms(partial(segloss_torch_maps, tensor, k, spacing), repeat, torch.cuda.synchronize)
                rows.append(
                    Result(
                        f"{size}³",
                        str(spacing),
                        "segloss (CUDA, one call)",
                        ms,
                        float(np.abs(out.cpu().numpy() - reference).max()),
                    )
                )
            for r in rows[1:]:
                r.speedup_vs_scipy = ms_ref / r.ms
            results.extend(rows)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--tolerance", type=float, default=1e-5, help="largest error allowed, relative")
    parser.add_argument("--size", type=int, action="append", help="volume edge (repeatable; default 128 and 256)")
    parser.add_argument("--spacing", choices=("isotropic", "anisotropic", "both"), default="both")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = args.size or ([64] if args.quick else [128, 256])
    spacings = {"isotropic": [(1.0, 1.0, 1.0)], "anisotropic": [(0.8, 0.8, 2.5)]}.get(
        args.spacing, [(1.0, 1.0, 1.0), (0.8, 0.8, 2.5)]
    )
    results = run(sizes, spacings, args.device, 2 if args.quick else args.repeat)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{os.cpu_count()} cores, load average {load}; torch threads {torch.get_num_threads()}")
    print("| volume | spacing | implementation | ms | cpu ms | max |error| vs scipy | speed-up vs scipy |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in results:
        speed = f"{r.speedup_vs_scipy:.1f}×" if r.speedup_vs_scipy else "—"
        cpu = f"{r.cpu_ms:.0f}" if r.cpu_ms is not None else "—"
        print(
            f"| {r.shape} | {r.spacing} | {r.implementation} | {r.ms:.0f} | {cpu} | {r.max_abs_error:.1e} | {speed} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=2)
    scale = max(sizes) * 2.5  # bound on any distance of these volumes (largest extent × spacing)
    wrong = [r for r in results if r.max_abs_error > args.tolerance * scale]
    for r in wrong:
        print(f"ERROR: {r.implementation} on {r.shape} {r.spacing}: max |error| {r.max_abs_error:.2e} vs scipy")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
