"""TVConv: translation-variant convolution with per-pixel depthwise kernels generated from learned affinity maps.

Chen et al., "TVConv: Efficient Translation Variant Convolution for Layout-aware Visual Processing", CVPR 2022;
official code https://github.com/JierunChen/TVConv (``face_recognition/model/atoms/TVConv.py``). Names, shapes and
buffers are the official ones, so its checkpoints load with ``strict=True``:

    posi_map [1, P, h, w]                    the affinity maps (init: ones)
    weight_layers                            [conv3x3 -> LayerNorm([C', h, w]) -> ReLU] x (1 + inter_layers),
                                             then conv3x3 -> C * k * k channels (no bias)
    bias_layers                              the same with C outputs, if TVConv_Bias
    TVConv_k, TVConv_k_square, stride, channels, h, w   0-d int64 buffers (in the state_dict)

    W = weight_layers(posi_map) viewed [C, k*k, h, w]             (channel-major, then tap)
    y[n, c, i, j] = sum_t W[c, t, i, j] * x_pad[n, c, i*s + t // k, j*s + t % k]  (+ bias_layers(posi_map))

h, w are the *output* size; the input must be exactly (h*s, w*s): the affinity maps are learned per pixel, so the
layer, and a model made of it, has one resolution. The weights do not depend on the input: the export computes
them once (constant folding) and the deployed graph keeps only the per-pixel depthwise conv.

Differences from the official module that do not change results: forward reads the shape from Python ints (the
official reads the int64 buffers, which torch.export cannot trace); the per-pixel conv is computed from strided
slices (eager) or a one-hot shift conv (export) instead of ``nn.Unfold``, which runs 2-4x slower in both; the
LayerNorm statistics are reduced one axis at a time (see `_MapLayerNorm`). The official inference form
(``TVConv_test``) is wrong at stride 2 and is not reproduced; the unfold module is the ground truth.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _MapLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over [C, h, w] (same parameters, same value) with its statistics reduced one axis at a time.

    Why: onnxruntime accumulates a reduction sequentially in float32, which over the 590k elements of a 64x96x96
    map loses 1e-4 of the range (PyTorch: 2e-7); folded into the weights, that error compounds through every TVConv
    of a network. Three reductions of at most a few hundred elements each are as accurate as PyTorch.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True).mean(-2, keepdim=True).mean(-3, keepdim=True)
        centered = x - mean
        variance = centered.square().mean(-1, keepdim=True).mean(-2, keepdim=True).mean(-3, keepdim=True)
        return centered * torch.rsqrt(variance + self.eps) * self.weight + self.bias


class _ConvBlock(nn.Sequential):
    """conv3x3 (no bias) -> per-pixel LayerNorm over [C, h, w] -> ReLU (official ``_ConvBlock``)."""

    def __init__(self, in_planes: int, out_planes: int, h: int, w: int) -> None:
        super().__init__(nn.Conv2d(in_planes, out_planes, 3, 1, 1, bias=False), _MapLayerNorm([out_planes, h, w]),
                         nn.ReLU(inplace=True))


def pixelwise_depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:
    """y[n, c, i, j] = sum_t weight[c, t, i, j] * x_pad[n, c, i*s + t // k, j*s + t % k], zero padding (k-1)/2.

    Two forms of the same sum, each the fastest measured where it runs (C=64, 56x56, 3x3; ``bench/bench_tvconv.py``):
    eager PyTorch takes k*k strided slices of the padded input (0.9 ms; the shift conv below: 10 ms); an export
    takes all k*k shifted windows with one depthwise Conv of constant one-hot kernels, then one Mul and one
    ReduceSum over the taps (onnxruntime: 1.06 ms; the slices exported: 1.56 ms, ``nn.Unfold`` exported: 4.4 ms).
    """
    channels, taps, height, width = weight.shape
    k = int(round(taps ** 0.5))
    if torch.compiler.is_exporting():
        shifts = torch.eye(taps, dtype=x.dtype, device=x.device).repeat(channels, 1).view(channels * taps, 1, k, k)
        windows = F.conv2d(x, shifts, None, stride, (k - 1) // 2, 1, channels)
        return (windows.view(-1, channels, taps, height, width) * weight).sum(2)
    padded = F.pad(x, [(k - 1) // 2] * 4)
    out = None
    for t in range(taps):
        p, q = divmod(t, k)
        window = padded[:, :, p: p + stride * (height - 1) + 1: stride, q: q + stride * (width - 1) + 1: stride]
        term = window * weight[:, t]
        out = term if out is None else out + term
    return out


class TVConv(nn.Module):
    """The official TVConv, with the official argument names and defaults."""

    def __init__(self, channels: int, TVConv_k: int = 3, stride: int = 1, TVConv_posi_chans: int = 4,
                 TVConv_inter_chans: int = 16, TVConv_inter_layers: int = 1, TVConv_Bias: bool = False, h: int = 3,
                 w: int = 3) -> None:
        super().__init__()
        if TVConv_k % 2 == 0:
            raise ValueError(f"TVConv_k must be odd (the padding is (k-1)/2), got {TVConv_k}")
        self.kernel_size, self.stride_, self.channels_, self.out_size = TVConv_k, stride, channels, (h, w)
        for name, value in (("TVConv_k", TVConv_k), ("TVConv_k_square", TVConv_k ** 2), ("stride", stride),
                            ("channels", channels), ("h", h), ("w", w)):
            self.register_buffer(name, torch.as_tensor(value))  # official: part of the state_dict
        self.posi_map = nn.Parameter(torch.ones(1, TVConv_posi_chans, h, w))
        self.weight_layers = self._make_layers(TVConv_posi_chans, TVConv_inter_chans, channels * TVConv_k ** 2,
                                               TVConv_inter_layers, h, w)
        self.bias_layers = self._make_layers(TVConv_posi_chans, TVConv_inter_chans, channels, TVConv_inter_layers,
                                             h, w) if TVConv_Bias else None

    @staticmethod
    def _make_layers(in_chans: int, inter_chans: int, out_chans: int, inter_layers: int, h: int,
                     w: int) -> nn.Sequential:
        blocks = [_ConvBlock(in_chans, inter_chans, h, w)]
        blocks += [_ConvBlock(inter_chans, inter_chans, h, w) for _ in range(inter_layers)]
        return nn.Sequential(*blocks, nn.Conv2d(inter_chans, out_chans, 3, padding=1, bias=False))

    @property
    def input_size(self) -> tuple[int, int]:
        return self.out_size[0] * self.stride_, self.out_size[1] * self.stride_

    def weight_maps(self) -> torch.Tensor:
        """The per-pixel kernels [C, k*k, h, w]: a function of the parameters only."""
        return self.weight_layers(self.posi_map).view(self.channels_, self.kernel_size ** 2, *self.out_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.input_size:
            raise ValueError(f"TVConv has per-pixel weights for a {self.input_size[0]}x{self.input_size[1]} input "
                             f"(its affinity maps are learned at that resolution) and cannot take "
                             f"{x.shape[-2]}x{x.shape[-1]}")
        out = pixelwise_depthwise_conv2d(x, self.weight_maps(), self.stride_)
        if self.bias_layers is not None:
            out = out + self.bias_layers(self.posi_map)
        return out

    def extra_repr(self) -> str:
        return (f"{self.channels_}, kernel_size={self.kernel_size}, stride={self.stride_}, "
                f"out_size={self.out_size}, bias={self.bias_layers is not None}")
