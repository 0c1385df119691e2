"""`VariantSpec`: everything deploykit knows about one conv variant beyond its PyTorch module.

One spec per variant, in `deploykit/ops/<name>.py`, collected in `deploykit.variants.VARIANTS`. The same stem names
the variant in every layer (``deploykit/nn/<name>.py``, ``deploykit/ops/<name>.py``, ``tests/ops/test_<name>.py``);
a custom op that variants share is named by its own stem in ``deploykit/ops/`` and ``plugins/`` (e.g.
``dynamic_conv2d`` for CondConv, DyConv and ODConv); `tests/test_layout.py` enforces that.
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
    """

    name: str
    module: type[nn.Module]
    reference: Callable[..., np.ndarray]
    tolerance: dict[str, float]
    custom_ops: tuple[CustomOp, ...] = ()

    @property
    def plugins(self) -> tuple[str, ...]:
        """Folders under ``plugins/`` whose CUDA kernels and TensorRT plugins implement the variant's custom ops."""
        return tuple(op.plugin for op in self.custom_ops if op.plugin is not None)
