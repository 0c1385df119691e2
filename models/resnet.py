"""torchvision-layout ResNet whose block convolutions come from a factory.

ODConv's and DY-CNN's official ResNets, and mmdet's ResNet backbone (DCN), are torchvision's ResNet with the block
convs swapped, so their checkpoints use torchvision's names (``layerN.i.conv1``, ``bn1``, ..., ``downsample.0/1``,
``fc``). Here the swap is an argument, `conv(in_planes, out_planes, kernel_size, stride)` (or one per stage),
instead of one copied ResNet per variant.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

ConvFactory = Callable[[int, int, int, int], nn.Module]  # (in_planes, out_planes, kernel_size, stride)


def init_resnet_weights(model: nn.Module) -> None:
    """The ResNet init every official model here uses: He-normal (fan_out) convs, BatchNorm = identity."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None, conv: ConvFactory):
        super().__init__()
        self.conv1 = conv(inplanes, planes, 3, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv(planes, planes, 3, 1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None, conv: ConvFactory):
        super().__init__()
        self.conv1 = conv(inplanes, planes, 1, 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv(planes, planes, 3, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv(planes, planes * 4, 1, 1)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


def plain_conv(in_planes: int, out_planes: int, kernel_size: int, stride: int) -> nn.Module:
    return nn.Conv2d(in_planes, out_planes, kernel_size, stride, padding=kernel_size // 2, bias=False)


class ResNet(nn.Module):
    """Args:
        block: BasicBlock or Bottleneck.
        conv: factory of the block convolutions, or four of them, one per stage (e.g. deformable convs in stages
            3-5 only).
        shortcut_conv: factory of the 1x1 downsample conv. Defaults to a plain nn.Conv2d.
        dropout: dropout before the classifier (ODConv's ResNets use 0.1), or None for none.
        num_classes: classifier outputs; 0 builds the backbone alone (as mmdet's ResNet), whose output is the
            last stage's feature map [N, 512 * expansion, H/32, W/32].
        out_indices: return the feature maps of these stages (0-3, mmdet's ``out_indices``) instead, as a dict
            ``{"c2": ..., "c5": ...}`` (``c<i + 2>``: stride 2^(i + 2)), what a detector's neck consumes; the
            classifier, if any, is then not run.
    """

    def __init__(self, block: type[nn.Module], layers: tuple[int, int, int, int],
                 conv: ConvFactory | Sequence[ConvFactory],
                 shortcut_conv: ConvFactory = plain_conv, num_classes: int = 1000, dropout: float | None = None,
                 out_indices: Sequence[int] | None = None):
        super().__init__()
        self.out_indices = tuple(out_indices) if out_indices is not None else None
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        stage_convs = tuple(conv) if isinstance(conv, Sequence) else (conv,) * 4
        for index, (planes, blocks, stage_conv) in enumerate(zip((64, 128, 256, 512), layers, stage_convs), start=1):
            self.add_module(f"layer{index}", self._make_layer(block, planes, blocks, 1 if index == 1 else 2,
                                                              stage_conv, shortcut_conv))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(dropout) if dropout is not None else nn.Identity()
        self.fc = nn.Linear(512 * block.expansion, num_classes) if num_classes else None
        init_resnet_weights(self)

    def _make_layer(self, block, planes: int, blocks: int, stride: int, conv: ConvFactory,
                    shortcut_conv: ConvFactory) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(shortcut_conv(self.inplanes, planes * block.expansion, 1, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, conv)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, None, conv) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        if self.out_indices is not None:
            features = {}
            for index, stage in enumerate((self.layer1, self.layer2, self.layer3, self.layer4)):
                x = stage(x)
                if index in self.out_indices:
                    features[f"c{index + 2}"] = x
                if index == max(self.out_indices):
                    return features
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        if self.fc is None:
            return x
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))
