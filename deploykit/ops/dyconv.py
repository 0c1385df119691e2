"""DyConv's export contract: the shared ``deploykit::DynamicConv2d`` node (softmax attention, kernel + bias mix).

Reference (paper Eq. 1-3): pi(x) = softmax(FC(ReLU(FC(GAP(x)))) / T), W~ = sum_k pi_k W_k, b~ = sum_k pi_k b_k,
y = W~ * x + b~.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from deploykit.nn.dyconv import DyConv2d
from deploykit.ops import reference as ref
from deploykit.ops.dynamic_conv2d import DYNAMIC_CONV2D, dynamic_conv2d_reference
from deploykit.ops.spec import LayerRule, VariantSpec, attribute, square


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


def dyconv_from_kaijieshi7(layer: nn.Module) -> DyConv2d:
    """kaijieshi7's ``Dynamic_conv2d``. Its ratio is not stored, so the attention's hidden width is read from
    ``attention.fc1`` (a ratio of (width - 0.5) / in_planes gives it back); its temperature is not in the
    state_dict (34 when fresh, lowered during training), so it is carried over."""
    attention = attribute(layer, "attention")
    in_planes = attribute(layer, "in_planes")
    hidden = attribute(attribute(attention, "fc1"), "out_channels")
    return DyConv2d(in_planes, attribute(layer, "out_planes"), square(layer, "kernel_size"),
                    ratio=(hidden - 0.5) / in_planes, stride=square(layer, "stride"), padding=square(layer, "padding"),
                    dilation=square(layer, "dilation"), groups=attribute(layer, "groups"),
                    bias=attribute(layer, "bias") is not None, K=attribute(layer, "K"),
                    temperature=attribute(attention, "temperature"))


SPEC = VariantSpec(name="dyconv", module=DyConv2d, reference=dyconv_reference, tolerance={"float32": 1e-4},
                   custom_ops=(DYNAMIC_CONV2D,),
                   conversions=(LayerRule(("Dynamic_conv2d",), DyConv2d, dyconv_from_kaijieshi7),))
