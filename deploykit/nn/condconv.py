"""CondConv: conditionally parameterized convolution (sigmoid routing over K experts).

Yang et al., "CondConv: Conditionally Parameterized Convolutions for Efficient Inference", NeurIPS 2019.
Semantics and parameter layout follow timm's ``CondConv2d`` (the implementation behind the published
``tf_efficientnet_cc_*`` weights): expert kernels are stored flat as ``weight [E, out * in/g * kh * kw]``, the bias
as ``[E, out]``, and the routing weights come from the block (`CondConvRouting`), computed once and shared by the
block's convs. The per-sample aggregation + conv is the shared op `deploykit.ops.dynamic_conv2d`, so the layer
exports with a dynamic batch (timm's batch-into-groups trick does not).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from deploykit.ops.dynamic_conv2d import check_groups, dynamic_conv2d, register_neutral_inputs


def same_pads(size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int],
              dilation: tuple[int, int]) -> list[int]:
    """TensorFlow "SAME" padding for an input size: [top, left, bottom, right], the extra pixel at the end."""
    pads = [max((math.ceil(size[i] / stride[i]) - 1) * stride[i] + (kernel[i] - 1) * dilation[i] + 1 - size[i], 0)
            for i in range(2)]
    return [pads[0] // 2, pads[1] // 2, pads[0] - pads[0] // 2, pads[1] - pads[1] // 2]


def resolve_padding(padding: str | int, kernel: int, stride: int, dilation: int) -> int | None:
    """timm's padding rules: '' symmetric, 'valid' none, 'same' static when possible; None = dynamic 'same'."""
    symmetric = ((stride - 1) + dilation * (kernel - 1)) // 2
    if isinstance(padding, int):
        return padding
    if padding.lower() == "same":
        return symmetric if stride == 1 and (dilation * (kernel - 1)) % 2 == 0 else None
    return 0 if padding.lower() == "valid" else symmetric


class CondConvRouting(nn.Linear):
    """r(x) = sigmoid(GAP(x) R + b): one routing weight per expert, in [0, 1] and independent (not a softmax)."""

    def __init__(self, in_channels: int, num_experts: int) -> None:
        super().__init__(in_channels, num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(super().forward(x.mean((2, 3))))


class CondConv2d(nn.Module):
    """Conv whose kernel is the routing-weighted sum of `num_experts` expert kernels (timm's argument order).

    Args:
        padding: int, '' (symmetric), 'valid', or 'same' (TensorFlow; dynamic where stride/dilation need it).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: str | int = "", dilation: int = 1, groups: int = 1, bias: bool = False,
                 num_experts: int = 4) -> None:
        super().__init__()
        check_groups("CondConv2d", in_channels, out_channels, groups)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.groups, self.num_experts = groups, num_experts
        self.kernel_size, self.stride, self.dilation = (kernel_size,) * 2, (stride,) * 2, (dilation,) * 2
        self.padding = resolve_padding(padding, kernel_size, stride, dilation)
        self.weight_shape = (out_channels, in_channels // groups, kernel_size, kernel_size)
        self.weight = nn.Parameter(torch.empty(num_experts, math.prod(self.weight_shape)))
        self.bias = nn.Parameter(torch.empty(num_experts, out_channels)) if bias else None
        register_neutral_inputs(self, num_experts, out_channels, kernel_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for expert in self.weight.data:
            nn.init.kaiming_uniform_(expert.view(self.weight_shape), a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(math.prod(self.weight_shape[1:]))
            nn.init.uniform_(self.bias, -bound, bound)

    def pads(self, size: tuple[int, int]) -> list[int]:
        if self.padding is None:
            return same_pads(size, self.kernel_size, self.stride, self.dilation)
        return [self.padding] * 4

    def forward(self, x: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        bank = self.weight.view(self.num_experts, *self.weight_shape)
        bias = self.bias if self.bias is not None else self.no_bias
        return dynamic_conv2d(x, bank, routing_weights, bias, self.unit_taps, self.stride,
                              self.pads(tuple(x.shape[2:])), self.dilation, self.groups)
