"""DyConv's export contract: the shared ``deploykit::DynamicConv2d`` node (softmax attention, kernel + bias mix).

Reference (paper Eq. 1-3): pi(x) = softmax(FC(ReLU(FC(GAP(x)))) / T), W~ = sum_k pi_k W_k, b~ = sum_k pi_k b_k,
y = W~ * x + b~.
"""

from __future__ import annotations

import numpy as np

from deploykit.nn.dyconv import DyConv2d
from deploykit.ops import reference as ref
from deploykit.ops.dynamic_conv2d import DYNAMIC_CONV2D, dynamic_conv2d_reference
from deploykit.ops.spec import VariantSpec


def dyconv_reference(module: DyConv2d, x: np.ndarray) -> np.ndarray:
    """Float64 DyConv2d forward at the module's temperature."""
    x = x.astype(np.float64)
    attention = module.attention
    hidden = np.maximum(ref.linear(x.mean(axis=(2, 3)), ref.array(attention.fc1.weight)), 0)
    weights = ref.softmax(ref.linear(hidden, ref.array(attention.fc2.weight), ref.array(attention.fc2.bias))
                          / attention.temperature, axis=1)
    bank = ref.array(module.weight)
    bias = ref.array(module.bias) if module.bias is not None else np.zeros(bank.shape[:2])
    return dynamic_conv2d_reference(x, bank, weights, bias, np.ones((1, *bank.shape[3:])), (module.stride,) * 2,
                                    [module.padding] * 4, (module.dilation,) * 2, module.groups)


SPEC = VariantSpec(name="dyconv", module=DyConv2d, reference=dyconv_reference, tolerance={"float32": 1e-4},
                   custom_ops=(DYNAMIC_CONV2D,))
