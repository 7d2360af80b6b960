"""How wrong is a distance map computed on a training patch, and what does the right one cost?

    python examples/patch_distance_maps.py                 # 192 x 192 x 64 volume, 200 patches of 96 x 96 x 32
    python examples/patch_distance_maps.py --quick         # 64 x 64 x 24 volume, 20 patches of 32 x 32 x 12
    python examples/patch_distance_maps.py --json out.json

A CT-like label volume (background, a large organ, two smaller structures; spacing
(0.8, 0.8, 2.5) mm) is cut into random patches, uniformly placed as a random crop does. For each
patch it compares the boundary loss's map φ (Kervadec's convention, the foreground classes) in
two versions:

* **patch-local**: the signed distance map of the patch's labels, what a pipeline that crops
  first and computes maps second gets;
* **whole-image**: ``segloss_torch.transforms.SignedDistanceMapd`` on the whole volume, cropped
  with the patch (the transform placed before the crop), which is the true distance of every
  patch voxel to the nearest boundary, inside the patch or not.

It reports the voxel error |φ_local − φ_whole| (mm), the relative error of the loss gradient
(∂L/∂p ∝ φ, so ‖Δφ‖₁ / ‖φ_whole‖₁), the patches and (patch, class) pairs where a class of the
volume is absent from the patch (φ_local = 0 there: no signal), the boundary loss value for a
plausible prediction under both maps, and the cost: the whole-volume map (once per volume) and a
patch map (once per patch), in milliseconds on this machine's CPU threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch

from segloss_torch import signed_distance_map
from segloss_torch.transforms import SignedDistanceMapd

SPACING = (0.8, 0.8, 2.5)
NUM_CLASSES = 4


def ct_like_volume(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """Labels 0..3: a large organ (1), a structure inside it (2), a small one beside it (3)."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    rng = np.random.default_rng(seed)

    def ellipsoid(centre, radii):
        wobble = 0.08 * np.sin(6 * grid[0] + rng.uniform(0, 3)) * np.cos(5 * grid[1])
        return (((grid - np.reshape(centre, (3, 1, 1, 1))) / np.reshape(radii, (3, 1, 1, 1))) ** 2).sum(0) < 1 + wobble

    labels = np.zeros(shape, dtype=np.int64)
    labels[ellipsoid((-0.15, 0.1, 0.0), (0.5, 0.45, 0.6))] = 1
    labels[ellipsoid((-0.2, 0.15, 0.05), (0.15, 0.12, 0.25))] = 2
    labels[ellipsoid((0.5, -0.45, -0.1), (0.12, 0.1, 0.3))] = 3
    return labels


def _boundary(p: torch.Tensor, phi: torch.Tensor) -> float:
    """Kervadec's boundary loss on the foreground classes: mean of p·φ."""
    return float((p[1:] * phi[1:]).double().mean())


def _ms(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def measure(shape: tuple[int, int, int], patch: tuple[int, int, int], patches: int, seed: int = 0) -> dict:
    labels = torch.from_numpy(ct_like_volume(shape, seed))[None]  # (1, *spatial), as a data loader gives it
    transform = SignedDistanceMapd("label", NUM_CLASSES, spacing=SPACING)
    whole = transform({"label": labels})["label_distance_map"]  # (C, *spatial)
    g = torch.Generator().manual_seed(seed)
    shifted = torch.roll(labels[0], shifts=(2, -1, 1), dims=(0, 1, 2))  # a prediction off by a few voxels
    logits = 4.0 * torch.nn.functional.one_hot(shifted, NUM_CLASSES).movedim(-1, 0).float()
    p = torch.softmax(logits + torch.randn(logits.shape, generator=g), dim=0)
    rng = np.random.default_rng(seed)
    abs_errors, present_errors, rel_num, rel_den = [], [], 0.0, 0.0
    differ = background_only = absent_pairs = pairs = sign_flips = 0
    loss_errors = []
    for _ in range(patches):
        start = [int(rng.integers(0, n - k + 1)) for n, k in zip(shape, patch, strict=True)]
        window = tuple(slice(s, s + k) for s, k in zip(start, patch, strict=True))
        crop_labels = labels[0][window]
        local = signed_distance_map(crop_labels[None], NUM_CLASSES, SPACING)[0]
        cropped = whole[(slice(None), *window)]
        delta = (local[1:] - cropped[1:]).abs()
        abs_errors.append(delta.reshape(-1))
        rel_num += float(delta.double().sum())
        rel_den += float(cropped[1:].abs().double().sum())
        differ += bool(delta.max() > 1e-4)
        present = set(torch.unique(crop_labels).tolist())
        background_only += present == {0}
        for c in range(1, NUM_CLASSES):
            pairs += 1
            absent_pairs += c not in present
            if c in present:  # the patch border's error alone
                present_errors.append(delta[c - 1].reshape(-1))
        l_local, l_whole = _boundary(p[(slice(None), *window)], local), _boundary(p[(slice(None), *window)], cropped)
        loss_errors.append(abs(l_local - l_whole) / max(abs(l_whole), 1e-12))
        sign_flips += (l_local > 0) != (l_whole > 0)
    errors = torch.cat(abs_errors).double()
    present = torch.cat(present_errors).double()
    threads = torch.get_num_threads()
    whole_ms = _ms(lambda: transform({"label": labels}), 3)
    crop_labels = labels[0][tuple(slice(0, k) for k in patch)][None]
    patch_ms = _ms(lambda: signed_distance_map(crop_labels, NUM_CLASSES, SPACING), 5)
    return {
        "volume": list(shape),
        "patch": list(patch),
        "spacing": list(SPACING),
        "patches": patches,
        "patches_that_differ": differ,
        "background_only_patches": background_only,
        "absent_class_pairs": absent_pairs,
        "class_pairs": pairs,
        "mean_abs_error_mm": float(errors.mean()),
        "p95_abs_error_mm": float(torch.quantile(errors[:: max(1, errors.numel() // 1_000_000)], 0.95)),
        "max_abs_error_mm": float(errors.max()),
        "present_class_mean_abs_error_mm": float(present.mean()),
        "present_class_p95_abs_error_mm": float(torch.quantile(present[:: max(1, present.numel() // 1_000_000)], 0.95)),
        "present_class_share_wrong": float((present > 1e-4).double().mean()),
        "gradient_relative_error": rel_num / rel_den,
        "loss_relative_error_median": statistics.median(loss_errors),
        "loss_sign_flips": sign_flips,
        "whole_volume_map_ms": whole_ms,
        "patch_map_ms": patch_ms,
        "torch_threads": threads,
        "edt": "compiled kernels" if __import__("segloss_torch").distance_maps.unavailable() is None else "reference",
    }


def report(r: dict) -> str:
    volume, patch = " x ".join(map(str, r["volume"])), " x ".join(map(str, r["patch"]))
    return "\n".join(
        [
            f"volume {volume}, spacing {tuple(r['spacing'])} mm, {r['patches']} random patches of {patch}",
            f"patches whose patch-local map differs from the whole-image map: {r['patches_that_differ']} of "
            f"{r['patches']}",
            f"background-only patches (patch-local phi = 0 everywhere): {r['background_only_patches']}",
            f"(patch, foreground class) pairs with the class absent from the patch: {r['absent_class_pairs']} of "
            f"{r['class_pairs']}",
            f"|phi_local - phi_whole|: mean {r['mean_abs_error_mm']:.2f} mm, 95th percentile "
            f"{r['p95_abs_error_mm']:.2f} mm, max {r['max_abs_error_mm']:.1f} mm",
            f"... classes present in the patch only (the patch border's error): mean "
            f"{r['present_class_mean_abs_error_mm']:.2f} mm, 95th percentile "
            f"{r['present_class_p95_abs_error_mm']:.2f} mm, "
            f"{r['present_class_share_wrong']:.0%} of their voxels wrong",
            f"relative error of the loss gradient (||dphi||_1 / ||phi_whole||_1): {r['gradient_relative_error']:.1%}",
            f"boundary loss value, median relative error: {r['loss_relative_error_median']:.1%}; sign flipped in "
            f"{r['loss_sign_flips']} of {r['patches']} patches",
            f"cost ({r['edt']}, {r['torch_threads']} threads): whole-volume map {r['whole_volume_map_ms']:.1f} ms "
            f"per volume, patch map {r['patch_map_ms']:.1f} ms per patch",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small volume and 20 patches")
    parser.add_argument("--patches", type=int, default=None, help="number of random patches")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    shape, patch, count = ((64, 64, 24), (32, 32, 12), 20) if args.quick else ((192, 192, 64), (96, 96, 32), 200)
    result = measure(shape, patch, args.patches or count, args.seed)
    print(report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
