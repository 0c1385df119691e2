"""Real images as verification inputs: read, resize, centre-crop, normalise, batch.

Synthetic inputs can be out of distribution for a trained network (a calibrated SCNet-50 blew up on random images
while it was well-behaved on photos), so users verify on their own images: ``export.py --images DIR``. The
preprocessing is the evaluation transform the model was trained with: each zoo model carries its own
(`Preprocessing`, e.g. ImageNet statistics, or the TVConv face model's [-1, 1] scaling of BGR images), and
``--mean``/``--std`` override it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from deploykit.errors import DeployError, first_line
from deploykit.fileio import missing_reason

if TYPE_CHECKING:
    from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How a model's evaluation images are made from a photo.

    Attributes:
        mean, std: per-channel statistics applied to pixel values in [0, 1].
        crop_fraction: the centre crop is this fraction of the resized image (timm's ``crop_pct``: resize the
            shorter side to size / 0.875, crop size); 1.0 resizes the whole image to the input size.
        channel_order: "RGB", or "BGR" for models trained on OpenCV-loaded images.
    """

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_fraction: float = 0.875
    channel_order: str = "RGB"

    def with_statistics(self, mean: Sequence[float] | None, std: Sequence[float] | None) -> Preprocessing:
        """This preprocessing with the user's --mean / --std where given."""
        return Preprocessing(tuple(mean) if mean else self.mean, tuple(std) if std else self.std, self.crop_fraction,
                             self.channel_order)


IMAGENET = Preprocessing()
INCEPTION = Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # timm's tf_* ports
# JierunChen/TVConv face_recognition: aligned 96x96 faces read with cv2.imread (BGR), ToTensor, Normalize(0.5, 0.5).
FACE_BGR = Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_fraction=1.0, channel_order="BGR")


def image_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The image files named by `paths`: files as given, directories' images (by suffix) in name order."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise DeployError(f"--images: {path} holds no image files ({', '.join(IMAGE_SUFFIXES)}).")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DeployError(f"--images: {path} {missing_reason(path)}.")
    return files


def image_batches(files: Sequence[Path], shapes: Sequence[Sequence[int]]) -> list[list[Path]]:
    """Which images make each verification batch (one per shape). With two shapes and three or more images:
    batches of 1 and N-1, every image once; with fewer: every image at both shapes, and when the two shapes differ
    only in the batch, the first image once more in the second batch, so the second batch size is checked too."""
    if len(shapes) == 1:
        return [list(files)]
    if len(files) >= 3:
        return [list(files[:1]), list(files[1:])]
    resized = tuple(shapes[1][2:]) != tuple(shapes[0][2:])
    return [list(files), list(files) if resized else [*files, files[0]]]


def load_images(paths: Sequence[str | os.PathLike], shape: Sequence[int], preprocessing: Preprocessing = IMAGENET
                ) -> np.ndarray:
    """The images at `paths` as one float32 batch [N, C, H, W] for an input of `shape` (C, H, W), C 1 or 3."""
    channels, height, width = shape
    if channels not in (1, 3):
        raise DeployError(f"--images needs a model input with 1 or 3 channels, not {channels}.")
    for name, stats in (("--mean", preprocessing.mean), ("--std", preprocessing.std)):
        if len(stats) not in (1, channels):
            raise DeployError(f"{name} has {len(stats)} values; the model input has {channels} channels.")
    if not all(s > 0 for s in preprocessing.std):
        raise DeployError(f"--std values must be positive, got {', '.join(map(str, preprocessing.std))}.")
    batch = np.stack([_image(path, channels, height, width, preprocessing) for path in image_files(paths)])
    mean = np.asarray(preprocessing.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(preprocessing.std, dtype=np.float32).reshape(-1, 1, 1)
    return np.ascontiguousarray((batch - mean) / std, dtype=np.float32)


def _image(path: Path, channels: int, height: int, width: int, preprocessing: Preprocessing) -> np.ndarray:
    """One image as [C, H, W] in [0, 1]: resized so the crop covers crop_fraction of it, centre-cropped."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            image, full_scale = _unit_mode(opened, path, channels)
            scale = max(height / image.height, width / image.width) / preprocessing.crop_fraction
            if preprocessing.crop_fraction == 1.0:
                resized = image.resize((width, height), Image.Resampling.BILINEAR)
            else:
                size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
                resized = image.resize(size, Image.Resampling.BILINEAR)
            left, top = (resized.width - width) // 2, (resized.height - height) // 2
            pixels = np.asarray(resized.crop((left, top, left + width, top + height)), dtype=np.float32) / full_scale
    except Image.DecompressionBombError as err:
        raise DeployError(f"--images: {path} is too large to read safely ({first_line(err)}); downscale it "
                          f"first.") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DeployError(f"--images: {path} is not a readable image ({first_line(err)}).") from None
    pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
    if pixels.shape[2] != channels:  # a 16-bit or floating-point grey image for a colour model
        pixels = np.repeat(pixels, channels, axis=2)
    if preprocessing.channel_order == "BGR":
        pixels = pixels[:, :, ::-1]
    return pixels.transpose(2, 0, 1)


def _unit_mode(image, path: Path, channels: int) -> tuple[Image.Image, float]:
    """`image` in a mode that resizes exactly, and the value that maps its pixels to [0, 1]: 8-bit images (every
    palette, grey, alpha, CMYK, YCbCr... mode, alpha dropped as torchvision does) as "L" or "RGB" over 255; 16-bit
    and 32-bit integer grey images (converting them to 8 bits would clip them to white) and floating-point ones
    as "F" over 65535 or 1."""
    from PIL import Image

    if not (image.mode.startswith("I") or image.mode == "F"):
        return image.convert("L" if channels == 1 else "RGB"), 255.0
    full_scale = 1.0 if image.mode == "F" else 65535.0
    values = np.asarray(image, dtype=np.float32)  # through NumPy: Pillow cannot convert every 16-bit layout itself
    low, high = float(values.min()), float(values.max())
    if not (0 <= low and high <= full_scale):
        kind = "floating-point" if image.mode == "F" else "integer"
        raise DeployError(f"--images: {path} holds {kind} pixels from {low:g} to {high:g}, outside the [0, "
                          f"{full_scale:g}] of a {'float' if image.mode == 'F' else '16-bit'} image, so their "
                          f"brightness is unknown; save it as an 8- or 16-bit image.")
    return Image.fromarray(values), full_scale  # float32 -> mode "F"
