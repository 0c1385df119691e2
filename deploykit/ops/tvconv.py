"""TVConv's export contract: standard ops only. The weight-generating network depends on no input, so the graph
passes fold it into one initializer per tap; what remains is the per-pixel depthwise conv.

Reference (paper Eq. 3-4): W = G(A) for the affinity maps A and the weight-generating network G (conv3x3 ->
LayerNorm -> ReLU blocks, then conv3x3); y[c, i, j] = sum_{p,q} W[c, p, q, i, j] * x[c, i*s + p - r, j*s + q - r].

Per-pixel depthwise conv, C=64, 56x56, 3x3, constant weights (ORT 1.31, 2 threads, ``python bench/bench_tvconv.py``
prints the current numbers): the module's form, Pad + 9 strided Slices + Mul + Add, is the fastest standard-op
graph measured; exporting ``nn.Unfold`` as the official module does is several times slower.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from deploykit.nn.tvconv import TVConv
from deploykit.ops import reference as ref
from deploykit.ops.spec import LayerRule, Unfit, VariantSpec, attribute


def _generator_reference(layers, posi_map: np.ndarray) -> np.ndarray:
    """G(A) in float64: each block is conv3x3 -> LayerNorm over [C, h, w] (per-pixel affine) -> ReLU."""
    z = posi_map
    for block in layers[:-1]:
        conv, norm = block[0], block[1]
        z = ref.conv2d(z, ref.array(conv.weight), None, 1, 1)
        mean = z.mean(axis=(1, 2, 3), keepdims=True)
        var = z.var(axis=(1, 2, 3), keepdims=True)
        z = (z - mean) / np.sqrt(var + norm.eps) * ref.array(norm.weight) + ref.array(norm.bias)
        z = np.maximum(z, 0)
    return ref.conv2d(z, ref.array(layers[-1].weight), None, 1, 1)


def tvconv_reference(module: TVConv, x: np.ndarray) -> np.ndarray:
    """Float64 TVConv forward from the parameters: generate the weights, then the per-pixel depthwise conv."""
    x = x.astype(np.float64)
    k, s = module.kernel_size, module.stride_
    h, w = module.out_size
    posi_map = ref.array(module.posi_map)
    weights = _generator_reference(module.weight_layers, posi_map).reshape(module.channels_, k, k, h, w)
    padded = np.pad(x, ((0, 0), (0, 0), ((k - 1) // 2,) * 2, ((k - 1) // 2,) * 2))
    y = np.zeros((x.shape[0], module.channels_, h, w))
    for p in range(k):
        for q in range(k):
            y += weights[None, :, p, q] * padded[:, :, p: p + s * (h - 1) + 1: s, q: q + s * (w - 1) + 1: s]
    if module.bias_layers is not None:
        y += _generator_reference(module.bias_layers, posi_map)
    return y


def tvconv_from_official(layer: nn.Module) -> TVConv:
    """JierunChen's ``TVConv``: its sizes are 0-d int64 buffers (read once here as ints, which is what lets the
    deploykit layer export), the generator's widths and depth are read from its layers."""
    weight_layers, posi_map = attribute(layer, "weight_layers"), attribute(layer, "posi_map")
    if not isinstance(weight_layers, nn.Sequential) or len(weight_layers) < 2 or not isinstance(
            posi_map, torch.Tensor) or posi_map.dim() != 4:
        raise Unfit("its `weight_layers` or `posi_map` is not the official generator")
    sizes = {name: int(attribute(layer, name)) for name in ("channels", "TVConv_k", "stride", "h", "w")}
    return TVConv(sizes["channels"], sizes["TVConv_k"], sizes["stride"], TVConv_posi_chans=posi_map.shape[1],
                  TVConv_inter_chans=attribute(weight_layers[-1], "in_channels"),
                  TVConv_inter_layers=len(weight_layers) - 2, TVConv_Bias=attribute(layer, "bias_layers") is not None,
                  h=sizes["h"], w=sizes["w"])


SPEC = VariantSpec(name="tvconv", module=TVConv, reference=tvconv_reference, tolerance={"float32": 1e-4},
                   conversions=(LayerRule(("TVConv",), TVConv, tvconv_from_official),))
