"""ACmix: self-attention and convolution sharing their 1x1 projections.

Pan et al., "On the Integration of Self-Attention and Convolution", CVPR 2022; official code
https://github.com/LeapLabTHU/ACmix (``ResNet/test_bottleneck.py``, class ``ACmix``). The parameter names and shapes
are the official ones, so its state_dicts load with ``strict=True``:
``rate1``, ``rate2``, ``conv1/conv2/conv3`` (q, k, v; 1x1 with bias), ``conv_p``, ``fc`` and ``dep_conv.weight``.

    q, k, v  = conv1(x), conv2(x), conv3(x)                      each split into `head` heads of head_dim channels
    out_att  = sum_j softmax_j( q/sqrt(head_dim) . (k_j + pe(query) - pe_j) ) v_j      over a k_att x k_att window
    out_conv = dep_conv( permute( fc(cat[q, k, v] as (B, 3*head, head_dim, H*W)) ) )
    y        = rate1 * out_att + rate2 * out_conv

The window is taken from the reflection-padded map (pad ``(dilation*(k_att-1)+1)//2``) with the block's stride;
``pe = conv_p(grid)`` is a learned relative positional encoding of a ``linspace(-1, 1)`` grid (channel 0 = x, the W
axis; channel 1 = y). The attention output channel is ``head*head_dim + d`` while the conv path's (``dep_conv`` is
grouped by head_dim) is ``d*head + j``; both orders are the official ones and are kept, since checkpoints depend on
them.

Official quirks, reproduced where they affect the state_dict:

- ``dep_conv.bias`` does not exist: the official ``reset_parameters`` assigns ``init_rate_0(bias)``, which returns
  None, so the key is absent from every checkpoint.
- ``dep_conv`` starts as one-hot shift kernels (``weight[o, i, i//k, i%k] = 1``), which makes the conv path a
  learned combination of shifted feature maps. In the official ``ACmix_ResNet`` the ResNet's init loop then
  re-initialises every ``nn.Conv2d`` He-normally, overwriting those shift kernels; models built on this module
  (``models/acmix.py``) do the same.
- Only k_att odd, dilation 1 and H, W divisible by the stride work in the official forward (other settings make the
  unfold's size disagree with the padding or with ``h // stride``); here they raise a ValueError instead.
- ``dep_conv``'s padding is hard-coded to 1 officially, which is ``kernel_conv // 2`` for the only working
  ``kernel_conv = 3``; here it is ``kernel_conv // 2`` for any odd kernel_conv.
- ``conv_p.bias`` cancels in pe(query) - pe(key); it is a parameter (and gets a zero gradient) all the same.

The forward computes the official function in a form that exports to a small, fast standard-ONNX graph (about 35
nodes per layer, float32 throughout, dynamic batch):

- Each k_att x k_att window of k and v is one ``index_select`` (ONNX ``Gather``) through a constant index table
  that folds the reflection padding and the stride in, on a pixel-major per-head layout [B, head, H*W, head_dim],
  so a tap copies head_dim contiguous values; both attention contractions are batched MatMuls. (The official
  ``nn.Unfold`` form also exports compactly with the dynamo exporter, but runs about 2.5x slower in onnxruntime.)
- conv_p is 1x1, so q . (pe(query) - pe(key)) = (W_p^T q) . (grid(query) - grid(key)): the positional term is two
  [k_att, W_out] and [k_att, H_out] grid differences built in the input's dtype, not a [head_dim, k_att^2, H*W]
  table, and never float64 (the official grid, constant-folded by the TorchScript exporter, is float64, which
  onnxruntime's Conv cannot run).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def window_taps(size: int, kernel: int, padding: int, stride: int, device: torch.device) -> torch.Tensor:
    """[kernel, size // stride]: the source coordinate of tap t at output position o along one axis, for
    ``unfold(reflection_pad(m, padding), kernel, stride=stride)``.

    The padded coordinate o*stride + t - padding is reflected into [0, size): c < 0 -> -c, c > size-1 ->
    2(size-1) - c."""
    c = torch.arange(kernel, device=device)[:, None] + stride * torch.arange(size // stride, device=device) - padding
    return (size - 1) - ((size - 1) - c.abs()).abs()


class ACmix(nn.Module):
    """ACmix with the official constructor.

    Args:
        in_planes: input channels.
        out_planes: output channels; divisible by `head`.
        kernel_att: attention window (odd). Defaults to 7.
        head: attention heads. Defaults to 4.
        kernel_conv: the conv path's kernel (odd). Defaults to 3.
        stride: of both paths; inputs need H and W divisible by it.
        dilation: only 1 (the official forward fails for others; it only widens the padding, not the window).
    """

    def __init__(self, in_planes: int, out_planes: int, kernel_att: int = 7, head: int = 4, kernel_conv: int = 3,
                 stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        if out_planes % head:
            raise ValueError(f"ACmix needs out_planes divisible by head; got out_planes={out_planes}, head={head}")
        if kernel_att % 2 == 0 or kernel_conv % 2 == 0:
            raise ValueError(f"ACmix needs odd kernel_att and kernel_conv; got {kernel_att} and {kernel_conv}")
        if dilation != 1:
            raise ValueError(f"ACmix supports dilation=1 only (the official window ignores dilation, so other "
                             f"values break its output size); got {dilation}")
        if stride < 1:
            raise ValueError(f"ACmix needs stride >= 1; got {stride}")
        self.in_planes, self.out_planes, self.head = in_planes, out_planes, head
        self.kernel_att, self.kernel_conv, self.stride, self.dilation = kernel_att, kernel_conv, stride, dilation
        self.head_dim = out_planes // head
        self.padding_att = (dilation * (kernel_att - 1) + 1) // 2
        self.rate1 = nn.Parameter(torch.empty(1))
        self.rate2 = nn.Parameter(torch.empty(1))
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=1)
        self.conv2 = nn.Conv2d(in_planes, out_planes, kernel_size=1)
        self.conv3 = nn.Conv2d(in_planes, out_planes, kernel_size=1)
        self.conv_p = nn.Conv2d(2, self.head_dim, kernel_size=1)
        self.fc = nn.Conv2d(3 * head, kernel_conv * kernel_conv, kernel_size=1, bias=False)
        self.dep_conv = nn.Conv2d(kernel_conv * kernel_conv * self.head_dim, out_planes, kernel_conv,
                                  stride=stride, padding=kernel_conv // 2, groups=self.head_dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official init: both rates 0.5, dep_conv = one-hot shift kernels (tap i shifts by (i//k, i%k))."""
        nn.init.constant_(self.rate1, 0.5)
        nn.init.constant_(self.rate2, 0.5)
        k = self.kernel_conv
        with torch.no_grad():
            self.dep_conv.weight.zero_()
            for i in range(k * k):
                self.dep_conv.weight[:, i, i // k, i % k] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, in_planes, H, W] -> [B, out_planes, H // stride, W // stride]."""
        height, width = x.shape[-2:]
        s, pad = self.stride, self.padding_att
        if height % s or width % s:
            raise ValueError(f"ACmix with stride {s} needs H and W divisible by {s}; got {height}x{width}.")
        if min(height, width) <= pad:
            raise ValueError(f"ACmix with kernel_att={self.kernel_att} reflection-pads by {pad}, so H and W must "
                             f"exceed {pad}; got {height}x{width}.")
        head, head_dim, taps = self.head, self.head_dim, self.kernel_att * self.kernel_att
        h_out, w_out = height // s, width // s
        # q, k, v as one 1x1 conv (the three weights concatenate into one constant in an export).
        qkv = F.conv2d(x, torch.cat([self.conv1.weight, self.conv2.weight, self.conv3.weight]),
                       torch.cat([self.conv1.bias, self.conv2.bias, self.conv3.bias]))

        # Attention path, per head and pixel-major: [B, head, H*W, head_dim], so that gathering a window tap copies
        # a pixel's head_dim channels at once and both attention products are batched matrix products.
        # -1 keeps the (dynamic) batch out of the shape arithmetic.
        q, k, v = qkv.reshape(-1, 3 * head, head_dim, height * width).transpose(2, 3).split(head, dim=1)
        rows = window_taps(height, self.kernel_att, pad, s, x.device)  # [k_att, h_out]
        cols = window_taps(width, self.kernel_att, pad, s, x.device)  # [k_att, w_out]
        index = (rows.t()[:, None, :, None] * width + cols.t()[None, :, None, :]).reshape(-1)  # (i, j, p, q)
        k = k.index_select(2, index).reshape(-1, head, h_out * w_out, taps, head_dim)
        v = v.index_select(2, index).reshape(-1, head, h_out * w_out, taps, head_dim)
        q = q.reshape(-1, head, height, width, head_dim)[:, :, ::s, ::s] * float(head_dim) ** -0.5
        q = q.reshape(-1, head, h_out * w_out, head_dim, 1)
        logits = k @ q  # [B, head, P, taps, 1]

        # Relative positional encoding q . (pe(query) - pe(key)) with pe = conv_p(grid): conv_p is 1x1, so this is
        # q . W_p (grid(query) - grid(key)) = qx * dx + qy * dy, where (qx, qy) = W_p^T q and dx (dy) is the grid's
        # x (y) difference, which depends on the tap and the output column (row) only. conv_p.bias cancels; it
        # stays in the graph with a zero contribution so that it gets a (zero) gradient as in the official code.
        loc_w = torch.linspace(-1.0, 1.0, width, dtype=x.dtype, device=x.device)
        loc_h = torch.linspace(-1.0, 1.0, height, dtype=x.dtype, device=x.device)
        dx = (loc_w[::s] - loc_w[cols]).t().reshape(1, w_out, 1, self.kernel_att)  # over (i, j, p, q)
        dy = (loc_h[::s] - loc_h[rows]).t().reshape(h_out, 1, self.kernel_att, 1)
        bias = self.conv_p.bias
        pe_weight = self.conv_p.weight.reshape(head_dim, 2).t() + (bias - bias)  # [2, head_dim]
        q_xy = (pe_weight @ q).reshape(-1, head, h_out, w_out, 2, 1, 1)
        logits = logits.reshape(-1, head, h_out, w_out, self.kernel_att, self.kernel_att) \
            + q_xy[:, :, :, :, 0] * dx + q_xy[:, :, :, :, 1] * dy

        att = torch.softmax(logits.reshape(-1, head, h_out * w_out, 1, taps), dim=4)
        out_att = (att @ v).reshape(-1, head, h_out * w_out, head_dim).transpose(2, 3)
        out_att = out_att.reshape(-1, self.out_planes, h_out, w_out)

        # Conv path: fc mixes the 3*head (q, k, v per head) maps of each head channel into k_conv^2 maps.
        # cat[q, k, v] viewed [B, 3*head, head_dim, H*W] is qkv itself.
        f_all = F.conv2d(qkv.reshape(-1, 3 * head, head_dim, height * width), self.fc.weight)
        f_conv = f_all.permute(0, 2, 1, 3).reshape(-1, head_dim * self.kernel_conv ** 2, height, width)
        out_conv = self.dep_conv(f_conv)
        return self.rate1 * out_att + self.rate2 * out_conv
