"""The deformable conv layers' export contract: the shared ``deploykit::DeformConv2d`` node (body: ONNX DeformConv).

Reference: y = DeformConv(x, W, offset, b, mask) with [offset | mask logits] = conv_offset(x) (a plain conv with
the layer's stride, padding and dilation) and mask = sigmoid(logits) for v2, ones for v1.
"""

from __future__ import annotations

import numpy as np

from deploykit.nn.deform_conv import DeformConv2d, ModulatedDeformConv2d
from deploykit.ops import reference as ref
from deploykit.ops.deform_conv2d import DEFORM_CONV2D, deform_conv2d_reference
from deploykit.ops.spec import VariantSpec


def deform_conv_reference(module: DeformConv2d | ModulatedDeformConv2d, x: np.ndarray) -> np.ndarray:
    """Float64 forward of either pack layer, from its parameters."""
    x = x.astype(np.float64)
    taps = module.kernel_size[0] * module.kernel_size[1]
    predicted = ref.conv2d(x, ref.array(module.conv_offset.weight), ref.array(module.conv_offset.bias),
                           module.stride, module.padding, module.dilation)
    split = 2 * module.deform_groups * taps
    offset = predicted[:, :split]
    mask = ref.sigmoid(predicted[:, split:]) if isinstance(module, ModulatedDeformConv2d) else \
        np.ones((x.shape[0], module.deform_groups * taps, *offset.shape[2:]))
    bias = ref.array(module.bias) if module.bias is not None else np.zeros(module.out_channels)
    pads = [*module.padding, *module.padding]
    return deform_conv2d_reference(x, ref.array(module.weight), offset, bias, mask, module.stride, pads,
                                   module.dilation, module.groups, module.deform_groups)


SPEC = VariantSpec(name="deform_conv", module=DeformConv2d, reference=deform_conv_reference,
                   tolerance={"float32": 1e-4}, custom_ops=(DEFORM_CONV2D,))
