"""Float64 NumPy reference primitives for the per-variant references.

Written from the textbook formulas, with no PyTorch and no ONNX, so that a variant's reference is an independent
check of both its module and its export. Loops run over kernel taps only; everything else is vectorised.
Layout is NCHW throughout.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def conv_output_size(size: Sequence[int], kernel: Sequence[int], strides: Sequence[int], pads: Sequence[int],
                     dilations: Sequence[int]) -> tuple[int, int]:
    """ONNX Conv's output height and width; pads are (top, left, bottom, right)."""
    return tuple((size[i] + pads[i] + pads[i + 2] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1
                 for i in range(2))


def conv2d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None, stride: int | tuple[int, int] = 1,
           padding: int | tuple[int, int] = 0, dilation: int | tuple[int, int] = 1, groups: int = 1) -> np.ndarray:
    """Cross-correlation: y[b,o,i,j] = bias[o] + sum_{c,p,q} w[o,c,p,q] * xpad[b, g(o)*C/G + c, i*s+p*d, j*s+q*d]."""
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    batch, channels, height, width = x.shape
    out_channels, group_channels, kh, kw = weight.shape
    if channels != group_channels * groups or out_channels % groups:
        raise ValueError(f"conv2d: input {x.shape} with weight {weight.shape} and groups={groups} do not fit")
    x = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    out_h = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    x = x.reshape(batch, groups, group_channels, *x.shape[2:])
    w = weight.astype(np.float64).reshape(groups, out_channels // groups, group_channels, kh, kw)
    y = np.zeros((batch, groups, out_channels // groups, out_h, out_w))
    for p in range(kh):
        for q in range(kw):
            window = x[..., p * dh: p * dh + sh * (out_h - 1) + 1: sh, q * dw: q * dw + sw * (out_w - 1) + 1: sw]
            y += np.einsum("bgchw,goc->bgohw", window, w[..., p, q])
    y = y.reshape(batch, out_channels, out_h, out_w)
    if bias is not None:
        y += bias.astype(np.float64)[None, :, None, None]
    return y


def conv_transpose2d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None,
                     stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                     output_padding: int | tuple[int, int] = 0, groups: int = 1,
                     dilation: int | tuple[int, int] = 1) -> np.ndarray:
    """Transposed conv as a scatter: every input pixel adds w[c, o, p, q] * x[c, i, j] at (i*s + p*d, j*s + q*d)
    of the full output, which is then cropped by `padding` (output_padding extends the bottom/right)."""
    (sh, sw), (ph, pw), (oh, ow), (dh, dw) = _pair(stride), _pair(padding), _pair(output_padding), _pair(dilation)
    batch, channels, height, width = x.shape
    _, group_out, kh, kw = weight.shape
    full_h = (height - 1) * sh + dh * (kh - 1) + 1 + oh
    full_w = (width - 1) * sw + dw * (kw - 1) + 1 + ow
    x = x.astype(np.float64).reshape(batch, groups, channels // groups, height, width)
    w = weight.astype(np.float64).reshape(groups, channels // groups, group_out, kh, kw)
    full = np.zeros((batch, groups, group_out, full_h, full_w))
    for p in range(kh):
        for q in range(kw):
            full[..., p * dh: p * dh + sh * (height - 1) + 1: sh, q * dw: q * dw + sw * (width - 1) + 1: sw] += \
                np.einsum("bgchw,gco->bgohw", x, w[..., p, q])
    y = full[..., ph: full_h - ph, pw: full_w - pw].reshape(batch, groups * group_out, full_h - 2 * ph,
                                                            full_w - 2 * pw)
    return y if bias is None else y + bias.astype(np.float64)[None, :, None, None]


def avg_pool2d(x: np.ndarray, kernel: int, stride: int | None = None) -> np.ndarray:
    """Average over non-padded `kernel` x `kernel` windows (floor mode: partial windows are dropped)."""
    stride = stride or kernel
    out_h, out_w = (x.shape[2] - kernel) // stride + 1, (x.shape[3] - kernel) // stride + 1
    total = np.zeros((*x.shape[:2], out_h, out_w))
    for p in range(kernel):
        for q in range(kernel):
            total += x[..., p: p + stride * (out_h - 1) + 1: stride, q: q + stride * (out_w - 1) + 1: stride]
    return total / (kernel * kernel)


def resize_nearest(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize with the floor mapping src = floor(dst * in / out) (PyTorch's 'nearest')."""
    rows = np.floor(np.arange(size[0]) * (x.shape[2] / size[0])).astype(int)
    cols = np.floor(np.arange(size[1]) * (x.shape[3] / size[1])).astype(int)
    return x[:, :, rows][:, :, :, cols]


def bilinear_sample(images: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Sample `images` [N, G, C, H, W] at real positions y, x [N, G, ...] -> [N, G, C, ...].

    Each of the four neighbouring pixels contributes (1 - |y - py|) * (1 - |x - px|) if it lies inside the image
    and nothing otherwise (zero padding), so a position one pixel or more outside samples 0.
    """
    batch, groups, channels, height, width = images.shape
    y0, x0 = np.floor(y), np.floor(x)
    n = np.arange(batch).reshape(batch, *([1] * (y.ndim - 1)))
    g = np.arange(groups).reshape(1, groups, *([1] * (y.ndim - 2)))
    total = np.zeros((batch, groups, *y.shape[2:], channels))
    for py in (y0, y0 + 1):
        for px in (x0, x0 + 1):
            inside = (py >= 0) & (py <= height - 1) & (px >= 0) & (px <= width - 1)
            weight = (1 - np.abs(y - py)) * (1 - np.abs(x - px)) * inside
            rows = np.clip(py, 0, height - 1).astype(int)
            cols = np.clip(px, 0, width - 1).astype(int)
            total += images[n, g, :, rows, cols] * weight[..., None]
    return np.moveaxis(total, -1, 2)


def batch_norm(x: np.ndarray, mean: np.ndarray, var: np.ndarray, weight: np.ndarray, bias: np.ndarray,
               eps: float) -> np.ndarray:
    """Inference-mode batch normalisation with running statistics."""
    def channel(v: np.ndarray) -> np.ndarray:
        return v.astype(np.float64)[None, :, None, None]
    return (x - channel(mean)) / np.sqrt(channel(var) + eps) * channel(weight) + channel(bias)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """x [N, in] @ weight[out, in (, 1, 1)]^T + bias: a Linear layer or a 1x1 conv on pooled features."""
    y = x @ weight.reshape(weight.shape[0], -1).astype(np.float64).T
    return y if bias is None else y + bias.astype(np.float64)


def array(tensor) -> np.ndarray | None:
    """A parameter or buffer as a float64 array (None stays None)."""
    return None if tensor is None else tensor.detach().cpu().double().numpy()
