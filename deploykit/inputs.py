"""Seeded random inputs for checks and calibration.

White noise is a poor stand-in for data: to a deep network every white-noise image looks alike, so deep
features barely vary and BatchNorm-normalised random models become ill-conditioned on it. `structured_noise`
draws images with structure at a random scale, contrast and colour cast, which behave like real inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def structured_noise(batch: int, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """`batch` random images of `shape` (C, H, W): smooth noise at a random scale, random contrast and colour
    cast, plus fine grain. Deterministic for a seeded `generator`."""
    channels, height, width = shape
    images = []
    for _ in range(batch):
        scale = int(torch.randint(2, 33, (1,), generator=generator))
        smooth = F.interpolate(torch.randn(1, channels, scale, scale, generator=generator), size=(height, width),
                               mode="bilinear", align_corners=False)
        contrast = 0.5 + 1.5 * torch.rand(1, generator=generator)
        cast = 0.5 * torch.randn(1, channels, 1, 1, generator=generator)
        grain = 0.3 * torch.randn(1, channels, height, width, generator=generator)
        images.append(smooth * contrast + cast + grain)
    return torch.cat(images)
