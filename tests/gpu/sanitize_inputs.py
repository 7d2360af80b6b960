"""Run the fused CUDA kernels and the EDT on the test inputs, for compute-sanitizer (memcheck, racecheck).

compute-sanitizer --tool memcheck python tests/gpu/sanitize_inputs.py
"""

from __future__ import annotations

import torch

from segloss_core import get_loss


def main() -> None:
    torch.manual_seed(0)
    cases = [
        ((2, 4, 9, 7, 5), {}),  # odd sizes: partial chunks and warps
        ((1, 1, 33, 31), {"activation": "sigmoid"}),
        ((3, 14, 5, 6, 7), {"ignore_index": 255}),
        ((2, 20, 4100), {}),  # more classes than a group, more voxels than a chunk
        ((1, 3, 1), {}),  # a single voxel
    ]
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for shape, params in cases:
            x = torch.randn(*shape, device="cuda").to(dtype).requires_grad_(True)
            high = 2 if shape[1] == 1 else shape[1]
            y = torch.randint(0, high, (shape[0], *shape[2:]), device="cuda")
            if "ignore_index" in params:
                y[:, 0] = 255
            mask = torch.rand(shape[0], 1, *shape[2:], device="cuda")
            for name in ("dice_ce", "generalized_dice", "bce" if shape[1] == 1 else "jaccard"):
                loss = get_loss(name, backend="torch", impl="fused", **params)
                loss(x, y, mask).backward()
                x.grad = None
            soft = torch.rand(*shape, device="cuda").to(dtype)
            get_loss("dice", backend="torch", impl="fused", activation="sigmoid")(x, soft).backward()
    # the EDT kernels (csrc/cuda/edt.cu): 1-3 spatial dims, odd sizes, ignored voxels, empty and full
    # classes, every label dtype, anisotropic spacing, and the unsigned and mask variants
    from segloss_torch import distance_map, mask_distance_map, signed_distance_map

    for spatial in ((37,), (33, 31), (9, 7, 5), (1, 1, 1), (64, 3, 17)):
        for label_dtype in (torch.uint8, torch.int32, torch.int64):
            labels = torch.randint(0, 4, (2, *spatial), device="cuda").to(label_dtype)
            labels[0].view(-1)[0] = 200
            labels[1] = 2
            spacing = tuple(0.5 + 0.3 * i for i in range(len(spatial)))
            signed_distance_map(labels, 4, spacing, ignore_index=200)
            distance_map(labels, 4, None, region="outside", ignore_index=200)
        mask_distance_map(torch.rand(2, 3, *spatial, device="cuda") < 0.3, None)
    torch.cuda.synchronize()
    print("sanitizer inputs ran")


if __name__ == "__main__":
    main()
