"""``segloss demo``: every registered loss on every available backend, on one synthetic 3D volume.

The volume imitates the hard case of medical segmentation: a large organ (class 1), a
medium structure (class 2) and a few small lesions of 1–30 voxels (class 3), with logits of
a half-trained network. For each (loss, backend) the table shows the implementation that ran
(torch: ``fused`` kernels or ``native`` torch ops), the value, its difference from the float64
NumPy reference, and the time per call (forward, and forward + backward). The two timings are
taken alternately and the fastest of each is shown, so that a busy machine slows both alike
(a median of separately timed runs could show forward + backward below forward). Backends other
than NumPy and torch (CuPy, third-party plugins) are run through their conformance hook, value
and gradient in one call: their forward column is "-". Slow rows are timed fewer times (a
one-second budget per cell) so that the demo stays short.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .lookup import get_loss, list_backends, list_losses
from .registry import registry


def synthetic_volume(
    shape: tuple[int, int, int] = (40, 40, 40), batch: int = 2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(logits (B, 4, *shape) float32, labels (B, *shape) int64) with small lesions."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    labels = np.zeros((batch, *shape), dtype=np.int64)
    for b in range(batch):
        centre = rng.uniform(-0.2, 0.2, size=3)[:, None, None, None]
        organ = ((grid - centre) ** 2 / np.array([0.5, 0.35, 0.4])[:, None, None, None] ** 2).sum(0) < 1
        labels[b][organ] = 1
        inner = ((grid - centre) ** 2).sum(0) < 0.12**2
        labels[b][inner] = 2
        for _ in range(4):  # lesions of 1 to ~30 voxels
            z, y, x = (int(rng.integers(2, s - 3)) for s in shape)
            r = int(rng.integers(0, 2))
            labels[b, z - r : z + r + 1, y - r : y + r + 1, x : x + 1 + r] = 3
    onehot = np.eye(4, dtype=np.float32)[labels].transpose(0, 4, 1, 2, 3)
    logits = 2.5 * onehot + rng.normal(scale=1.2, size=onehot.shape).astype(np.float32)
    return logits.astype(np.float32), labels


@dataclass
class DemoRow:
    loss: str
    backend: str
    value: float
    reference: float
    forward_ms: float | None
    backward_ms: float | None
    implementation: str = "-"


def _time(steps: Sequence[Callable[[], Any]], repeat: int, budget_s: float = 1.0, warmup: bool = True) -> list[float]:
    """Fastest ms of each of ``steps``, timed alternately (one call of each per round) after a
    warm-up call (first-call compilation, allocator); fewer rounds (at least one) once
    ``budget_s`` is spent, so that slow losses keep the demo short."""
    if warmup:
        for step in steps:
            step()
    samples: list[list[float]] = [[] for _ in steps]
    while len(samples[0]) < repeat and (not samples[0] or sum(map(sum, samples)) < budget_s):
        for step, times in zip(steps, samples, strict=True):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    return [1e3 * min(times) for times in samples]


def _generic_runner(backend: Any, loss: Any, logits: np.ndarray, labels: np.ndarray) -> Callable[[], float]:
    """Value and gradient through the backend's conformance hook (any installed backend)."""

    def forward_backward() -> float:
        value, _ = backend.run_for_conformance(loss, logits, labels, None, "float32")
        return float(np.sum(value))

    return forward_backward


def _torch_runner(loss: Any, logits: np.ndarray, labels: np.ndarray) -> tuple[Callable, Callable]:
    import torch

    x = torch.from_numpy(logits)
    y = torch.from_numpy(labels)

    def forward() -> float:
        with torch.no_grad():
            return float(loss(x, y))

    def forward_backward() -> None:
        xg = x.detach().requires_grad_(True)
        loss(xg, y).backward()

    return forward, forward_backward


def _torch_implementation(loss: Any) -> str:
    """``fused`` or ``native``: what computes the torch loss's statistics (``-`` if it cannot say)."""
    which = getattr(loss, "implementation", None)
    return str(which()) if callable(which) else "-"


def run_demo(
    shape: tuple[int, int, int] = (40, 40, 40), repeat: int = 3, echo: Callable[[str], None] = print
) -> list[DemoRow]:
    logits, labels = synthetic_volume(shape)
    echo(
        f"synthetic volume: batch 2, 4 classes, {shape[0]}x{shape[1]}x{shape[2]} voxels; "
        f"lesion voxels per sample: {[int((labels[b] == 3).sum()) for b in range(2)]}"
    )
    backends = [info.name for info in list_backends() if info.available]
    rows: list[DemoRow] = []
    reg = registry()
    for name in list_losses():
        if not reg._supports(reg.backend("numpy"), reg.loss(name)):
            continue
        reference = get_loss(name, backend="numpy")
        ref_value = float(reference(logits.astype(np.float64), labels))
        for backend in backends:
            implementation = "reference" if backend == "numpy" else "-"
            if backend == "numpy":
                forward = lambda ref=reference: float(ref(logits, labels))  # noqa: E731
                backward = lambda ref=reference: ref.value_and_grad(logits, labels)  # noqa: E731
            elif backend == "torch":
                loss = get_loss(name, backend="torch")
                forward, backward = _torch_runner(loss, logits, labels)
                implementation = _torch_implementation(loss)
            else:  # any other backend (CuPy, third-party): value and gradient through its conformance hook
                be = reg.backend(backend)
                if not reg._supports(be, reg.loss(name)):
                    continue
                step = _generic_runner(be, get_loss(name, backend=backend), logits, labels)
                value = step()
                (both_ms,) = _time([step], repeat)
                rows.append(DemoRow(name, backend, value, ref_value, None, both_ms, "hook"))
                continue
            value = forward()
            warm = backend != "numpy"  # nothing to compile or cache in the NumPy reference
            forward_ms, backward_ms = _time([forward, backward], repeat, warmup=warm)
            rows.append(DemoRow(name, backend, value, ref_value, forward_ms, backward_ms, implementation))
    width = max(len(r.loss) for r in rows) if rows else 10
    impl_width = max([len("impl"), *(len(r.implementation) for r in rows)])
    echo(
        f"{'loss':<{width}}  {'backend':<8} {'impl':<{impl_width}} {'value':>12} {'|Δ ref|':>9} "
        f"{'fwd ms':>8} {'fwd+bwd ms':>10}"
    )
    for r in rows:
        bwd = f"{r.backward_ms:10.1f}" if r.backward_ms is not None else f"{'-':>10}"
        fwd = f"{r.forward_ms:8.1f}" if r.forward_ms is not None else f"{'-':>8}"
        echo(
            f"{r.loss:<{width}}  {r.backend:<8} {r.implementation:<{impl_width}} {r.value:12.6f} "
            f"{abs(r.value - r.reference):9.1e} {fwd} {bwd}"
        )
    echo(
        "times: fastest of alternating runs, ms per call; impl: what computed the statistics "
        "(torch: fused/native; hook: the backend's conformance hook)"
    )
    echo("values agree with the float64 reference to float32 rounding; see `segloss describe NAME` for formulas")
    return rows
