"""The deformable conv layers' export contract: the shared ``deploykit::DeformConv2d`` node (body: ONNX DeformConv).

Reference: y = DeformConv(x, W, offset, b, mask) with [offset | mask logits] = conv_offset(x) (a plain conv with
the layer's stride, padding and dilation) and mask = sigmoid(logits) for v2, ones for v1.
"""

from __future__ import annotations

import functools

import numpy as np
from torch import nn
from torch.nn.modules.utils import _pair

from deploykit.nn.deform_conv import DeformConv2d, ModulatedDeformConv2d, OffsetInputDeformConv2d
from deploykit.ops import reference as ref
from deploykit.ops.deform_conv2d import DEFORM_CONV2D, deform_conv2d_reference
from deploykit.ops.spec import LayerRule, Unfit, VariantSpec, attribute


def deform_conv_reference(module: DeformConv2d | ModulatedDeformConv2d, x: np.ndarray) -> np.ndarray:
    """Float64 forward of either pack layer, from its parameters."""
    x = x.astype(np.float64)
    taps = module.kernel_size[0] * module.kernel_size[1]
    predicted = ref.conv2d(x, ref.array(module.conv_offset.weight), ref.array(module.conv_offset.bias),
                           module.stride, module.padding, module.dilation)
    split = 2 * module.deform_groups * taps
    offset = predicted[:, :split]
    mask = ref.sigmoid(predicted[:, split:]) if isinstance(module, ModulatedDeformConv2d) else \
        np.ones((x.shape[0], module.deform_groups * taps, *offset.shape[2:]))
    bias = ref.array(module.bias) if module.bias is not None else np.zeros(module.out_channels)
    pads = [*module.padding, *module.padding]
    return deform_conv2d_reference(x, ref.array(module.weight), offset, bias, mask, module.stride, pads,
                                   module.dilation, module.groups, module.deform_groups)


def _geometry(layer: nn.Module) -> dict[str, tuple[int, int]]:
    """kernel_size, stride, padding and dilation as pairs (torchvision and mmcv store pairs, or ints)."""
    return {name: _pair(attribute(layer, name)) for name in ("kernel_size", "stride", "padding", "dilation")}


def offset_input_from_official(layer: nn.Module) -> OffsetInputDeformConv2d:
    """torchvision's ``DeformConv2d`` module, mmcv's ``DeformConv2d`` (no bias) and ``ModulatedDeformConv2d``: the
    offset (and mask) come as forward arguments, so the offset groups follow from them at every call."""
    return OffsetInputDeformConv2d(attribute(layer, "in_channels"), attribute(layer, "out_channels"),
                                   groups=attribute(layer, "groups"), bias=getattr(layer, "bias", None) is not None,
                                   **_geometry(layer))


def pack_from_mmcv(target: type[DeformConv2d | ModulatedDeformConv2d], layer: nn.Module) -> nn.Module:
    """mmcv's ``DeformConv2dPack`` / ``ModulatedDeformConv2dPack``, whose ``conv_offset`` must share the layer's
    stride, padding and dilation (as mmcv builds it; deploykit's offset conv always does)."""
    geometry = _geometry(layer)
    conv_offset = attribute(layer, "conv_offset")
    for name in ("stride", "padding", "dilation"):
        if _pair(attribute(conv_offset, name)) != geometry[name]:
            raise Unfit(f"its `conv_offset` has {name} {attribute(conv_offset, name)}, not the layer's "
                        f"{geometry[name]}")
    return target(attribute(layer, "in_channels"), attribute(layer, "out_channels"), groups=attribute(layer, "groups"),
                  deform_groups=attribute(layer, "deform_groups"), bias=getattr(layer, "bias", None) is not None,
                  **geometry)


SPEC = VariantSpec(name="deform_conv", module=DeformConv2d, reference=deform_conv_reference,
                   tolerance={"float32": 1e-4}, custom_ops=(DEFORM_CONV2D,),
                   conversions=(
                       LayerRule(("DeformConv2dPack",), DeformConv2d, functools.partial(pack_from_mmcv, DeformConv2d)),
                       LayerRule(("ModulatedDeformConv2dPack",), ModulatedDeformConv2d,
                                 functools.partial(pack_from_mmcv, ModulatedDeformConv2d)),
                       LayerRule(("DeformConv2d", "ModulatedDeformConv2d"), OffsetInputDeformConv2d,
                                 offset_input_from_official)))
