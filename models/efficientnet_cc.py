"""EfficientNet-B0 with CondConv in the last three stages (timm ``efficientnet_cc_b0_4e`` and the TF port).

Module names, order and shapes follow timm (376 state_dict keys, 13.31M parameters for 4 experts), whose
``tf_efficientnet_cc_b0_4e`` weights are the published ones. The ``tf_`` variant differs only by BatchNorm eps
1e-3 and TensorFlow "SAME" padding, which is asymmetric at stride 2 and computed from the input size; the input
size is static in an export, so that padding exports exactly (as constant pads).

In a `CondConvResidual` block the routing weights are computed once from the block input,
sigmoid(Linear(GAP(x))), and shared by its three CondConv layers (expand, depthwise, project).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from deploykit.nn.condconv import CondConv2d, CondConvRouting, resolve_padding, same_pads

# (block type, repeats, kernel, stride, expansion, out channels, experts); every block has SE ratio 0.25.
_B0_STAGES = (("ds", 1, 3, 1, 1, 16, 0), ("ir", 2, 3, 2, 6, 24, 0), ("ir", 2, 5, 2, 6, 40, 0),
              ("ir", 3, 3, 2, 6, 80, 0), ("ir", 3, 5, 1, 6, 112, 4), ("ir", 4, 5, 2, 6, 192, 4),
              ("ir", 1, 3, 1, 6, 320, 4))


class Conv2dPadded(nn.Conv2d):
    """nn.Conv2d with timm's padding rules ('' symmetric, 'same' TensorFlow-style, dynamic where needed)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 padding: str = "", bias: bool = False) -> None:
        resolved = resolve_padding(padding, kernel_size, stride, 1)
        super().__init__(in_channels, out_channels, kernel_size, stride, resolved or 0, groups=groups, bias=bias)
        self.dynamic_same = resolved is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_same:
            top, left, bottom, right = same_pads(tuple(x.shape[2:]), self.kernel_size, self.stride, self.dilation)
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm followed by an activation (same state_dict keys as BatchNorm2d)."""

    def __init__(self, channels: int, eps: float, act: bool = True) -> None:
        super().__init__(channels, eps=eps)
        self.act = nn.SiLU(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1, bias=True)
        self.act1 = nn.SiLU(inplace=True)
        self.conv_expand = nn.Conv2d(reduced, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.conv_expand(self.act1(self.conv_reduce(x.mean((2, 3), keepdim=True)))))


class DepthwiseSeparableConv(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, kernel: int, stride: int, eps: float, padding: str) -> None:
        super().__init__()
        self.conv_dw = Conv2dPadded(in_chs, in_chs, kernel, stride, groups=in_chs, padding=padding)
        self.bn1 = BatchNormAct2d(in_chs, eps)
        self.se = SqueezeExcite(in_chs, round(in_chs * 0.25))
        self.conv_pw = Conv2dPadded(in_chs, out_chs, 1, padding=padding)
        self.bn2 = BatchNormAct2d(out_chs, eps, act=False)
        self.has_skip = stride == 1 and in_chs == out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv_pw(self.se(self.bn1(self.conv_dw(x)))))
        return out + x if self.has_skip else out


class InvertedResidual(nn.Module):
    """Expand 1x1 -> depthwise kxk -> SE -> project 1x1; convs made by `_conv` so CondConv can swap them."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int, stride: int, expansion: int, eps: float,
                 padding: str, experts: int = 0) -> None:
        super().__init__()
        mid = in_chs * expansion
        self.experts = experts
        self.conv_pw = self._conv(in_chs, mid, 1, 1, 1, padding)
        self.bn1 = BatchNormAct2d(mid, eps)
        self.conv_dw = self._conv(mid, mid, kernel, stride, mid, padding)
        self.bn2 = BatchNormAct2d(mid, eps)
        self.se = SqueezeExcite(mid, round(mid * 0.25 / expansion))
        self.conv_pwl = self._conv(mid, out_chs, 1, 1, 1, padding)
        self.bn3 = BatchNormAct2d(out_chs, eps, act=False)
        self.has_skip = stride == 1 and in_chs == out_chs

    def _conv(self, in_chs: int, out_chs: int, kernel: int, stride: int, groups: int, padding: str) -> nn.Module:
        if self.experts:
            return CondConv2d(in_chs, out_chs, kernel, stride, padding, groups=groups, num_experts=self.experts)
        return Conv2dPadded(in_chs, out_chs, kernel, stride, groups=groups, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(self.conv_pw(x))
        out = self.se(self.bn2(self.conv_dw(out)))
        out = self.bn3(self.conv_pwl(out))
        return out + x if self.has_skip else out


class CondConvResidual(InvertedResidual):
    """InvertedResidual whose three convs are CondConv2d sharing one routing computed from the block input."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int, stride: int, expansion: int, eps: float,
                 padding: str, experts: int) -> None:
        super().__init__(in_chs, out_chs, kernel, stride, expansion, eps, padding, experts)
        self.routing_fn = CondConvRouting(in_chs, experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = self.routing_fn(x)
        out = self.bn1(self.conv_pw(x, routing))
        out = self.se(self.bn2(self.conv_dw(out, routing)))
        out = self.bn3(self.conv_pwl(out, routing))
        return out + x if self.has_skip else out


class EfficientNetCondConv(nn.Module):
    def __init__(self, experts_multiplier: int = 1, tf_port: bool = False, num_classes: int = 1000) -> None:
        super().__init__()
        eps, padding = (1e-3, "same") if tf_port else (1e-5, "")
        self.conv_stem = Conv2dPadded(3, 32, 3, 2, padding=padding)
        self.bn1 = BatchNormAct2d(32, eps)
        stages, channels = [], 32
        for kind, repeats, kernel, stride, expansion, out_chs, experts in _B0_STAGES:
            blocks = []
            for i in range(repeats):
                s = stride if i == 0 else 1
                if kind == "ds":
                    blocks.append(DepthwiseSeparableConv(channels, out_chs, kernel, s, eps, padding))
                elif experts:
                    blocks.append(CondConvResidual(channels, out_chs, kernel, s, expansion, eps, padding,
                                                   experts * experts_multiplier))
                else:
                    blocks.append(InvertedResidual(channels, out_chs, kernel, s, expansion, eps, padding))
                channels = out_chs
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head = Conv2dPadded(channels, 1280, 1, padding=padding)
        self.bn2 = BatchNormAct2d(1280, eps)
        self.classifier = nn.Linear(1280, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """Google's EfficientNet init: normal(0, sqrt(2 / fan_out)) per conv / expert, uniform for Linear."""
        for name, m in self.named_modules():
            if isinstance(m, CondConv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                for expert in m.weight.data:
                    nn.init.normal_(expert, 0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                fan = m.weight.shape[0] + (m.weight.shape[1] if name.endswith("routing_fn") else 0)
                nn.init.uniform_(m.weight, -1 / math.sqrt(fan), 1 / math.sqrt(fan))
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.conv_head(self.blocks(self.bn1(self.conv_stem(x)))))
        return self.classifier(x.mean((2, 3)))


def efficientnet_cc_b0_4e(**kwargs) -> EfficientNetCondConv:
    """EfficientNet-CondConv-B0, 4 experts (13.31M parameters)."""
    return EfficientNetCondConv(experts_multiplier=1, **kwargs)


def tf_efficientnet_cc_b0_4e(**kwargs) -> EfficientNetCondConv:
    """The TensorFlow port (published weights): BatchNorm eps 1e-3, TF "SAME" padding."""
    return EfficientNetCondConv(experts_multiplier=1, tf_port=True, **kwargs)
