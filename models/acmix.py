"""ACmix ResNets: torchvision ResNet v1.5 bottlenecks whose 3x3 conv is an ACmix layer (k_att=7, head=4, k_conv=3).

The official ``ACmix_ResNet(layers)`` (https://github.com/LeapLabTHU/ACmix, ``ResNet/ResNet_ImageNet.py``) is
torchvision's ResNet with ``Bottleneck.conv2 = ACmix(width, width, k_att, head, k_conv, stride=stride)``, so the keys
are torchvision's plus the ACmix ones: ``layer1.0.conv2.rate1``, ``layer1.0.conv2.conv_p.weight``,
``layer1.0.conv2.dep_conv.weight``, ... The depths are the paper's: ResNet-26 [1, 2, 4, 1], ResNet-38 [2, 3, 5, 2]
and ResNet-50 [3, 4, 6, 3]; they build 10.49M, 14.41M and 18.33M parameters (the README's 10.6M / 14.6M / 18.6M are
not what the code builds).

As in the official model, the ResNet init (He-normal on every ``nn.Conv2d``) runs after the ACmix layers are built,
so it overwrites ``dep_conv``'s one-hot shift kernels with random weights; a trained checkpoint is unaffected, and
this is the official behaviour, so it is kept.
"""

from __future__ import annotations

from torch import nn

from deploykit.nn.acmix import ACmix

from .resnet import Bottleneck, ResNet, plain_conv


def acmix_conv(in_planes: int, out_planes: int, kernel_size: int, stride: int) -> nn.Module:
    """Block-conv factory: the bottleneck's 3x3 conv is ACmix (k_att=7, head=4, k_conv=3), the 1x1 convs plain."""
    if kernel_size != 3:
        return plain_conv(in_planes, out_planes, kernel_size, stride)
    return ACmix(in_planes, out_planes, kernel_att=7, head=4, kernel_conv=3, stride=stride)


def _acmix_resnet(layers: tuple[int, int, int, int], num_classes: int) -> ResNet:
    return ResNet(Bottleneck, layers, conv=acmix_conv, num_classes=num_classes)


def acmix_resnet26(num_classes: int = 1000) -> ResNet:
    """ACmix ResNet-26, bottleneck depths [1, 2, 4, 1] (10.49M parameters)."""
    return _acmix_resnet((1, 2, 4, 1), num_classes)


def acmix_resnet38(num_classes: int = 1000) -> ResNet:
    """ACmix ResNet-38, bottleneck depths [2, 3, 5, 2] (14.41M parameters)."""
    return _acmix_resnet((2, 3, 5, 2), num_classes)


def acmix_resnet50(num_classes: int = 1000) -> ResNet:
    """ACmix ResNet-50, bottleneck depths [3, 4, 6, 3] (18.33M parameters)."""
    return _acmix_resnet((3, 4, 6, 3), num_classes)
