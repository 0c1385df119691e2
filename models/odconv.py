"""ODConv's official models (OSVAI/ODConv ``models/od_resnet.py``, ``models/od_mobilenetv2.py``).

Every block conv is an ODConv2d; ResNet's stem and downsample 1x1 stay plain convs, MobileNetV2's stem stays
plain. ``kernel_num`` 1 and 4 are the published "ODConv (1x)" and "(4x)" models. Checkpoints from the official
``main.py`` are ``{"state_dict": ...}`` with DDP's ``module.`` prefix, which the checkpoint loader strips.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from deploykit.nn.odconv import ODConv2d

from .resnet import BasicBlock, Bottleneck, ResNet

REDUCTION = 0.0625


def _odconv(in_planes: int, out_planes: int, kernel_size: int, stride: int, kernel_num: int) -> ODConv2d:
    return ODConv2d(in_planes, out_planes, kernel_size, stride, padding=kernel_size // 2, reduction=REDUCTION,
                    kernel_num=kernel_num)


def _od_resnet(block, layers, kernel_num: int, **kwargs) -> ResNet:
    model = ResNet(block, layers, conv=partial(_odconv, kernel_num=kernel_num), dropout=0.1, **kwargs)
    nn.init.normal_(model.fc.weight, 0, 0.01)
    nn.init.zeros_(model.fc.bias)
    return model


def od_resnet18(kernel_num: int = 1, **kwargs) -> ResNet:
    """ODConv ResNet-18: 11.94M parameters (1x), 44.90M (4x)."""
    return _od_resnet(BasicBlock, (2, 2, 2, 2), kernel_num, **kwargs)


def od_resnet50(kernel_num: int = 1, **kwargs) -> ResNet:
    """ODConv ResNet-50: 28.64M parameters (1x), 90.67M (4x)."""
    return _od_resnet(Bottleneck, (3, 4, 6, 3), kernel_num, **kwargs)


def _make_divisible(value: float, divisor: int = 8) -> int:
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ODConvBNReLU(nn.Sequential):
    def __init__(self, in_planes: int, out_planes: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
                 kernel_num: int = 1) -> None:
        super().__init__(ODConv2d(in_planes, out_planes, kernel_size, stride, (kernel_size - 1) // 2, groups=groups,
                                  reduction=REDUCTION, kernel_num=kernel_num),
                         nn.BatchNorm2d(out_planes), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int, kernel_num: int) -> None:
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ODConvBNReLU(inp, hidden, kernel_size=1, kernel_num=kernel_num))
        layers += [ODConvBNReLU(hidden, hidden, stride=stride, groups=hidden, kernel_num=kernel_num),
                   ODConv2d(hidden, oup, 1, 1, 0, reduction=REDUCTION, kernel_num=kernel_num),
                   nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


# expansion t, channels c, repeats n, stride s
_MOBILENETV2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                        (6, 320, 1, 1))


class ODMobileNetV2(nn.Module):
    def __init__(self, width_mult: float = 1.0, kernel_num: int = 1, num_classes: int = 1000,
                 dropout: float = 0.2) -> None:
        super().__init__()
        channels = _make_divisible(32 * width_mult)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, channels, 3, 2, 1, bias=False),
                                                   nn.BatchNorm2d(channels), nn.ReLU6(inplace=True))]
        for t, c, n, s in _MOBILENETV2_SETTING:
            out = _make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(channels, out, s if i == 0 else 1, t, kernel_num))
                channels = out
        features.append(ODConvBNReLU(channels, self.last_channel, kernel_size=1, kernel_num=kernel_num))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).mean((2, 3))
        return self.classifier(x)


def od_mobilenetv2_100(kernel_num: int = 1, **kwargs) -> ODMobileNetV2:
    """ODConv MobileNetV2 1.0: 4.94M parameters (1x), 11.51M (4x)."""
    return ODMobileNetV2(width_mult=1.0, kernel_num=kernel_num, **kwargs)
