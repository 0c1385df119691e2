"""CondConv's export contract: the shared ``deploykit::DynamicConv2d`` node (routing = kernel attention).

Reference (paper Eq. 1-2): y = sigma((alpha_1 W_1 + ... + alpha_E W_E) * x + sum_e alpha_e b_e), with the routing
alpha = r(x) = sigmoid(GAP(x) R) supplied by the block.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from deploykit.nn.condconv import CondConv2d, CondConvRouting
from deploykit.ops import reference as ref
from deploykit.ops.dynamic_conv2d import DYNAMIC_CONV2D, dynamic_conv2d_reference
from deploykit.ops.spec import LayerRule, VariantSpec, attribute, square


def routing_reference(routing: CondConvRouting, x: np.ndarray) -> np.ndarray:
    return ref.sigmoid(ref.linear(x.mean(axis=(2, 3)), ref.array(routing.weight), ref.array(routing.bias)))


def condconv_reference(module: CondConv2d, x: np.ndarray, routing_weights: np.ndarray) -> np.ndarray:
    """Float64 CondConv2d forward for given routing weights [N, E]."""
    bank = ref.array(module.weight).reshape(module.num_experts, *module.weight_shape)
    bias = ref.array(module.bias) if module.bias is not None else np.zeros((module.num_experts, module.out_channels))
    taps = np.ones((1, *module.kernel_size))
    return dynamic_conv2d_reference(x, bank, routing_weights, bias, taps, module.stride,
                                    module.pads(tuple(x.shape[2:])), module.dilation, module.groups)


def condconv_from_timm(layer: nn.Module) -> CondConv2d:
    """timm's ``CondConv2d``, whose padding is stored resolved: ``dynamic_padding`` marks TF 'same' padding that
    depends on the input size, which deploykit's layer computes per input from ``padding='same'``."""
    padding = "same" if attribute(layer, "dynamic_padding") else square(layer, "padding")
    return CondConv2d(attribute(layer, "in_channels"), attribute(layer, "out_channels"), square(layer, "kernel_size"),
                      square(layer, "stride"), padding, square(layer, "dilation"), attribute(layer, "groups"),
                      bias=attribute(layer, "bias") is not None, num_experts=attribute(layer, "num_experts"))


SPEC = VariantSpec(name="condconv", module=CondConv2d, reference=condconv_reference, tolerance={"float32": 1e-4},
                   custom_ops=(DYNAMIC_CONV2D,),
                   conversions=(LayerRule(("CondConv2d",), CondConv2d, condconv_from_timm),))
