"""Deformable convolution in the "pack" form users train: the offset (and mask) conv lives inside the layer.

Dai et al., "Deformable Convolutional Networks", ICCV 2017 (v1) and Zhu et al., "Deformable ConvNets v2", CVPR 2019
(v2, modulated). Names, shapes and initialisation follow mmcv's ``DeformConv2dPack`` (registered as ``DCN``) and
``ModulatedDeformConv2dPack`` (``DCNv2``), so mmcv/mmdet checkpoints load with ``strict=True``:

    weight [out, in/groups, kH, kW], bias [out] (v2 only, optional),
    conv_offset.weight [G*kH*kW*(2 or 3), in, kH, kW], conv_offset.bias

``conv_offset`` is a full conv with the layer's stride, padding and dilation. Its output is used as is: v1's is the
offset (interleaved dy, dx per tap); v2's first 2*G*kH*kW channels are the offset and the last G*kH*kW the mask
logits (mmcv's ``chunk(3)`` then ``cat`` of the first two chunks is the identity on the layout). It starts at zero,
so a fresh layer is a plain conv (times sigmoid(0) = 0.5 for v2).

`OffsetInputDeformConv2d`, the base of both, is the form whose offset (and mask) are forward arguments
(torchvision's ``DeformConv2d`` module, mmcv's non-pack layers).

Old mmdet checkpoints stored the offset conv as a sibling module, ``conv2_offset.*`` beside ``conv2.*``;
`deploykit.models.upgrade_state_dict` (which ``export.py`` applies) renames those keys as mmcv does.
"""

from __future__ import annotations

import abc
import math

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from deploykit.ops.deform_conv2d import deform_conv2d


class OffsetInputDeformConv2d(nn.Module):
    """Deformable conv whose offset (and mask) are forward arguments, predicted elsewhere in the network, as
    torchvision's ``DeformConv2d`` module and mmcv's non-pack ``DeformConv2d`` / ``ModulatedDeformConv2d`` take them.

    ``forward(x, offset, mask=None)``: v1 without a mask, v2 with one; the offset groups follow from the offset's
    channels (2*G*kH*kW). Same op, same ``deploykit::DeformConv2d`` node as the pack layers below, which subclass it.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by "
                             f"groups ({groups})")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torchvision's initialisation: weight He-uniform with a = sqrt(5), bias uniform in +-1/sqrt(fan_in)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return deform_conv2d(x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}")


class _DeformConvPack(OffsetInputDeformConv2d, abc.ABC):
    """What v1 and v2 share: the offset conv feeding the kernel, and the legacy key migration."""

    outputs_per_tap = 2  # offset channels (dy, dx) per tap and offset group; v2 adds the mask

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], stride=1, padding=0,
                 dilation=1, groups: int = 1, deform_groups: int = 1, bias: bool = False) -> None:
        if in_channels % deform_groups:
            raise ValueError(f"in_channels ({in_channels}) must be divisible by deform_groups ({deform_groups})")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        self.deform_groups = deform_groups
        taps = self.kernel_size[0] * self.kernel_size[1]
        self.conv_offset = nn.Conv2d(in_channels, deform_groups * taps * self.outputs_per_tap, self.kernel_size,
                                     self.stride, self.padding, self.dilation, bias=True)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    @abc.abstractmethod
    def reset_parameters(self) -> None:
        """Initialise `weight` (and `bias`) as mmcv does for this version."""

    def offset_and_mask(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The offset conv's output split as mmcv does: offsets first; for v2 the mask logits last (sigmoid)."""
        out = self.conv_offset(x)
        split = 2 * self.deform_groups * self.kernel_size[0] * self.kernel_size[1]
        return out[:, :split], (torch.sigmoid(out[:, split:]) if self.outputs_per_tap == 3 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x, *self.offset_and_mask(x))

    @staticmethod
    def upgrade_state_dict(prefix: str, state_dict: dict) -> None:
        """Rename a legacy sibling offset conv (``<name>_offset.*``) to ``<name>.conv_offset.*``, in place.

        mmcv does this in ``_load_from_state_dict``, which no longer sees sibling keys (torch >= 2 hands each
        module only its own); `deploykit.models.upgrade_state_dict` applies it from the model's root instead.
        """
        for suffix in ("weight", "bias"):
            legacy, current = f"{prefix[:-1]}_offset.{suffix}", f"{prefix}conv_offset.{suffix}"
            if current not in state_dict and legacy in state_dict:
                state_dict[current] = state_dict.pop(legacy)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, deform_groups={self.deform_groups}"


class DeformConv2d(_DeformConvPack):
    """DCNv1 with its offset conv (mmcv ``DeformConv2dPack``): no mask, and no bias (mmcv asserts it)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], stride=1, padding=0,
                 dilation=1, groups: int = 1, deform_groups: int = 1, bias: bool = False) -> None:
        if bias:
            raise ValueError("DeformConv2d (DCNv1, mmcv's DeformConv2dPack) has no bias; use ModulatedDeformConv2d")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, deform_groups)

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")


class ModulatedDeformConv2d(_DeformConvPack):
    """DCNv2 with its offset/mask conv (mmcv ``ModulatedDeformConv2dPack``): mask = sigmoid of the last third."""

    outputs_per_tap = 3

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], stride=1, padding=0,
                 dilation=1, groups: int = 1, deform_groups: int = 1, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, deform_groups,
                         bias)

    def reset_parameters(self) -> None:
        bound = 1 / math.sqrt(self.in_channels * self.kernel_size[0] * self.kernel_size[1])  # mmcv: full in_channels
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


# mmcv's names for the same layers.
DeformConv2dPack = DeformConv2d
ModulatedDeformConv2dPack = ModulatedDeformConv2d
