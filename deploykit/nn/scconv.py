"""Self-calibrated convolution (SCConv).

Liu et al., "Improving Convolutional Networks with Self-Calibrated Convolutions", CVPR 2020.
Official code: https://github.com/MCG-NKU/SCNet (`scnet.py`). Parameter names and the Sequential indices inside
`k2`/`k3`/`k4` match the official module, so its checkpoints load with `strict=True`.

    out = k4( k3(x) * sigmoid(x + up(k2(x))) )

`k2` average-pools by `pooling_r`, convolves and batch-normalises; `up` is nearest-neighbour resizing back to
x's size with the floor mapping of `F.interpolate(mode="nearest")` (it exports as ONNX `Resize` with
`coordinate_transformation_mode=asymmetric, nearest_mode=floor`, which TensorRT supports).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

NormLayer = Callable[[int], nn.Module]


def _conv3x3_bn(inplanes: int, planes: int, stride: int, padding: int, dilation: int, groups: int,
                norm_layer: NormLayer) -> list[nn.Module]:
    return [nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=padding, dilation=dilation,
                      groups=groups, bias=False),
            norm_layer(planes)]


class SCConv(nn.Module):
    """Self-calibrated 3x3 convolution; the argument order is the official one.

    Args:
        inplanes: input channels; must equal `planes` (x itself calibrates the k2 path).
        planes: output channels.
        stride: stride of the final `k4` conv (the calibration runs at input resolution).
        padding, dilation, groups: of every 3x3 conv.
        pooling_r: down-sampling rate of the calibration branch; inputs must be at least this large.
        norm_layer: normalisation after each conv. Defaults to `nn.BatchNorm2d`.
    """

    def __init__(self, inplanes: int, planes: int, stride: int = 1, padding: int = 1, dilation: int = 1,
                 groups: int = 1, pooling_r: int = 4, norm_layer: NormLayer | None = None) -> None:
        super().__init__()
        if inplanes != planes:
            raise ValueError(f"SCConv needs inplanes == planes (x gates its own k3 path); got {inplanes} and {planes}")
        if padding != dilation:
            raise ValueError(f"SCConv needs padding == dilation (its 3x3 k3 path must keep the input's size, which x "
                             f"gates); got padding {padding} and dilation {dilation}")
        norm_layer = norm_layer or nn.BatchNorm2d
        self.k2 = nn.Sequential(nn.AvgPool2d(kernel_size=pooling_r, stride=pooling_r),
                                *_conv3x3_bn(inplanes, planes, 1, padding, dilation, groups, norm_layer))
        self.k3 = nn.Sequential(*_conv3x3_bn(inplanes, planes, 1, padding, dilation, groups, norm_layer))
        self.k4 = nn.Sequential(*_conv3x3_bn(inplanes, planes, stride, padding, dilation, groups, norm_layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        calibration = torch.sigmoid(x + F.interpolate(self.k2(x), x.shape[2:]))
        return self.k4(self.k3(x) * calibration)
