"""Real photos for int8 calibration and agreement figures: crops of the photos scikit-image's wheel ships.

`save_crops` writes two overlapping crops (the top-left and the centre two thirds) of each named
``skimage.data`` photo as PNG, grey photos as three equal channels. The int8 tests and the int8 benchmark use it,
each with a calibration set and a verification set that share no photo.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

# No hubble_deep_field: on that nearly black photo the zoo's random od_resnet50 outputs 2.7e11 (its BatchNorms were
# calibrated on noise), and one such input stretches every MinMax range until real inputs quantize to zero.
CALIBRATION_PHOTOS = ("coffee", "rocket", "immunohistochemistry", "coins", "camera", "colorwheel", "moon", "brick")
VERIFICATION_PHOTOS = ("chelsea", "cat", "astronaut")


def save_crops(directory: Path, names: Sequence[str]) -> Path:
    """Write the crops of `names` into `directory` (created); return it."""
    import skimage.data
    from PIL import Image

    directory.mkdir(parents=True)
    for name in names:
        image = getattr(skimage.data, name)()
        image = np.stack([image] * 3, axis=-1) if image.ndim == 2 else image[..., :3]
        height, width = image.shape[:2]
        for index, (top, left) in enumerate([(0, 0), (height // 3, width // 3)]):
            Image.fromarray(image[top:top + 2 * height // 3, left:left + 2 * width // 3]).save(
                directory / f"{name}_{index}.png")
    return directory
