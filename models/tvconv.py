"""TVConv MobileNetV2, the face-recognition backbone of the TVConv paper (96x96 input, 512-d embedding).

Official code: JierunChen/TVConv ``face_recognition/model/mobilenetv2.py`` with ``atom='TVConv'``: torchvision's
MobileNetV2 with a stride-1 stem, every block's depthwise conv replaced by TVConv -> BN -> ReLU6 (each TVConv
sized for its block's output resolution, the ``h_w`` column below), a 1x1 conv to 512 channels and the output
layer BN2d -> AvgPool(6) -> Linear(512) -> BN1d. Module names are the official ones (``features.N.conv...``,
``output_layer.layer1/layer2``), so a state_dict saved from ``LitModel.model`` loads with ``strict=True``; the
TVConv settings are the training script's defaults (4 affinity maps, 64 intermediate channels, 3 intermediate
layers, no bias). No weights were released.
"""

from __future__ import annotations

from torch import nn

from deploykit.nn.tvconv import TVConv

# t (expansion), c (channels), n (blocks), s (stride of the first), h_w (output resolution of the stage)
SETTINGS = ((1, 16, 1, 1, 96), (6, 24, 2, 2, 48), (6, 32, 3, 2, 24), (6, 64, 4, 2, 12), (6, 96, 3, 1, 12),
            (6, 160, 3, 2, 6), (6, 320, 1, 1, 6))
INPUT_SIZE = 96
TVCONV_DEFAULTS = dict(TVConv_posi_chans=4, TVConv_inter_chans=64, TVConv_inter_layers=3, TVConv_Bias=False)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of `divisor`, never more than 10% down (torchvision's MobileNetV2 rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_planes: int, out_planes: int, kernel_size: int = 3, stride: int = 1) -> None:
        super().__init__(nn.Conv2d(in_planes, out_planes, kernel_size, stride, (kernel_size - 1) // 2, bias=False),
                         nn.BatchNorm2d(out_planes), nn.ReLU6(inplace=True))


class TVConvBNReLU(nn.Sequential):
    def __init__(self, planes: int, h_w: int, stride: int, **tvconv: int | bool) -> None:
        super().__init__(TVConv(planes, stride=stride, h=h_w, w=h_w, **tvconv), nn.BatchNorm2d(planes),
                         nn.ReLU6(inplace=True))


class TVConvInvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, h_w: int, expand_ratio: int, **tvconv: int | bool) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and inp == oup
        hidden = int(round(inp * expand_ratio))
        layers: list[nn.Module] = [ConvBNReLU(inp, hidden, kernel_size=1)] if expand_ratio != 1 else []
        layers += [TVConvBNReLU(hidden, h_w, stride, **tvconv), nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
                   nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class OutputLayer(nn.Module):
    """BN2d -> AvgPool(6) -> Linear -> BN1d: the 512-d face embedding (official ``OutputLayer``, no dropout)."""

    def __init__(self, channels: int, feat_dim: int = 512, size: int = 6) -> None:
        super().__init__()
        self.layer1 = nn.BatchNorm2d(channels)
        self.layer2 = nn.Sequential(nn.Linear(channels, feat_dim), nn.BatchNorm1d(feat_dim))
        self.pool = nn.AvgPool2d(size)

    def forward(self, x):
        return self.layer2(self.pool(self.layer1(x)).flatten(1))


class TVConvMobileNetV2(nn.Module):
    def __init__(self, width_mult: float = 1.0, embedding_size: int = 512, **tvconv: int | bool) -> None:
        super().__init__()
        tvconv = {**TVCONV_DEFAULTS, **tvconv}
        channels, last_channel = make_divisible(32 * width_mult), 512
        features: list[nn.Module] = [ConvBNReLU(3, channels, stride=1)]
        for t, c, n, s, h_w in SETTINGS:
            out = make_divisible(c * width_mult)
            for i in range(n):
                features.append(TVConvInvertedResidual(channels, out, s if i == 0 else 1, h_w, t, **tvconv))
                channels = out
        features.append(ConvBNReLU(channels, make_divisible(last_channel * max(1.0, width_mult)), kernel_size=1))
        self.features = nn.Sequential(*features)
        self.output_layer = OutputLayer(last_channel, embedding_size)
        for m in self.modules():  # the official init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d, nn.LayerNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.output_layer(self.features(x))


def tvconv_mobilenet_v2(width_mult: float = 1.0, **tvconv: int | bool) -> TVConvMobileNetV2:
    """``mobilenet_v2_x1_0(input_size=[96, 96], atom='TVConv')``; other widths: 0.1, 0.2, 0.3, 0.5."""
    return TVConvMobileNetV2(width_mult, **tvconv)
