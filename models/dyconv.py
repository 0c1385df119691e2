"""DY-CNN ResNet (kaijieshi7/Dynamic-convolution-Pytorch ``dynamic_models/dy_resnet.py``).

torchvision's ResNet with every block conv *and* the downsample 1x1 as a DyConv2d (K=4, no bias); the stem stays
plain. Built for inference (T = 1, the temperature trained weights expect); pass ``temperature=34`` to start
training as the reference repo does.
"""

from __future__ import annotations

from functools import partial

from deploykit.nn.dyconv import DyConv2d

from .resnet import BasicBlock, ResNet


def _dyconv(in_planes: int, out_planes: int, kernel_size: int, stride: int, temperature: float) -> DyConv2d:
    return DyConv2d(in_planes, out_planes, kernel_size, stride=stride, padding=kernel_size // 2, bias=False,
                    temperature=temperature)


def dy_resnet18(temperature: float = 1.0, **kwargs) -> ResNet:
    """DY-ResNet-18: 45.48M parameters."""
    conv = partial(_dyconv, temperature=temperature)
    return ResNet(BasicBlock, (2, 2, 2, 2), conv=conv, shortcut_conv=conv, **kwargs)
