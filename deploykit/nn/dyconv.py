"""Dynamic convolution (DY-CNN): softmax attention with temperature over K kernels and biases.

Chen et al., "Dynamic Convolution: Attention over Convolution Kernels", CVPR 2020. No official code was released;
parameter names follow kaijieshi7/Dynamic-convolution-Pytorch (``Dynamic_conv2d``), which ODConv's official code
builds on: ``weight [K, out, in/g, k, k]``, ``bias [K, out]``, ``attention.fc1`` / ``attention.fc2``.

The temperature is not a parameter and not in the state_dict. The paper anneals it linearly from 30 to 1 over the
first 10 epochs (`temperature_schedule`); the reference repo starts at 34 and subtracts 3 per epoch
(`DyConv2d.update_temperature`). Trained weights are meant for T = 1: set it (`set_temperature`) before
evaluating or exporting; it is baked into the exported graph as a constant.
"""

from __future__ import annotations

import torch
from torch import nn

from deploykit.ops.dynamic_conv2d import check_groups, dynamic_conv2d, register_neutral_inputs


class DyAttention(nn.Module):
    """pi(x) = softmax(fc2(relu(fc1(GAP(x)))) / T) over the K kernels (no BatchNorm, as in the reference code)."""

    def __init__(self, in_planes: int, ratio: float, kernels: int, temperature: float) -> None:
        super().__init__()
        hidden = kernels if in_planes == 3 else int(in_planes * ratio) + 1
        self.fc1 = nn.Conv2d(in_planes, hidden, 1, bias=False)
        self.fc2 = nn.Conv2d(hidden, kernels, 1, bias=True)
        self.temperature = temperature
        for conv in (self.fc1, self.fc2):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))).flatten(1)
        return torch.softmax(logits / self.temperature, dim=1)


class DyConv2d(nn.Module):
    """Dynamic conv with the reference repo's argument order and defaults (K=4, ratio 0.25, T=34)."""

    def __init__(self, in_planes: int, out_planes: int, kernel_size: int, ratio: float = 0.25, stride: int = 1,
                 padding: int = 0, dilation: int = 1, groups: int = 1, bias: bool = True, K: int = 4,
                 temperature: float = 34, init_weight: bool = True) -> None:
        super().__init__()
        check_groups("DyConv2d", in_planes, out_planes, groups)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.attention = DyAttention(in_planes, ratio, K, temperature)
        self.weight = nn.Parameter(torch.randn(K, out_planes, in_planes // groups, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(K, out_planes)) if bias else None
        register_neutral_inputs(self, K, out_planes, kernel_size)
        if init_weight:
            for kernel in self.weight.data:
                nn.init.kaiming_uniform_(kernel)

    @property
    def temperature(self) -> float:
        return self.attention.temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self.attention.temperature = value

    def update_temperature(self) -> None:
        """The reference repo's per-epoch step: T -= 3 until it reaches 1."""
        if self.temperature > 1:
            self.temperature = max(1, self.temperature - 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.bias is not None else self.no_bias
        return dynamic_conv2d(x, self.weight, self.attention(x), bias, self.unit_taps, (self.stride,) * 2,
                              [self.padding] * 4, (self.dilation,) * 2, self.groups)


def temperature_schedule(epoch: float, start: float = 30.0, end: float = 1.0, epochs: float = 10.0) -> float:
    """The paper's annealing: linear from `start` to `end` over the first `epochs` epochs, then `end`."""
    return end + max(0.0, start - end) * max(0.0, 1.0 - epoch / epochs)


def set_temperature(model: nn.Module, temperature: float) -> nn.Module:
    """Set the softmax temperature of every DyConv2d in `model` (T = 1 for trained weights)."""
    for module in model.modules():
        if isinstance(module, DyConv2d):
            module.temperature = temperature
    return model
