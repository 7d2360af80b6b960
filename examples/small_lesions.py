"""Small lesions under different Dice conventions: the same tiny 3D network, trained from the same
initialisation on the same synthetic volumes, under several presets; lesion Dice over training.

Each volume (24³) holds a bright "organ" blob (class 1) and, in about half of the volumes,
1–4 "lesions" of 1–30 voxels (class 2) that are only slightly brighter than the organ — the
rare, small structures that decide whether a convention works. Background is class 0.

    python examples/small_lesions.py                 # table of lesion Dice per preset (≈1.5 min on 2 CPU cores)
    python examples/small_lesions.py --plot out.png  # also save the curves (pip install 'segloss-registry[plot]')

The README's figure (docs/figures/small_lesions.png) is this script's output with the defaults.
"""

from __future__ import annotations

import argparse
import textwrap
import time

import numpy as np
import torch
from torch import nn

from segloss_core import get_loss

SIZE = 24
CONFIGS: dict[str, dict] = {
    # name: get_loss arguments
    "dice, MONAI defaults (bg included)": {"name": "dice", "preset": "monai"},
    "dice smooth=1 (per sample)": {"name": "dice", "include_background": False, "smooth_nr": 1.0, "smooth_dr": 1.0},
    "dice smooth=1e-5 (nnunet)": {"name": "dice", "preset": "nnunet"},
    "dice smooth=0 (nnunet_nosmooth)": {"name": "dice", "preset": "nnunet_nosmooth"},
    "batch dice smooth=1e-5": {"name": "dice", "preset": "nnunet", "batch": True},
    "dice+CE (nnunet)": {"name": "dice_ce", "preset": "nnunet"},
}


def make_volume(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    grid = np.stack(np.meshgrid(*[np.arange(SIZE)] * 3, indexing="ij")).astype(np.float32)
    labels = np.zeros((SIZE,) * 3, dtype=np.int64)
    centre = rng.uniform(8, 16, size=3)[:, None, None, None]
    radii = rng.uniform(4, 7, size=3)[:, None, None, None]
    labels[(((grid - centre) / radii) ** 2).sum(0) < 1] = 1
    if rng.random() < 0.5:
        for _ in range(int(rng.integers(1, 5))):
            z, y, x = (int(v) for v in rng.integers(3, SIZE - 4, size=3))
            dz, dy, dx = (int(v) for v in rng.integers(1, 4, size=3))  # 1 to 27 voxels
            labels[z : z + dz, y : y + dy, x : x + dx] = 2
            if rng.random() < 0.3:
                labels[z + dz, y, x] = 2  # a few 28-30 voxel lesions
    image = np.choose(labels, [0.0, 1.0, 1.5]).astype(np.float32)
    image += rng.normal(scale=0.5, size=image.shape).astype(np.float32)
    return image[None], labels


def make_set(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    pairs = [make_volume(rng) for _ in range(count)]
    return torch.from_numpy(np.stack([p[0] for p in pairs])), torch.from_numpy(np.stack([p[1] for p in pairs]))


def make_network() -> nn.Module:
    return nn.Sequential(
        nn.Conv3d(1, 12, 3, padding=1),
        nn.ReLU(),
        nn.Conv3d(12, 12, 3, padding=1),
        nn.ReLU(),
        nn.Conv3d(12, 3, 1),
    )


def lesion_dice(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        predicted = net(images).argmax(1) == 2
    truth = labels == 2
    inter = (predicted & truth).sum().item()
    return 2 * inter / max(predicted.sum().item() + truth.sum().item(), 1)


def train(config: dict, steps: int, batch: int, seed: int, train_set, val_set, every: int) -> list[tuple[int, float]]:
    torch.manual_seed(seed)
    net = make_network()
    params = dict(config)
    loss = get_loss(params.pop("name"), backend="torch", **params)
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    images, labels = train_set
    rng = np.random.default_rng(seed)
    curve = [(0, lesion_dice(net, *val_set))]
    for step in range(1, steps + 1):
        index = torch.from_numpy(rng.choice(len(images), size=batch, replace=False))
        optimiser.zero_grad()
        value = loss(net(images[index]), labels[index])
        value.backward()
        optimiser.step()
        if step % every == 0:
            curve.append((step, lesion_dice(net, *val_set)))
    return curve


def main() -> None:
    summary, _, details = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(
        description=textwrap.fill(" ".join(summary.split()), 96),  # the whole first paragraph
        epilog=details.strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=400, help="training steps per convention (default 400)")
    parser.add_argument("--batch", type=int, default=4, help="volumes per training step (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of the initialisation (default 0)")
    parser.add_argument("--every", type=int, default=25, help="evaluate the lesion Dice every N steps (default 25)")
    parser.add_argument("--plot", metavar="PNG", help="also save the lesion-Dice curves to this PNG (needs matplotlib)")
    args = parser.parse_args()
    if args.plot:
        try:
            import matplotlib
        except ImportError:
            parser.error("--plot needs matplotlib: pip install 'segloss-registry[plot]'")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    train_set, val_set = make_set(48, args.seed), make_set(16, args.seed + 1)
    lesions = int((val_set[1] == 2).sum())
    print(f"validation: 16 volumes of {SIZE}³, {lesions} lesion voxels in total")
    curves = {}
    for name, config in CONFIGS.items():
        start = time.perf_counter()
        curves[name] = train(config, args.steps, args.batch, args.seed, train_set, val_set, args.every)
        final = curves[name][-1][1]
        best = max(v for _, v in curves[name])
        print(f"{name:<34} lesion Dice: final {final:.3f}, best {best:.3f}  ({time.perf_counter() - start:.0f} s)")
    if args.plot:
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.2))
        for name, curve in curves.items():
            steps, values = zip(*curve, strict=True)
            ax.plot(steps, values, marker="o", markersize=3, label=name)
        ax.set_xlabel("training step")
        ax.set_ylabel("lesion Dice (validation, argmax)")
        ax.set_title(f"Same network, same data: small-lesion Dice under {len(curves)} loss conventions")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"saved {args.plot}")


if __name__ == "__main__":
    main()
