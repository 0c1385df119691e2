"""ACmix's export contract: standard ONNX only (Conv, Gather, MatMul, Softmax, elementwise), no custom op.

The reference is the official forward (LeapLabTHU/ACmix ``ResNet/test_bottleneck.py``) written from its formula
with float64 NumPy, literally: reflection padding and an explicit unfold, the positional encoding conv_p(grid)
evaluated on the grid, and the relative term pe(query) - pe(key) added to every unfolded key:

    q, k, v  = W_1 x + b_1, W_2 x + b_2, W_3 x + b_3              heads: channel = h*head_dim + d
    pe       = W_p grid + b_p,  grid[0] = linspace(-1, 1, W) along x, grid[1] = along y
    a[h,t]   = softmax_t( sum_d q[h,d]/sqrt(head_dim) * (U(k)[h,d,t] + pe[d] - U(pe)[d,t]) )
    out_att  = sum_t a[h,t] U(v)[h,d,t]                            U = unfold(reflect_pad(., pad), k_att, stride)
    out_conv = conv(fc . [q; k; v] permuted, dep_conv, stride, groups=head_dim)
    y        = rate1 * out_att + rate2 * out_conv

The module computes the same thing another way (a gather instead of the unfold, the positional term projected on
the grid's two coordinates), so the two are independent checks of each other.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from deploykit.nn.acmix import ACmix
from deploykit.ops import reference as ref
from deploykit.ops.spec import LayerRule, Unfit, VariantSpec, attribute


def _unfold(x: np.ndarray, kernel: int, stride: int) -> np.ndarray:
    """[N, C, H, W] -> [N, C, kernel*kernel, H_out, W_out]: the unpadded sliding windows (tap p*kernel + q)."""
    out_h, out_w = (x.shape[2] - kernel) // stride + 1, (x.shape[3] - kernel) // stride + 1
    taps = [x[:, :, p: p + stride * (out_h - 1) + 1: stride, q: q + stride * (out_w - 1) + 1: stride]
            for p in range(kernel) for q in range(kernel)]
    return np.stack(taps, axis=2)


def _reflect_pad(x: np.ndarray, pad: int) -> np.ndarray:
    """Reflection padding without repeating the edge (PyTorch's ReflectionPad2d)."""
    return np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="reflect")


def acmix_reference(module: ACmix, x: np.ndarray) -> np.ndarray:
    """Float64 ACmix forward from the official formula."""
    x = x.astype(np.float64)
    batch, _, height, width = x.shape
    head, head_dim, out = module.head, module.out_planes // module.head, module.out_planes
    k_att, stride = module.kernel_att, module.stride
    pad = (module.dilation * (k_att - 1) + 1) // 2
    h_out, w_out = height // stride, width // stride

    def conv1x1(layer, t):
        return ref.conv2d(t, ref.array(layer.weight), ref.array(layer.bias))

    q, k, v = (conv1x1(layer, x) for layer in (module.conv1, module.conv2, module.conv3))

    # Attention path.
    grid = np.stack([np.broadcast_to(np.linspace(-1.0, 1.0, width)[None, :], (height, width)),
                     np.broadcast_to(np.linspace(-1.0, 1.0, height)[:, None], (height, width))])[None]
    pe = conv1x1(module.conv_p, grid)  # [1, head_dim, H, W]
    q_att = q.reshape(batch * head, head_dim, height, width)[:, :, ::stride, ::stride] * head_dim ** -0.5
    q_pe = pe[:, :, ::stride, ::stride]
    unfold_k = _unfold(_reflect_pad(k.reshape(batch * head, head_dim, height, width), pad), k_att, stride)
    unfold_v = _unfold(_reflect_pad(v.reshape(batch * head, head_dim, height, width), pad), k_att, stride)
    unfold_pe = _unfold(_reflect_pad(pe, pad), k_att, stride)
    if unfold_k.shape[-2:] != (h_out, w_out):
        raise ValueError(f"ACmix needs H and W divisible by the stride {stride}; got {height}x{width}")
    logits = (q_att[:, :, None] * (unfold_k + q_pe[:, :, None] - unfold_pe)).sum(axis=1)  # [B*head, taps, ...]
    att = ref.softmax(logits, axis=1)
    out_att = (att[:, None] * unfold_v).sum(axis=2).reshape(batch, out, h_out, w_out)

    # Conv path: fc over the 3*head axis of [q; k; v] viewed [B, 3*head, head_dim, H*W], then head_dim-grouped conv.
    qkv = np.concatenate([t.reshape(batch, head, head_dim, height * width) for t in (q, k, v)], axis=1)
    fc = ref.array(module.fc.weight).reshape(module.kernel_conv ** 2, 3 * head)
    f_all = np.einsum("it,btdp->bidp", fc, qkv)  # [B, k_conv^2, head_dim, H*W]
    f_conv = f_all.transpose(0, 2, 1, 3).reshape(batch, head_dim * module.kernel_conv ** 2, height, width)
    out_conv = ref.conv2d(f_conv, ref.array(module.dep_conv.weight), None, stride, module.kernel_conv // 2,
                          groups=head_dim)

    return ref.array(module.rate1) * out_att + ref.array(module.rate2) * out_conv


def acmix_from_official(layer: nn.Module) -> ACmix:
    """LeapLabTHU's ``ACmix`` (same constructor). Its ``dep_conv`` padding is hard-coded to 1, which deploykit's
    ``kernel_conv // 2`` equals only for the kernel_conv of 3 the official forward works with."""
    kernel_conv = attribute(layer, "kernel_conv")
    padding = tuple(attribute(attribute(layer, "dep_conv"), "padding"))
    if padding != (kernel_conv // 2,) * 2:
        raise Unfit(f"its `dep_conv` pads by {padding}, not kernel_conv // 2 = {kernel_conv // 2}")
    return ACmix(attribute(layer, "in_planes"), attribute(layer, "out_planes"), attribute(layer, "kernel_att"),
                 attribute(layer, "head"), kernel_conv, attribute(layer, "stride"), attribute(layer, "dilation"))


SPEC = VariantSpec(name="acmix", module=ACmix, reference=acmix_reference, tolerance={"float32": 1e-4},
                   conversions=(LayerRule(("ACmix",), ACmix, acmix_from_official),))
