"""ResNet-50 with deformable 3x3 convs in stages 3-5, the common detection-backbone setting ("dconv_c3-c5").

mmdet's ``ResNet(depth=50, dcn=dict(type='DCNv2', deform_groups=1, fallback_on_stride=False),
stage_with_dcn=(False, True, True, True))``: in ``layer2``-``layer4`` every bottleneck's ``conv2`` is a deformable
conv (3x3, the block's stride, padding 1, no bias) with its offset conv inside, so the keys are mmdet's:
``layer3.0.conv2.weight``, ``layer3.0.conv2.conv_offset.weight``, ... The rest is torchvision's ResNet-50 (the
names mmdet's ResNet uses too) with its ImageNet classifier ``fc``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from deploykit.nn.deform_conv import DeformConv2d, ModulatedDeformConv2d

from .resnet import Bottleneck, ConvFactory, ResNet, plain_conv


def _deformable_3x3(layer: type[nn.Module]) -> ConvFactory:
    """Block-conv factory: the 3x3 conv deformable, the 1x1 convs plain."""
    def conv(in_planes: int, out_planes: int, kernel_size: int, stride: int) -> nn.Module:
        if kernel_size != 3:
            return plain_conv(in_planes, out_planes, kernel_size, stride)
        return layer(in_planes, out_planes, 3, stride, padding=1, bias=False)
    return conv


def _dcn_resnet50(layer: type[nn.Module], num_classes: int, out_indices: Sequence[int] | None) -> ResNet:
    deformable = _deformable_3x3(layer)
    model = ResNet(Bottleneck, (3, 4, 6, 3), conv=(plain_conv, deformable, deformable, deformable),
                   num_classes=num_classes, out_indices=out_indices)
    for module in model.modules():  # ResNet's init touched the offset convs; mmcv's own init keeps them at zero
        if isinstance(module, (DeformConv2d, ModulatedDeformConv2d)):
            nn.init.zeros_(module.conv_offset.weight)
    return model


def dcn_resnet50(num_classes: int = 1000, out_indices: Sequence[int] | None = None) -> ResNet:
    """ResNet-50 with modulated deformable convs (DCNv2) in stages 3-5; `out_indices`: the stages' feature maps
    as outputs (a detection backbone)."""
    return _dcn_resnet50(ModulatedDeformConv2d, num_classes, out_indices)


def dcnv1_resnet50(num_classes: int = 1000, out_indices: Sequence[int] | None = None) -> ResNet:
    """ResNet-50 with deformable convs v1 (no mask) in stages 3-5."""
    return _dcn_resnet50(DeformConv2d, num_classes, out_indices)
