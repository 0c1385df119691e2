"""`VariantSpec`: everything deploykit knows about one conv variant beyond its PyTorch module.

One spec per variant, in `deploykit/ops/<name>.py`, collected in `deploykit.variants.VARIANTS`. The same stem names
the variant in every layer (``deploykit/nn/<name>.py``, ``deploykit/ops/<name>.py``, ``plugins/<name>/``,
``tests/ops/test_<name>.py``); `tests/test_layout.py` enforces that.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from torch import nn

from deploykit.export.custom_op import CustomOp


@dataclass(frozen=True)
class VariantSpec:
    """The export contract of one variant.

    Attributes:
        name: the stem shared by the variant's files in every layer.
        module: the PyTorch layer (in `deploykit.nn`).
        reference: float64 NumPy implementation of the layer's forward, written from the paper's formula:
            ``reference(module, x, *extra_inputs) -> y``; it reads the module's parameters, never calls its code.
        tolerance: max error relative to the output's range (max |y|) allowed against `reference`, per dtype.
        custom_ops: the ``deploykit::`` ONNX ops the variant exports (empty: it exports to standard ONNX only).
        plugin: name of its folder under ``plugins/`` when a TensorRT plugin implements its custom ops.
    """

    name: str
    module: type[nn.Module]
    reference: Callable[..., np.ndarray]
    tolerance: dict[str, float]
    custom_ops: tuple[CustomOp, ...] = ()
    plugin: str | None = None
