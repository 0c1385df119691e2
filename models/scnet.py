"""SCNet: ResNet with self-calibrated convolutions in every bottleneck.

Liu et al., CVPR 2020; official code https://github.com/MCG-NKU/SCNet. Module names, Sequential indices and
shapes equal the official release (scnet50 has 704 state_dict keys), so its bare state_dict checkpoints
(`scnet50-dc6a7e87.pth`, `scnet50_v1d-4109d1e1.pth`, `scnet101-44c5b751.pth`) load with `strict=True`.

The `_v1d` variants use the ResNet-D tricks: a deep 3x3 stem, average-pool shortcuts (`avg_down`) and
average-pool downsampling in the bottleneck (`avd`).
"""

from __future__ import annotations

import torch
from torch import nn

from deploykit.nn import SCConv

from .resnet import init_resnet_weights

POOLING_R = 4  # down-sampling rate of the calibration branch in every SCConv


class SCBottleneck(nn.Module):
    """Two half-width branches, a plain 3x3 (`k1`) and an SCConv, concatenated and projected by `conv3`."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 cardinality: int = 1, bottleneck_width: int = 32, avd: bool = False, dilation: int = 1,
                 is_first: bool = False, norm_layer: type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        width = int(planes * (bottleneck_width / 64.0)) * cardinality
        self.conv1_a = nn.Conv2d(inplanes, width, kernel_size=1, bias=False)
        self.bn1_a = norm_layer(width)
        self.conv1_b = nn.Conv2d(inplanes, width, kernel_size=1, bias=False)
        self.bn1_b = norm_layer(width)
        self.avd = avd and (stride > 1 or is_first)
        if self.avd:
            # ResNet-D: downsample by average pooling after the 3x3 convs instead of striding them.
            self.avd_layer = nn.AvgPool2d(3, stride, padding=1)
            stride = 1
        self.k1 = nn.Sequential(
            nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=dilation, dilation=dilation,
                      groups=cardinality, bias=False),
            norm_layer(width))
        self.scconv = SCConv(width, width, stride, dilation, dilation, cardinality, POOLING_R, norm_layer)
        self.conv3 = nn.Conv2d(width * 2, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_a = self.relu(self.k1(self.relu(self.bn1_a(self.conv1_a(x)))))
        out_b = self.relu(self.scconv(self.relu(self.bn1_b(self.conv1_b(x)))))
        if self.avd:
            out_a, out_b = self.avd_layer(out_a), self.avd_layer(out_b)
        out = self.bn3(self.conv3(torch.cat([out_a, out_b], dim=1)))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(out + residual)


class SCNet(nn.Module):
    """SCNet backbone + classifier.

    Args:
        layers: bottlenecks per stage, e.g. (3, 4, 6, 3) for SCNet-50.
        deep_stem: three 3x3 convs (`stem_width`, `stem_width`, 2*`stem_width` channels) instead of one 7x7.
        avg_down: shortcut downsampling by AvgPool + 1x1 conv instead of a strided 1x1 conv.
        avd: bottleneck downsampling by AvgPool after the 3x3 convs.
    """

    def __init__(self, layers: tuple[int, int, int, int], groups: int = 1, bottleneck_width: int = 32,
                 num_classes: int = 1000, deep_stem: bool = False, stem_width: int = 64, avg_down: bool = False,
                 avd: bool = False, norm_layer: type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.cardinality = groups
        self.bottleneck_width = bottleneck_width
        self.avg_down = avg_down
        self.avd = avd
        self.inplanes = stem_width * 2 if deep_stem else 64
        if deep_stem:
            self.conv1 = nn.Sequential(
                nn.Conv2d(3, stem_width, kernel_size=3, stride=2, padding=1, bias=False),
                norm_layer(stem_width), nn.ReLU(inplace=True),
                nn.Conv2d(stem_width, stem_width, kernel_size=3, stride=1, padding=1, bias=False),
                norm_layer(stem_width), nn.ReLU(inplace=True),
                nn.Conv2d(stem_width, stem_width * 2, kernel_size=3, stride=1, padding=1, bias=False))
        else:
            self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0], 1, norm_layer, is_first=False)
        self.layer2 = self._make_layer(128, layers[1], 2, norm_layer)
        self.layer3 = self._make_layer(256, layers[2], 2, norm_layer)
        self.layer4 = self._make_layer(512, layers[3], 2, norm_layer)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * SCBottleneck.expansion, num_classes)
        init_resnet_weights(self)

    def _make_layer(self, planes: int, blocks: int, stride: int, norm_layer: type[nn.Module],
                    is_first: bool = True) -> nn.Sequential:
        out_planes = planes * SCBottleneck.expansion
        downsample = None
        if stride != 1 or self.inplanes != out_planes:
            if self.avg_down:
                shortcut: list[nn.Module] = [
                    nn.AvgPool2d(kernel_size=stride, stride=stride, ceil_mode=True, count_include_pad=False),
                    nn.Conv2d(self.inplanes, out_planes, kernel_size=1, stride=1, bias=False)]
            else:
                shortcut = [nn.Conv2d(self.inplanes, out_planes, kernel_size=1, stride=stride, bias=False)]
            downsample = nn.Sequential(*shortcut, norm_layer(out_planes))
        common = dict(cardinality=self.cardinality, bottleneck_width=self.bottleneck_width, avd=self.avd,
                      norm_layer=norm_layer)
        blocks_list = [SCBottleneck(self.inplanes, planes, stride, downsample, is_first=is_first, **common)]
        self.inplanes = out_planes
        blocks_list += [SCBottleneck(self.inplanes, planes, **common) for _ in range(1, blocks)]
        return nn.Sequential(*blocks_list)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def scnet50(**kwargs) -> SCNet:
    """SCNet-50 (25.56M parameters, 77.81% ImageNet top-1 officially)."""
    return SCNet((3, 4, 6, 3), deep_stem=False, stem_width=32, avg_down=False, avd=False, **kwargs)


def scnet50_v1d(**kwargs) -> SCNet:
    """SCNet-50 with ResNet-D stem and downsampling (25.58M parameters, 80.47% top-1 officially)."""
    return SCNet((3, 4, 6, 3), deep_stem=True, stem_width=32, avg_down=True, avd=True, **kwargs)


def scnet101(**kwargs) -> SCNet:
    """SCNet-101 (44.57M parameters, 78.94% top-1 officially)."""
    return SCNet((3, 4, 23, 3), deep_stem=False, stem_width=64, avg_down=False, avd=False, **kwargs)


def scnet101_v1d(**kwargs) -> SCNet:
    """SCNet-101 with ResNet-D stem and downsampling (no official weights were released)."""
    return SCNet((3, 4, 23, 3), deep_stem=True, stem_width=64, avg_down=True, avd=True, **kwargs)
