"""SCConv's export contract: standard ONNX only (AveragePool, Conv, Resize, Sigmoid, Mul), no custom op.

The reference is the paper's Eq. (1)-(4), written with float64 NumPy primitives:

    T1  = AvgPool_r(X1)
    X1' = Up(F2(T1))                       F_i = conv + BN
    Y1' = F3(X1) * sigmoid(X1 + X1')
    Y1  = F4(Y1')
"""

from __future__ import annotations

import numpy as np
from torch import nn

from deploykit.nn.scconv import SCConv
from deploykit.ops import reference as ref
from deploykit.ops.spec import VariantSpec


def _conv_bn(x: np.ndarray, branch: nn.Sequential) -> np.ndarray:
    conv, norm = branch[-2], branch[-1]

    def array(t):
        return t.detach().double().numpy()

    y = ref.conv2d(x, array(conv.weight), None, conv.stride, conv.padding, conv.dilation, conv.groups)
    return ref.batch_norm(y, array(norm.running_mean), array(norm.running_var), array(norm.weight),
                          array(norm.bias), norm.eps)


def scconv_reference(module: SCConv, x: np.ndarray) -> np.ndarray:
    """Float64 SCConv forward (inference mode) from the paper's formula."""
    x = x.astype(np.float64)
    pooling_r = module.k2[0].kernel_size
    calibration = ref.resize_nearest(_conv_bn(ref.avg_pool2d(x, pooling_r), module.k2), x.shape[2:])
    gated = _conv_bn(x, module.k3) * ref.sigmoid(x + calibration)
    return _conv_bn(gated, module.k4)


SPEC = VariantSpec(name="scconv", module=SCConv, reference=scconv_reference, tolerance={"float32": 1e-4})
