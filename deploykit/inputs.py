"""Verification inputs: the user's arrays checked, and seeded random inputs for checks and calibration.

White noise is a poor stand-in for data: to a deep network every white-noise image looks alike, so deep
features barely vary and BatchNorm-normalised random models become ill-conditioned on it. `structured_noise`
draws images with structure at a random scale, contrast and colour cast, which behave like real inputs.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from deploykit.errors import DeployError
from deploykit.log import LOGGER
from deploykit.memory import check_fits, memory_errors


def structured_noise(batch: int, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """`batch` random images of `shape` (C, H, W): smooth noise at a random scale, random contrast and colour
    cast, plus fine grain. Deterministic for a seeded `generator`."""
    channels, height, width = shape
    what = f"Making random inputs of shape {batch}x{channels}x{height}x{width}"
    check_fits(2 * batch * channels * height * width * 4, what)  # the images and their concatenation
    with memory_errors(what):
        return _structured_noise(batch, shape, generator)


def _structured_noise(batch: int, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
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


def checked_input(array: np.ndarray, source: str) -> np.ndarray:
    """A user's floating-point input as the float32 array the exported model takes: an empty array is refused
    (it would fail deep inside PyTorch), and a cast from another precision is said, never silent."""
    if array.ndim == 0 or array.size == 0:
        shape = f"has shape {'x'.join(map(str, array.shape))}" if array.ndim else "is a scalar"
        raise DeployError(f"The input in {source} {shape}, which holds no sample; save an array with at least one "
                          f"sample in every dimension.")
    if array.dtype == np.float32:
        return np.ascontiguousarray(array)
    with np.errstate(over="ignore"):  # counted below
        cast = np.ascontiguousarray(array, dtype=np.float32)
    beyond = int(np.size(cast) - np.count_nonzero(np.isfinite(cast)))
    if beyond:
        raise DeployError(f"The input in {source} has {beyond} {array.dtype} value(s) beyond float32's range, which "
                          f"the float32 model cannot take; save float32 values.")
    LOGGER.info("  the input in %s is %s: cast to float32, the precision of the exported model", source, array.dtype)
    return cast


def batch_sizes(array: np.ndarray, dynamic_batch: bool) -> list[np.ndarray]:
    """The user's input as the verification batches: as given, and with a dynamic batch once more with its first
    sample repeated at the end, so that the file is checked at a second batch size on the user's own data."""
    return [array, np.concatenate([array, array[:1]])] if dynamic_batch else [array]
