"""Omni-dimensional dynamic convolution (ODConv): attentions over kernel, output, input and spatial dims.

Li et al., "Omni-Dimensional Dynamic Convolution", ICLR 2022; official code https://github.com/OSVAI/ODConv
(``modules/odconv.py``). Names, shapes and the heads the official code omits are the same, so its checkpoints load
with ``strict=True``: no ``filter_fc`` for a depthwise conv, no ``spatial_fc`` for a 1x1 conv, no ``kernel_fc``
for a single kernel; the attention's BatchNorm (with running statistics) is in the state_dict.

    y = ( conv(x * a_in, sum_k a_k * (a_s * W_k)) ) * a_out

The input (channel) and output (filter) attentions are plain scalings around the shared
`deploykit.ops.dynamic_conv2d` op, which takes the kernel attention `a_k` and the spatial attention `a_s`.
The temperature (1 at construction; the official training anneals it from 30) is not in the state_dict.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deploykit.ops.dynamic_conv2d import check_groups, dynamic_conv2d, register_neutral_inputs


class ODAttention(nn.Module):
    """The four attention heads on a shared GAP -> fc -> BN -> ReLU trunk (official class ``Attention``)."""

    def __init__(self, in_planes: int, out_planes: int, kernel_size: int, groups: int = 1,
                 reduction: float = 0.0625, kernel_num: int = 4, min_channel: int = 16) -> None:
        super().__init__()
        channels = max(int(in_planes * reduction), min_channel)
        self.kernel_size, self.kernel_num, self.temperature = kernel_size, kernel_num, 1.0
        self.fc = nn.Conv2d(in_planes, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.channel_fc = nn.Conv2d(channels, in_planes, 1, bias=True)
        depthwise = in_planes == groups == out_planes
        self.filter_fc = None if depthwise else nn.Conv2d(channels, out_planes, 1, bias=True)
        self.spatial_fc = None if kernel_size == 1 else nn.Conv2d(channels, kernel_size * kernel_size, 1, bias=True)
        self.kernel_fc = None if kernel_num == 1 else nn.Conv2d(channels, kernel_num, 1, bias=True)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def update_temperature(self, temperature: float) -> None:
        self.temperature = temperature

    def forward(self, x: torch.Tensor):
        """(input [N,C,1,1], output [N,M,1,1] or None, spatial [N,k,k] or None, kernel [N,K] or None) attentions."""
        z = self.relu(self.bn(self.fc(x.mean((2, 3), keepdim=True))))
        t = self.temperature
        channel = torch.sigmoid(self.channel_fc(z) / t)
        filt = None if self.filter_fc is None else torch.sigmoid(self.filter_fc(z) / t)
        spatial = None if self.spatial_fc is None else torch.sigmoid(
            self.spatial_fc(z).view(-1, self.kernel_size, self.kernel_size) / t)
        kernel = None if self.kernel_fc is None else torch.softmax(self.kernel_fc(z).flatten(1) / t, dim=1)
        return channel, filt, spatial, kernel


class ODConv2d(nn.Module):
    """ODConv with the official argument order (no bias)."""

    def __init__(self, in_planes: int, out_planes: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, groups: int = 1, reduction: float = 0.0625, kernel_num: int = 4) -> None:
        super().__init__()
        check_groups("ODConv2d", in_planes, out_planes, groups)
        self.kernel_size, self.stride, self.padding, self.dilation, self.groups = \
            kernel_size, stride, padding, dilation, groups
        self.kernel_num = kernel_num
        self.attention = ODAttention(in_planes, out_planes, kernel_size, groups, reduction, kernel_num)
        self.weight = nn.Parameter(torch.randn(kernel_num, out_planes, in_planes // groups, kernel_size, kernel_size))
        register_neutral_inputs(self, kernel_num, out_planes, kernel_size)
        for kernel in self.weight.data:
            nn.init.kaiming_normal_(kernel, mode="fan_out", nonlinearity="relu")

    def update_temperature(self, temperature: float) -> None:
        self.attention.update_temperature(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel, filt, spatial, kernel = self.attention(x)
        x = x * channel
        if self.kernel_size == 1 and self.kernel_num == 1:  # a plain 1x1 conv between the two scalings
            y = F.conv2d(x, self.weight[0], None, self.stride, self.padding, self.dilation, self.groups)
        else:
            kernel = x.new_ones(x.shape[0], 1) if kernel is None else kernel
            spatial = self.unit_taps if spatial is None else spatial
            y = dynamic_conv2d(x, self.weight, kernel, self.no_bias, spatial, (self.stride,) * 2,
                               [self.padding] * 4, (self.dilation,) * 2, self.groups)
        return y if filt is None else y * filt


def set_temperature(model: nn.Module, temperature: float) -> nn.Module:
    """Set the attention temperature of every ODConv2d in `model` (1 for inference)."""
    for module in model.modules():
        if isinstance(module, ODConv2d):
            module.update_temperature(temperature)
    return model
