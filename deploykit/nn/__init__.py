"""Layer 1: the PyTorch modules of every conv variant deploykit owns (one file per variant)."""

from deploykit.nn.acmix import ACmix
from deploykit.nn.condconv import CondConv2d, CondConvRouting
from deploykit.nn.deform_conv import DeformConv2d, ModulatedDeformConv2d, OffsetInputDeformConv2d
from deploykit.nn.dyconv import DyConv2d
from deploykit.nn.odconv import ODConv2d
from deploykit.nn.scconv import SCConv
from deploykit.nn.tvconv import TVConv

__all__ = ["ACmix", "CondConv2d", "CondConvRouting", "DeformConv2d", "DyConv2d", "ModulatedDeformConv2d", "ODConv2d",
           "OffsetInputDeformConv2d", "SCConv", "TVConv"]
