"""Stand-ins for the official / third-party layer classes `deploykit.convert` (`deploykit/conversion.py`) recognises.

Written here from ../shared/notes/references.md (no official code): each has the official class name, module path
(``__module__``), attributes, parameter layout and forward, including what makes the official layers hard to export
(the batch folded into conv groups, TVConv's int64 buffers read with ``.item()``, ACmix's linspace grid built in
forward, mmcv's chunk into offset and mask). The deformable ones compute with the float64 NumPy reference of the
``deploykit::DeformConv2d`` contract, not with deploykit's PyTorch op, so the converted modules are checked against
an independent implementation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from deploykit.ops.deform_conv2d import deform_conv2d_reference


def _official(module_path: str):
    """Give a stand-in class the official module path (users copy the files anywhere; recognition ignores it)."""
    def mark(cls):
        cls.__module__ = module_path
        return cls
    return mark


# --- OSVAI ODConv (modules/odconv.py) --------------------------------------------------------------------------

@_official("modules.odconv")
class Attention(nn.Module):
    def __init__(self, in_planes, out_planes, kernel_size, groups=1, reduction=0.0625, kernel_num=4, min_channel=16):
        super().__init__()
        attention_channel = max(int(in_planes * reduction), min_channel)
        self.kernel_size, self.kernel_num, self.temperature = kernel_size, kernel_num, 1.0
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(in_planes, attention_channel, 1, bias=False)
        self.bn = nn.BatchNorm2d(attention_channel)
        self.relu = nn.ReLU(inplace=True)
        self.channel_fc = nn.Conv2d(attention_channel, in_planes, 1, bias=True)
        self.func_channel = self.get_channel_attention
        if in_planes == groups and in_planes == out_planes:  # depthwise: no filter attention
            self.func_filter = self.skip
        else:
            self.filter_fc = nn.Conv2d(attention_channel, out_planes, 1, bias=True)
            self.func_filter = self.get_filter_attention
        if kernel_size == 1:
            self.func_spatial = self.skip
        else:
            self.spatial_fc = nn.Conv2d(attention_channel, kernel_size * kernel_size, 1, bias=True)
            self.func_spatial = self.get_spatial_attention
        if kernel_num == 1:
            self.func_kernel = self.skip
        else:
            self.kernel_fc = nn.Conv2d(attention_channel, kernel_num, 1, bias=True)
            self.func_kernel = self.get_kernel_attention

    def update_temperature(self, temperature):
        self.temperature = temperature

    @staticmethod
    def skip(_):
        return 1.0

    def get_channel_attention(self, x):
        return torch.sigmoid(self.channel_fc(x).view(x.size(0), -1, 1, 1) / self.temperature)

    def get_filter_attention(self, x):
        return torch.sigmoid(self.filter_fc(x).view(x.size(0), -1, 1, 1) / self.temperature)

    def get_spatial_attention(self, x):
        s = self.spatial_fc(x).view(x.size(0), 1, 1, 1, self.kernel_size, self.kernel_size)
        return torch.sigmoid(s / self.temperature)

    def get_kernel_attention(self, x):
        return F.softmax(self.kernel_fc(x).view(x.size(0), -1, 1, 1, 1, 1) / self.temperature, dim=1)

    def forward(self, x):
        x = self.relu(self.bn(self.fc(self.avgpool(x))))
        return self.func_channel(x), self.func_filter(x), self.func_spatial(x), self.func_kernel(x)


@_official("modules.odconv")
class ODConv2d(nn.Module):
    def __init__(self, in_planes, out_planes, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 reduction=0.0625, kernel_num=4):
        super().__init__()
        self.in_planes, self.out_planes, self.kernel_size = in_planes, out_planes, kernel_size
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.kernel_num = kernel_num
        self.attention = Attention(in_planes, out_planes, kernel_size, groups=groups, reduction=reduction,
                                   kernel_num=kernel_num)
        self.weight = nn.Parameter(torch.randn(kernel_num, out_planes, in_planes // groups, kernel_size, kernel_size))
        if self.kernel_size == 1 and self.kernel_num == 1:
            self._forward_impl = self._forward_impl_pw1x
        else:
            self._forward_impl = self._forward_impl_common

    def update_temperature(self, temperature):
        self.attention.update_temperature(temperature)

    def _forward_impl_common(self, x):
        channel, filt, spatial, kernel = self.attention(x)
        batch_size, _, height, width = x.size()
        x = (x * channel).reshape(1, -1, height, width)  # the batch folded into the conv groups
        weight = torch.sum(spatial * kernel * self.weight.unsqueeze(dim=0), dim=1)
        weight = weight.view(-1, self.in_planes // self.groups, self.kernel_size, self.kernel_size)
        out = F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups * batch_size)
        return out.view(batch_size, self.out_planes, out.size(-2), out.size(-1)) * filt

    def _forward_impl_pw1x(self, x):
        channel, filt, _, _ = self.attention(x)
        out = F.conv2d(x * channel, self.weight.squeeze(dim=0), None, self.stride, self.padding, self.dilation,
                       self.groups)
        return out * filt

    def forward(self, x):
        return self._forward_impl(x)


# --- kaijieshi7 DY-CNN (dynamic_conv.py) ---------------------------------------------------------------------

@_official("dynamic_conv")
class attention2d(nn.Module):  # noqa: N801 (the official name)
    def __init__(self, in_planes, ratios, K, temperature):
        super().__init__()
        assert temperature % 3 == 1
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        hidden_planes = int(in_planes * ratios) + 1 if in_planes != 3 else K
        self.fc1 = nn.Conv2d(in_planes, hidden_planes, 1, bias=False)
        self.fc2 = nn.Conv2d(hidden_planes, K, 1, bias=True)
        self.temperature = temperature

    def forward(self, x):
        x = self.fc2(F.relu(self.fc1(self.avgpool(x)))).view(x.size(0), -1)
        return F.softmax(x / self.temperature, 1)


@_official("dynamic_conv")
class Dynamic_conv2d(nn.Module):  # noqa: N801 (the official name)
    def __init__(self, in_planes, out_planes, kernel_size, ratio=0.25, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, K=4, temperature=34):
        super().__init__()
        self.in_planes, self.out_planes, self.kernel_size = in_planes, out_planes, kernel_size
        self.stride, self.padding, self.dilation, self.groups, self.K = stride, padding, dilation, groups, K
        self.attention = attention2d(in_planes, ratio, K, temperature)
        self.weight = nn.Parameter(torch.randn(K, out_planes, in_planes // groups, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(K, out_planes)) if bias else None

    def forward(self, x):
        attention = self.attention(x)
        batch_size, _, height, width = x.size()
        x = x.view(1, -1, height, width)  # the batch folded into the conv groups
        # The official view is (-1, in_planes, k, k), which runs for groups=1 only (the case tested).
        weight = torch.mm(attention, self.weight.view(self.K, -1)).view(
            -1, self.in_planes, self.kernel_size, self.kernel_size)
        bias = torch.mm(attention, self.bias).view(-1) if self.bias is not None else None
        out = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups * batch_size)
        return out.view(batch_size, self.out_planes, out.size(-2), out.size(-1))


# --- timm CondConv2d (timm/layers/cond_conv2d.py) --------------------------------------------------------------

def _tf_same_pad(x, kernel, stride, dilation):
    """TF "SAME": the total padding per axis from the input size, the odd pixel at the end."""
    pads = []
    for size, k, s, d in zip(x.shape[-2:], kernel, stride, dilation):
        pads.append(max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0))
    return F.pad(x, [pads[1] // 2, pads[1] - pads[1] // 2, pads[0] // 2, pads[0] - pads[0] // 2])


@_official("timm.layers.cond_conv2d")
class CondConv2d(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding="", dilation=1, groups=1,
                 bias=False, num_experts=4):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        symmetric = ((stride - 1) + dilation * (kernel_size - 1)) // 2
        if padding == "same":
            static = stride == 1 and (dilation * (kernel_size - 1)) % 2 == 0
            padding_value, self.dynamic_padding = (symmetric, False) if static else (0, True)
        else:
            padding_value, self.dynamic_padding = {"": symmetric, "valid": 0}.get(padding, padding), False
        self.padding = _pair(padding_value)
        self.groups, self.num_experts = groups, num_experts
        self.weight_shape = (out_channels, in_channels // groups) + self.kernel_size
        self.weight = nn.Parameter(torch.empty(num_experts, math.prod(self.weight_shape)))
        self.bias = nn.Parameter(torch.empty(num_experts, out_channels)) if bias else None

    def forward(self, x, routing_weights):
        batch, channels, height, width = x.shape
        weight = torch.matmul(routing_weights, self.weight).view(
            (batch * self.out_channels, self.in_channels // self.groups) + self.kernel_size)
        bias = torch.matmul(routing_weights, self.bias).view(-1) if self.bias is not None else None
        x = x.reshape(1, batch * channels, height, width)  # the batch folded into the conv groups
        if self.dynamic_padding:
            x, padding = _tf_same_pad(x, self.kernel_size, self.stride, self.dilation), 0
        else:
            padding = self.padding
        out = F.conv2d(x, weight, bias, self.stride, padding, self.dilation, self.groups * batch)
        return out.permute([1, 0, 2, 3]).view(batch, self.out_channels, out.shape[-2], out.shape[-1])


class CondConvBlock(nn.Module):
    """A user block in the shape of timm's CondConvResidual: one sigmoid routing of the block input, shared by its
    CondConv2d layers (each called with the routing weights)."""

    def __init__(self, channels: int, experts: int = 3):
        super().__init__()
        self.routing_fn = nn.Linear(channels, experts)
        self.conv_pw = CondConv2d(channels, 2 * channels, 1, num_experts=experts)
        self.conv_dw = CondConv2d(2 * channels, 2 * channels, 3, stride=2, padding="same", groups=2 * channels,
                                  num_experts=experts)  # TF 'same' at stride 2: dynamic, asymmetric padding
        self.conv_pwl = CondConv2d(2 * channels, channels, 3, padding="", bias=True, num_experts=experts)

    def forward(self, x):
        routing = torch.sigmoid(self.routing_fn(x.mean((2, 3))))
        x = F.relu(self.conv_pw(x, routing))
        x = F.relu(self.conv_dw(x, routing))
        return self.conv_pwl(x, routing)


# --- JierunChen TVConv (face_recognition/model/atoms/TVConv.py) ----------------------------------------------

@_official("face_recognition.model.atoms.TVConv")
class _ConvBlock(nn.Sequential):
    def __init__(self, in_planes, out_planes, h, w):
        super().__init__(nn.Conv2d(in_planes, out_planes, 3, 1, 1, bias=False), nn.LayerNorm([out_planes, h, w]),
                         nn.ReLU(inplace=True))


@_official("face_recognition.model.atoms.TVConv")
class TVConv(nn.Module):
    def __init__(self, channels, TVConv_k=3, stride=1, TVConv_posi_chans=4, TVConv_inter_chans=16,  # noqa: N803
                 TVConv_inter_layers=1, TVConv_Bias=False, h=3, w=3):  # noqa: N803
        super().__init__()
        for name, value in (("TVConv_k", TVConv_k), ("TVConv_k_square", TVConv_k ** 2), ("stride", stride),
                            ("channels", channels), ("h", h), ("w", w)):
            self.register_buffer(name, torch.as_tensor(value))  # 0-d int64, in the state_dict
        self.bias_layers = None
        self.posi_map = nn.Parameter(torch.ones(1, TVConv_posi_chans, h, w))
        self.weight_layers = self._make_layers(TVConv_posi_chans, TVConv_inter_chans, channels * TVConv_k ** 2,
                                               TVConv_inter_layers, h, w)
        if TVConv_Bias:
            self.bias_layers = self._make_layers(TVConv_posi_chans, TVConv_inter_chans, channels,
                                                 TVConv_inter_layers, h, w)
        self.unfold = nn.Unfold(TVConv_k, 1, (TVConv_k - 1) // 2, stride)

    @staticmethod
    def _make_layers(in_chans, inter_chans, out_chans, inter_layers, h, w):
        layers = [_ConvBlock(in_chans, inter_chans, h, w)]
        layers += [_ConvBlock(inter_chans, inter_chans, h, w) for _ in range(inter_layers)]
        return nn.Sequential(*layers, nn.Conv2d(inter_chans, out_chans, 3, padding=1, bias=False))

    def forward(self, x):
        channels, taps, h, w = (self.channels.item(), self.TVConv_k_square.item(), self.h.item(), self.w.item())
        weight = self.weight_layers(self.posi_map).view(1, channels, taps, h, w)
        out = (weight * self.unfold(x).view(x.shape[0], channels, taps, h, w)).sum(dim=2)
        if self.bias_layers is not None:
            out = out + self.bias_layers(self.posi_map)
        return out


# --- LeapLabTHU ACmix (ResNet/test_bottleneck.py) --------------------------------------------------------------

def _position(height, width, like):
    """The official grid: channel 0 = linspace(-1, 1) along W, channel 1 along H. (Officially float32; built in the
    input's dtype here so that the stand-in runs in float64.)"""
    loc_w = torch.linspace(-1.0, 1.0, width, dtype=like.dtype).unsqueeze(0).repeat(height, 1)
    loc_h = torch.linspace(-1.0, 1.0, height, dtype=like.dtype).unsqueeze(1).repeat(1, width)
    return torch.cat([loc_w.unsqueeze(0), loc_h.unsqueeze(0)], 0).unsqueeze(0)


@_official("test_bottleneck")
class ACmix(nn.Module):
    def __init__(self, in_planes, out_planes, kernel_att=7, head=4, kernel_conv=3, stride=1, dilation=1):
        super().__init__()
        self.in_planes, self.out_planes, self.head = in_planes, out_planes, head
        self.kernel_att, self.kernel_conv, self.stride, self.dilation = kernel_att, kernel_conv, stride, dilation
        self.rate1 = nn.Parameter(torch.Tensor(1))
        self.rate2 = nn.Parameter(torch.Tensor(1))
        self.head_dim = out_planes // head
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=1)
        self.conv2 = nn.Conv2d(in_planes, out_planes, kernel_size=1)
        self.conv3 = nn.Conv2d(in_planes, out_planes, kernel_size=1)
        self.conv_p = nn.Conv2d(2, self.head_dim, kernel_size=1)
        self.padding_att = (dilation * (kernel_att - 1) + 1) // 2
        self.pad_att = nn.ReflectionPad2d(self.padding_att)
        self.unfold = nn.Unfold(kernel_size=kernel_att, padding=0, stride=stride)
        self.softmax = nn.Softmax(dim=1)
        self.fc = nn.Conv2d(3 * head, kernel_conv * kernel_conv, kernel_size=1, bias=False)
        self.dep_conv = nn.Conv2d(kernel_conv * kernel_conv * self.head_dim, out_planes, kernel_size=kernel_conv,
                                  bias=True, groups=self.head_dim, padding=1, stride=stride)
        self.dep_conv.bias = None  # officially: init_rate_0(bias) returns None

    def forward(self, x):
        q, k, v = self.conv1(x), self.conv2(x), self.conv3(x)
        b, _, h, w = q.shape
        h_out, w_out, taps = h // self.stride, w // self.stride, self.kernel_att * self.kernel_att
        pe = self.conv_p(_position(h, w, x))
        q_att = q.view(b * self.head, self.head_dim, h, w) * float(self.head_dim) ** -0.5
        k_att = k.view(b * self.head, self.head_dim, h, w)
        v_att = v.view(b * self.head, self.head_dim, h, w)
        q_pe = pe
        if self.stride > 1:
            q_att, q_pe = q_att[:, :, ::self.stride, ::self.stride], pe[:, :, ::self.stride, ::self.stride]
        unfold_k = self.unfold(self.pad_att(k_att)).view(b * self.head, self.head_dim, taps, h_out, w_out)
        unfold_rpe = self.unfold(self.pad_att(pe)).view(1, self.head_dim, taps, h_out, w_out)
        att = self.softmax((q_att.unsqueeze(2) * (unfold_k + q_pe.unsqueeze(2) - unfold_rpe)).sum(1))
        out_att = self.unfold(self.pad_att(v_att)).view(b * self.head, self.head_dim, taps, h_out, w_out)
        out_att = (att.unsqueeze(1) * out_att).sum(2).view(b, self.out_planes, h_out, w_out)
        f_all = self.fc(torch.cat([t.view(b, self.head, self.head_dim, h * w) for t in (q, k, v)], 1))
        f_conv = f_all.permute(0, 2, 1, 3).reshape(x.shape[0], -1, x.shape[-2], x.shape[-1])
        return self.rate1 * out_att + self.rate2 * self.dep_conv(f_conv)


# --- deformable convs: mmcv (mmcv/ops/{deform_conv,modulated_deform_conv}.py), torchvision (ops/deform_conv.py)

def reference_deform_conv(x, offset, mask, weight, bias, stride, padding, dilation):
    """The float64 NumPy formula, on tensors (offset groups from the offset's channels, weight groups from W)."""
    kh, kw = weight.shape[2:]
    offset_groups = offset.shape[1] // (2 * kh * kw)
    mask = torch.ones(offset.shape[0], offset_groups * kh * kw, *offset.shape[2:]) if mask is None else mask
    bias = torch.zeros(weight.shape[0]) if bias is None else bias
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    y = deform_conv2d_reference(*(t.detach().numpy() for t in (x, weight, offset, bias, mask)), stride,
                                [*padding, *padding], dilation, x.shape[1] // weight.shape[1], offset_groups)
    return torch.from_numpy(y).to(x.dtype)


def _deform_layer(layer, in_channels, out_channels, kernel_size, stride, padding, dilation, groups):
    """The attributes and weight mmcv's and torchvision's layers share (sizes stored as pairs)."""
    layer.in_channels, layer.out_channels, layer.groups = in_channels, out_channels, groups
    layer.kernel_size, layer.stride = _pair(kernel_size), _pair(stride)
    layer.padding, layer.dilation = _pair(padding), _pair(dilation)
    layer.weight = nn.Parameter(torch.Tensor(out_channels, in_channels // groups, *layer.kernel_size))


class _Pack:
    """mmcv's pack layers: the offset (and mask) conv, with the layer's stride, padding and dilation."""

    outputs_per_tap = 2

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.conv_offset = nn.Conv2d(self.in_channels, self.deform_groups * self.outputs_per_tap *
                                     self.kernel_size[0] * self.kernel_size[1], self.kernel_size, self.stride,
                                     self.padding, self.dilation, bias=True)


@_official("mmcv.ops.deform_conv")
class DeformConv2d(nn.Module):  # mmcv's (DCNv1, offset from outside, no bias)
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 deform_groups=1, bias=False, im2col_step=32):
        super().__init__()
        assert not bias
        _deform_layer(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        self.deform_groups, self.im2col_step = deform_groups, im2col_step
        self.transposed, self.output_padding = False, _pair(0)

    def forward(self, x, offset):
        return reference_deform_conv(x, offset, None, self.weight, None, self.stride, self.padding, self.dilation)


@_official("mmcv.ops.deform_conv")
class DeformConv2dPack(_Pack, DeformConv2d):
    def forward(self, x):
        return super().forward(x, self.conv_offset(x))


@_official("mmcv.ops.modulated_deform_conv")
class ModulatedDeformConv2d(nn.Module):  # mmcv's (DCNv2, offset and mask from outside)
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 deform_groups=1, bias=True):
        super().__init__()
        _deform_layer(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        self.deform_groups = deform_groups
        self.transposed, self.output_padding = False, _pair(0)
        self.bias = nn.Parameter(torch.Tensor(out_channels)) if bias else None

    def forward(self, x, offset, mask):
        return reference_deform_conv(x, offset, mask, self.weight, self.bias, self.stride, self.padding,
                                     self.dilation)


@_official("mmcv.ops.modulated_deform_conv")
class ModulatedDeformConv2dPack(_Pack, ModulatedDeformConv2d):
    outputs_per_tap = 3

    def forward(self, x):
        o1, o2, mask = torch.chunk(self.conv_offset(x), 3, dim=1)
        return super().forward(x, torch.cat((o1, o2), dim=1), torch.sigmoid(mask))


@_official("torchvision.ops.deform_conv")
class TorchvisionDeformConv2d(nn.Module):
    """torchvision's ``DeformConv2d`` module (renamed below: mmcv's class has the same name)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True):
        super().__init__()
        _deform_layer(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None

    def forward(self, input, offset, mask=None):  # noqa: A002 (the official name)
        return reference_deform_conv(input, offset, mask, self.weight, self.bias, self.stride, self.padding,
                                     self.dilation)


TorchvisionDeformConv2d.__name__ = TorchvisionDeformConv2d.__qualname__ = "DeformConv2d"


# --- torchvision's functional op, as a stand-in registered under torchvision's name and schema ------------------

TORCHVISION_SCHEMA = ("deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, "
                      "SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, "
                      "SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) -> Tensor")


def register_torchvision_op() -> torch.library.Library:
    """Define ``torch.ops.torchvision.deform_conv2d`` (computed by deploykit's PyTorch deform conv, with a fake
    kernel for torch.export); the caller destroys the returned library to remove it."""
    from deploykit.ops.deform_conv2d import deform_conv2d

    library = torch.library.Library("torchvision", "DEF")
    library.define(TORCHVISION_SCHEMA)

    def forward(input, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups,
                offset_groups, use_mask):  # noqa: A002
        return deform_conv2d(input, offset, weight, bias, (stride_h, stride_w), (pad_h, pad_w),
                             (dilation_h, dilation_w), mask if use_mask else None)

    def fake(input, weight, offset, mask, bias, *args):  # noqa: A002
        return input.new_empty(input.shape[0], weight.shape[0], *offset.shape[2:])

    library.impl("deform_conv2d", forward, "CompositeExplicitAutograd")
    torch.library.register_fake("torchvision::deform_conv2d", fake, lib=library)
    return library


def torchvision_deform_conv2d(input, offset, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                              mask=None):  # noqa: A002
    """torchvision.ops.deform_conv2d: the argument reordering into the op, a zero bias and a placeholder mask."""
    use_mask = mask is not None
    if mask is None:
        mask = torch.zeros((input.shape[0], 1), dtype=input.dtype)
    if bias is None:
        bias = torch.zeros(weight.shape[0], dtype=input.dtype)
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    weight_groups = input.shape[1] // weight.shape[1]
    offset_groups = offset.shape[1] // (2 * weight.shape[2] * weight.shape[3])
    return torch.ops.torchvision.deform_conv2d(input, weight, offset, mask, bias, sh, sw, ph, pw, dh, dw,
                                               weight_groups, offset_groups, use_mask)
