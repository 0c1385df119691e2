"""``deploykit::DeformConv2d``: deformable convolution, v1 (no mask) and v2 (modulated, with mask).

Contract (the ONNX node, the torch op and the TensorRT plugin take exactly this; the order is ONNX ``DeformConv``'s):

    inputs  X      [N, C, H, W]                  features
            W      [M, C/group, kH, kW]          kernel
            offset [N, 2*G*kH*kW, H', W']        per-output-pixel tap displacements, G = offset_group
            B      [M]                           bias (zeros when the layer has none)
            mask   [N, G*kH*kW, H', W']          per-tap modulation (ones for v1)
    attrs   strides [2], pads [4] (top, left, bottom, right), dilations [2], group, offset_group
            plugin_namespace "deploykit", plugin_version "1"
    output  Y [N, M, H', W']

    Y[n, m, i, j] = B[m] + sum_{c, p, q} W[m, c, p, q] * mask[n, g, p, q, i, j] * bilinear(X[n, c'], y, x)
        y = i*sH - pad_top  + p*dH + offset[n, g, p, q, 0, i, j]
        x = j*sW - pad_left + q*dW + offset[n, g, p, q, 1, i, j]

with c' the input channel c of weight group m // (M/group), g = c' // (C/G) its offset group, offset read as
[N, G, kH, kW, 2, H', W'] (dy before dx for every tap: interleaved, as torchvision, mmcv and ONNX lay it out) and
mask as [N, G, kH, kW, H', W']. Bilinear sampling counts pixels outside the image as 0. Every input is required,
so one body serves every call and a plugin has one signature.

Lowerings, measured on the development machine (ORT 1.31, 2 threads, Intel Xeon with AVX-512; ms and ratio to a
static conv of the same shape and runtime; v2, 3x3, pad 1, one offset group; ``python bench/bench_deform_conv.py``
prints the current numbers):

                                              256ch 28x28          512ch 14x14
                                              b1        b8         b1        b8
    onnxruntime static conv (floor)           2.90      23.7       2.81      22.9
    the node (body: ONNX DeformConv)          1.79x     1.54x      1.53x     1.49x
    a bare ONNX DeformConv, same run          1.60x     1.53x      1.52x     1.47x   (node == bare within noise)
    standard-op fallback                      2.57x     3.04x      1.71x     2.07x
    PyTorch eager static conv                 3.43      25.8       3.61      24.3
    deform_conv2d (this file), eager          1.56x     1.98x      1.48x     1.29x

- the node (default from opset 19): its body is one ONNX ``DeformConv``, which onnxruntime >= 1.25 runs natively
  and TensorRT >= 10.1 imports as its built-in ``ModulatedDeformConv2d`` plugin, unless ours is registered;
- a standard-op fallback for opset 18 / runtimes without ``DeformConv`` (``--lowering standard``): the bilinear
  taps as one Gather of channel rows from a channels-last copy of X, mixed by a batched MatMul, then one MatMul.
  Candidates measured (256ch 28x28 b1, ORT): Gather + Mul + ReduceSum over the neighbours 12.6 ms (neighbours on
  the last or the first axis alike); Gather + batched [1, 4] @ [4, C] MatMul 9.5 ms, then 7.4-8.0 ms in later runs.

The eager PyTorch implementation computes the same sampling with ``F.embedding_bag``: each output tap is a "bag"
of four channel rows with bilinear weights, one fused kernel that is differentiable in the rows (X) and the
weights (offset, mask), followed by one (grouped) matrix product with W.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper
from onnxscript import opset18 as op

from deploykit.export.custom_op import DOMAIN, CustomOp, forwarding_node
from deploykit.export.rewrite import NodeRewrite
from deploykit.ops import reference as ref
from deploykit.ops.autograd import differentiate_by_recomputing
from deploykit.ops.reference import conv_output_size as output_size

OP_TYPE = "DeformConv2d"
INPUTS = ("X", "W", "offset", "B", "mask")
ATTRIBUTES = {"strides": Sequence[int], "pads": Sequence[int], "dilations": Sequence[int], "group": int,
              "offset_group": int}
# The first opset with ONNX DeformConv, the node's body.
BODY_OPSET = 19

# TensorRT's own plugin for the same computation (OSS ``ModulatedDeformConv2d``, which its ONNX parser also
# uses for DeformConv) takes the tensors in another order and names the attributes differently.
TRT_OSS_PLUGIN = "ModulatedDeformConv2d"
TRT_OSS_INPUTS = ("X", "offset", "mask", "W", "B")
TRT_OSS_ATTRIBUTES = {"strides": "stride", "pads": "padding", "dilations": "dilation", "group": "group",
                      "offset_group": "deformable_group"}
TRT_PLUGIN_DOMAIN = "trt.plugins"


# --- PyTorch ---------------------------------------------------------------------------------------------------

def _sampling_bags(offset: torch.Tensor, mask: torch.Tensor, size: Sequence[int], kernel: Sequence[int],
                   strides: Sequence[int], pads: Sequence[int], dilations: Sequence[int],
                   offset_group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every (sample, output pixel, offset group, tap): the rows of its four bilinear neighbours in the
    channels-last table [N*H*W*G, C/G] and their weights (bilinear * inside-the-image * mask); both [bags, 4],
    bags ordered (n, i, j, g, tap)."""
    batch, _, out_h, out_w = offset.shape
    height, width = size
    kh, kw = kernel
    taps = kh * kw
    device = offset.device
    tap_y = (torch.arange(kh, device=device) * dilations[0]).repeat_interleave(kw)
    tap_x = (torch.arange(kw, device=device) * dilations[1]).repeat(kh)
    base_y = (torch.arange(out_h, device=device) * strides[0] - pads[0]).view(out_h, 1, 1, 1) + tap_y
    base_x = (torch.arange(out_w, device=device) * strides[1] - pads[1]).view(1, out_w, 1, 1) + tap_x
    displacement = offset.view(batch, offset_group, taps, 2, out_h, out_w).permute(0, 4, 5, 1, 2, 3)
    y = base_y + displacement[..., 0]  # [N, H', W', G, taps]
    x = base_x + displacement[..., 1]
    y0, x0 = y.floor(), x.floor()
    frac_y, frac_x = (y - y0).unsqueeze(-1), (x - x0).unsqueeze(-1)
    corner_y = y0.long().unsqueeze(-1) + torch.tensor([0, 0, 1, 1], device=device)
    corner_x = x0.long().unsqueeze(-1) + torch.tensor([0, 1, 0, 1], device=device)
    near_y = torch.tensor([True, True, False, False], device=device)
    near_x = torch.tensor([True, False, True, False], device=device)
    weight = torch.where(near_y, 1 - frac_y, frac_y) * torch.where(near_x, 1 - frac_x, frac_x)
    inside = (corner_y >= 0) & (corner_y < height) & (corner_x >= 0) & (corner_x < width)
    modulation = mask.view(batch, offset_group, taps, out_h, out_w).permute(0, 3, 4, 1, 2).unsqueeze(-1)
    weight = weight * modulation * inside
    pixel = corner_y.clamp(0, height - 1) * width + corner_x.clamp(0, width - 1)
    sample = torch.arange(batch, device=device).view(batch, 1, 1, 1, 1, 1) * (height * width)
    group = torch.arange(offset_group, device=device).view(1, 1, 1, offset_group, 1, 1)
    rows = (sample + pixel) * offset_group + group
    return rows.reshape(-1, 4), weight.reshape(-1, 4)


def _forward(X: torch.Tensor, W: torch.Tensor, offset: torch.Tensor, B: torch.Tensor, mask: torch.Tensor,
             strides: Sequence[int], pads: Sequence[int], dilations: Sequence[int], group: int,
             offset_group: int) -> torch.Tensor:
    """Eager implementation: sampled columns [N*H'*W', G*taps*C/G] by embedding_bag, then one (grouped) MatMul."""
    batch, channels, height, width = X.shape
    out_channels, group_channels, kh, kw = W.shape
    out_h, out_w = offset.shape[2:]
    taps, pixels = kh * kw, out_h * out_w
    rows, weights = _sampling_bags(offset, mask, (height, width), (kh, kw), strides, pads, dilations, offset_group)
    table = X.permute(0, 2, 3, 1).contiguous().view(-1, channels // offset_group)
    columns = F.embedding_bag(rows, table, per_sample_weights=weights, mode="sum")  # [N*H'*W'*G*taps, C/G]
    if group == 1:  # columns ordered (g, tap, c): reorder the small kernel instead of the columns
        kernel = W.reshape(out_channels, offset_group, channels // offset_group, taps).transpose(2, 3)
        y = torch.addmm(B, columns.view(batch * pixels, -1), kernel.reshape(out_channels, -1).t())
        return y.view(batch, pixels, out_channels).transpose(1, 2).reshape(batch, out_channels, out_h, out_w)
    columns = columns.view(batch * pixels, offset_group, taps, -1).transpose(2, 3)  # channels, then taps
    columns = columns.reshape(batch * pixels, group, group_channels * taps).transpose(0, 1)
    kernel = W.reshape(group, out_channels // group, group_channels * taps).transpose(1, 2)
    y = torch.baddbmm(B.view(group, 1, -1), columns, kernel)  # [group, N*H'*W', M/group]
    y = y.view(group, batch, pixels, -1).permute(1, 0, 3, 2)
    return y.reshape(batch, out_channels, out_h, out_w)


@torch.library.custom_op("deploykit::deform_conv2d", mutates_args=())
def _deform_conv2d(X: torch.Tensor, W: torch.Tensor, offset: torch.Tensor, B: torch.Tensor, mask: torch.Tensor,
                   strides: list[int], pads: list[int], dilations: list[int], group: int,
                   offset_group: int) -> torch.Tensor:
    return _forward(X, W, offset, B, mask, strides, pads, dilations, group, offset_group)


@_deform_conv2d.register_fake
def _(X, W, offset, B, mask, strides, pads, dilations, group, offset_group):
    return X.new_empty(X.shape[0], W.shape[0], *offset.shape[2:])


differentiate_by_recomputing(_deform_conv2d, _forward, tensor_count=5)


def _pair(value: int | Sequence[int], name: str) -> list[int]:
    pair = [value, value] if isinstance(value, int) else list(value)
    if len(pair) != 2:
        raise ValueError(f"deform_conv2d: {name} must be an int or a pair, got {value!r}")
    return pair


def deform_conv2d(input: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
                  dilation: int | Sequence[int] = 1, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Deformable convolution with torchvision's signature: v1 without `mask`, v2 (modulated) with it.

    Weight groups are ``C / weight.shape[1]``, offset groups ``offset.shape[1] / (2*kH*kW)``; `padding` is
    symmetric. Differentiable in input, offset, mask, weight and bias; exports as one ``deploykit::DeformConv2d``
    node. Shapes that do not fit raise ValueError naming the mismatch.
    """
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    if input.dim() != 4 or weight.dim() != 4 or offset.dim() != 4:
        raise ValueError(f"deform_conv2d: input, offset and weight must be 4-D, got {tuple(input.shape)}, "
                         f"{tuple(offset.shape)} and {tuple(weight.shape)}")
    batch, channels = input.shape[:2]
    out_channels, group_channels, kh, kw = weight.shape
    if channels % group_channels or out_channels % (channels // group_channels):
        raise ValueError(f"deform_conv2d: weight {tuple(weight.shape)} does not fit {channels} input channels")
    group = channels // group_channels
    if offset.shape[1] % (2 * kh * kw) or channels % (offset.shape[1] // (2 * kh * kw) or 1) or not offset.shape[1]:
        raise ValueError(f"deform_conv2d: offset has {offset.shape[1]} channels; it needs 2*G*{kh}*{kw} with G "
                         f"dividing the {channels} input channels")
    offset_group = offset.shape[1] // (2 * kh * kw)
    pads = [padding[0], padding[1], padding[0], padding[1]]
    out_size = output_size(input.shape[2:], (kh, kw), stride, pads, dilation)
    if offset.shape[0] != batch or tuple(offset.shape[2:]) != out_size:
        raise ValueError(f"deform_conv2d: offset {tuple(offset.shape)} must be [{batch}, {offset.shape[1]}, "
                         f"{out_size[0]}, {out_size[1]}] for input {tuple(input.shape)}")
    mask_shape = (batch, offset_group * kh * kw, *out_size)
    if mask is None:
        mask = offset.new_ones(mask_shape)
    elif tuple(mask.shape) != mask_shape:
        raise ValueError(f"deform_conv2d: mask {tuple(mask.shape)} must be {list(mask_shape)}")
    if bias is None:
        bias = weight.new_zeros(out_channels)
    return _deform_conv2d(input, weight, offset, bias, mask, stride, pads, dilation, group, offset_group)


# --- float64 reference ---------------------------------------------------------------------------------------

def deform_conv2d_reference(X: np.ndarray, W: np.ndarray, offset: np.ndarray, B: np.ndarray, mask: np.ndarray,
                            strides: Sequence[int], pads: Sequence[int], dilations: Sequence[int], group: int,
                            offset_group: int) -> np.ndarray:
    """The contract's formula in float64 NumPy: sample every tap bilinearly, modulate, contract with W."""
    X, W, offset, B, mask = (np.asarray(t, dtype=np.float64) for t in (X, W, offset, B, mask))
    batch, channels, height, width = X.shape
    out_channels, group_channels, kh, kw = W.shape
    out_h, out_w = offset.shape[2:]
    offset = offset.reshape(batch, offset_group, kh, kw, 2, out_h, out_w)
    mask = mask.reshape(batch, offset_group, kh, kw, out_h, out_w)
    images = X.reshape(batch, offset_group, channels // offset_group, height, width)
    rows = np.arange(out_h)[:, None] * strides[0] - pads[0]
    cols = np.arange(out_w)[None, :] * strides[1] - pads[1]
    sampled = np.zeros((batch, channels, kh, kw, out_h, out_w))
    for p in range(kh):
        for q in range(kw):
            y = rows + p * dilations[0] + offset[:, :, p, q, 0]
            x = cols + q * dilations[1] + offset[:, :, p, q, 1]
            taps = ref.bilinear_sample(images, y, x) * mask[:, :, None, p, q]
            sampled[:, :, p, q] = taps.reshape(batch, channels, out_h, out_w)
    sampled = sampled.reshape(batch, group, group_channels, kh, kw, out_h, out_w)
    kernel = W.reshape(group, out_channels // group, group_channels, kh, kw)
    y = np.einsum("ngcpqhw,gmcpq->ngmhw", sampled, kernel).reshape(batch, out_channels, out_h, out_w)
    return y + B[None, :, None, None]


# --- ONNX ------------------------------------------------------------------------------------------------------

def function_body(opset: int) -> onnx.FunctionProto:
    """The node's body: ONNX ``DeformConv`` itself (same inputs, same attributes, same order)."""
    deform = forwarding_node("DeformConv", INPUTS, ["Y"], ATTRIBUTES)
    return helper.make_function(DOMAIN, OP_TYPE, list(INPUTS), ["Y"], [deform], [helper.make_opsetid("", opset)],
                                attributes=list(ATTRIBUTES))


def _ints(values):
    """A constant int64 tensor in the traced graph."""
    return op.Constant(value_ints=list(values))


def gather_lowering(X, W, offset, B, mask, strides, pads, dilations, group, offset_group):
    """Standard ops (opset >= 13) for runtimes without DeformConv; the batch may be dynamic, the rest must be
    static (None otherwise). Same algorithm as the eager implementation: one Gather fetches the four bilinear
    neighbours' channel rows of every tap from a channels-last table, a batched [1, 4] @ [4, C/G] MatMul mixes
    them with their weights, one MatMul (batched over weight groups) applies the kernel."""
    dims = [*X.shape[1:], *W.shape, *offset.shape[2:]]
    if not all(isinstance(d, int) for d in dims):
        return None
    channels, height, width, out_channels, group_channels, kh, kw, out_h, out_w = dims
    taps, per_group = kh * kw, channels // offset_group
    tap_y = np.repeat(np.arange(kh) * dilations[0], kw)
    tap_x = np.tile(np.arange(kw) * dilations[1], kh)
    base_y = (np.arange(out_h) * strides[0] - pads[0]).reshape(out_h, 1, 1, 1) + tap_y  # [H', 1, 1, taps]
    base_x = (np.arange(out_w) * strides[1] - pads[1]).reshape(1, out_w, 1, 1) + tap_x  # [1, W', 1, taps]

    def const(array):
        return op.CastLike(op.Constant(value=onnx.numpy_helper.from_array(np.asarray(array, np.float32))), X)

    displacement = op.Transpose(op.Reshape(offset, _ints([-1, offset_group, taps, 2, out_h, out_w])),
                                perm=[0, 4, 5, 1, 2, 3])  # [N, H', W', G, taps, 2]
    y = op.Add(op.Gather(displacement, op.Constant(value_int=0), axis=5), const(base_y))
    x = op.Add(op.Gather(displacement, op.Constant(value_int=1), axis=5), const(base_x))
    last = _ints([-1])
    corner_y = op.Add(op.Unsqueeze(op.Floor(y), last), const([0, 0, 1, 1]))  # [N, H', W', G, taps, 4]
    corner_x = op.Add(op.Unsqueeze(op.Floor(x), last), const([0, 1, 0, 1]))
    one = const(1.0)
    weight = op.Mul(op.Sub(one, op.Abs(op.Sub(op.Unsqueeze(y, last), corner_y))),
                    op.Sub(one, op.Abs(op.Sub(op.Unsqueeze(x, last), corner_x))))
    inside = op.And(op.And(op.GreaterOrEqual(corner_y, const(0)), op.LessOrEqual(corner_y, const(height - 1))),
                    op.And(op.GreaterOrEqual(corner_x, const(0)), op.LessOrEqual(corner_x, const(width - 1))))
    modulation = op.Unsqueeze(op.Transpose(op.Reshape(mask, _ints([-1, offset_group, taps, out_h, out_w])),
                                           perm=[0, 3, 4, 1, 2]), last)
    weight = op.Mul(op.Mul(weight, modulation), op.CastLike(inside, X))

    def clipped(corner, limit):
        return op.Clip(op.Cast(corner, to=onnx.TensorProto.INT64), op.Constant(value_int=0),
                       op.Constant(value_int=limit - 1))

    pixel = op.Add(op.Mul(clipped(corner_y, height), op.Constant(value_int=width)), clipped(corner_x, width))
    batch = op.Squeeze(op.Shape(X, start=0, end=1))
    sample = op.Reshape(op.Range(op.Constant(value_int=0), batch, op.Constant(value_int=1)), _ints([-1, 1, 1, 1, 1, 1]))
    group_index = op.Constant(value=onnx.numpy_helper.from_array(
        np.arange(offset_group, dtype=np.int64).reshape(1, 1, 1, offset_group, 1, 1)))
    rows = op.Add(op.Mul(op.Add(op.Mul(sample, op.Constant(value_int=height * width)), pixel),
                         op.Constant(value_int=offset_group)), group_index)
    table = op.Reshape(op.Transpose(X, perm=[0, 2, 3, 1]), _ints([-1, per_group]))
    neighbours = op.Gather(table, rows, axis=0)  # [N, H', W', G, taps, 4, C/G]
    # Per tap, [1, 4] @ [4, C/G]: a batched MatMul mixes the neighbours in one pass (Mul + ReduceSum took two).
    columns = op.MatMul(op.Reshape(weight, _ints([-1, 1, 4])), op.Reshape(neighbours, _ints([-1, 4, per_group])))
    if group == 1:  # columns ordered (g, tap, c): reorder the kernel, not the columns
        kernel = op.Transpose(op.Reshape(W, _ints([out_channels, offset_group, per_group, taps])), perm=[1, 3, 2, 0])
        y = op.MatMul(op.Reshape(columns, _ints([-1, out_h * out_w, offset_group * taps * per_group])),
                      op.Reshape(kernel, _ints([-1, out_channels])))
        y = op.Transpose(op.Add(y, B), perm=[0, 2, 1])
        return op.Reshape(y, _ints([-1, out_channels, out_h, out_w]))
    columns = op.Transpose(op.Reshape(columns, _ints([-1, offset_group, taps, per_group])), perm=[0, 1, 3, 2])
    columns = op.Transpose(op.Reshape(columns, _ints([-1, group, group_channels * taps])), perm=[1, 0, 2])
    kernel = op.Transpose(op.Reshape(W, _ints([group, out_channels // group, group_channels * taps])),
                          perm=[0, 2, 1])
    y = op.Add(op.MatMul(columns, kernel), op.Reshape(B, _ints([group, 1, -1])))  # [group, N*H'*W', M/group]
    y = op.Transpose(op.Reshape(y, _ints([group, -1, out_h * out_w, out_channels // group])), perm=[1, 0, 3, 2])
    return op.Reshape(y, _ints([-1, out_channels, out_h, out_w]))


def torchvision_translation(lowering: str = "auto", opset: int | None = None) -> Callable:
    """The ``custom_translation_table`` entry exporting torchvision's op (``torch.ops.torchvision.deform_conv2d``,
    which its ``deform_conv2d`` functional calls) as this op: its node, or its standard lowering, as `lowering` and
    `opset` choose (`CustomOp.translation`).

    torchvision's arguments: (input, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w, dilation_h,
    dilation_w, groups, offset_groups, use_mask); its functional always passes a bias (zeros when there is none)
    and, without a mask, a placeholder with ``use_mask`` false, for which the node gets the v1 mask of ones.
    """
    translate = DEFORM_CONV2D.translation(lowering, opset)

    def translate_torchvision_deform_conv2d(input, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w,
                                            dilation_h, dilation_w, groups, offset_groups, use_mask):
        if not use_mask:
            taps = offset_groups * weight.shape[2] * weight.shape[3]
            shape = op.Concat(op.Shape(offset, start=0, end=1), _ints([taps]), op.Shape(offset, start=2), axis=0)
            mask = op.Expand(op.CastLike(op.Constant(value_float=1.0), input), shape)
        return translate(X=input, W=weight, offset=offset, B=bias, mask=mask, strides=[stride_h, stride_w],
                         pads=[pad_h, pad_w, pad_h, pad_w], dilations=[dilation_h, dilation_w], group=groups,
                         offset_group=offset_groups)

    # The exporter tells attributes (annotated with a Python type) from tensor inputs (unannotated).
    translate_torchvision_deform_conv2d.__annotations__ = {
        **dict.fromkeys(("stride_h", "stride_w", "pad_h", "pad_w", "dilation_h", "dilation_w", "groups",
                         "offset_groups"), int), "use_mask": bool}
    return translate_torchvision_deform_conv2d


def to_trt_oss_plugin(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite every ``deploykit::DeformConv2d`` node as TensorRT's OSS ``ModulatedDeformConv2d`` plugin node, in
    place: for TensorRT 8.6-10.0, whose ONNX parser has no DeformConv but whose plugin library has the plugin.

    The inputs are reordered to the plugin's (x, offset, mask, weight, bias) and the attributes renamed; the
    plugin takes one padding per axis, so pads must be symmetric. Nodes go to domain ``trt.plugins``.
    """
    for node in model.graph.node:
        if node.domain != DOMAIN or node.op_type != OP_TYPE:
            continue
        values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        pads = list(values["pads"])
        if pads[:2] != pads[2:]:
            raise ValueError(f"{node.name or OP_TYPE}: TensorRT's {TRT_OSS_PLUGIN} needs symmetric pads, got {pads}")
        by_name = dict(zip(INPUTS, node.input))
        attributes = {TRT_OSS_ATTRIBUTES[name]: list(values[name])[:2] if name == "pads" else values[name]
                      for name in ATTRIBUTES}
        replacement = helper.make_node(TRT_OSS_PLUGIN, [by_name[name] for name in TRT_OSS_INPUTS],
                                       list(node.output), name=node.name, domain=TRT_PLUGIN_DOMAIN, **attributes)
        node.CopyFrom(replacement)
    if not any(entry.domain == TRT_PLUGIN_DOMAIN for entry in model.opset_import):
        model.opset_import.append(helper.make_opsetid(TRT_PLUGIN_DOMAIN, 1))
    return model


# --- int8: sampling + 1x1 conv ----------------------------------------------------------------------------------

SAMPLED_CONV_SUFFIX = "/conv"


def to_sampled_conv(model: onnx.ModelProto, node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """Rewrite one ``deploykit::DeformConv2d`` node of `model`'s main graph (W an initializer) as standard ops, in
    place: the bilinear taps sampled by one ``GridSample`` (zeros outside the image: the contract's border), scaled
    by the mask, then a 1x1 ``Conv`` over the C*kH*kW sampled channels, which a quantizer can run in int8 with
    per-channel constant weights. Batch and spatial size stay dynamic. Returns the new nodes: every node but the
    last (named ``<node>/conv``, `SAMPLED_CONV_SUFFIX`) samples in float; each carries the node's metadata.

    Exact in real arithmetic: Y = conv1x1(columns, W as [M, C/group*kH*kW, 1, 1]) with columns[n, c*T + t, i, j] =
    mask[n, g, t, i, j] * bilinear(X[n, c], y, x), the sample point normalised for GridSample (align_corners=0):
    u = (2x + 1) / W_in - 1. The int8 columns need no range of their own: bilinear weights are a convex combination
    and the mask lies in [0, 1] (a sigmoid), so they stay within X's range.
    """
    rewrite = NodeRewrite(model, node)
    add, constant = rewrite.add, rewrite.constant
    initializers = {t.name: t for t in model.graph.initializer}
    X, W, offset, B, mask = node.input
    out_channels, group_channels, kh, kw = initializers[W].dims
    values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    strides, pads, dilations = list(values["strides"]), list(values["pads"]), list(values["dilations"])
    group, offset_group = values.get("group", 1), values.get("offset_group", 1)
    channels, taps = group * group_channels, kh * kw
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))

    tap_y = (np.repeat(np.arange(kh), kw) * dilations[0] - pads[0]).astype(np.float32).reshape(taps, 1, 1)
    tap_x = (np.tile(np.arange(kw), kh) * dilations[1] - pads[1]).astype(np.float32).reshape(taps, 1, 1)
    zero, one, two = constant("zero", np.int64(0)), constant("one", np.int64(1)), constant("two", np.float32(2))
    out_size = add("Shape", [offset], "out_size", start=2)  # [H', W']
    image_size = add("Shape", [X], "in_size", start=2)
    in_size = add("Cast", [image_size], "in_size_float", to=onnx.TensorProto.FLOAT)
    positions = []
    for axis, (taps_at, row_shape) in enumerate(((tap_y, [1, -1, 1]), (tap_x, [1, 1, -1]))):
        name = "yx"[axis]
        count = add("Gather", [out_size, constant(f"axis_{name}", np.int64(axis))], f"count_{name}")
        steps = add("Cast", [add("Range", [zero, count, one], f"steps_{name}")], f"steps_{name}_float",
                    to=onnx.TensorProto.FLOAT)
        along = add("Mul", [steps, constant(f"stride_{name}", np.float32(strides[axis]))], f"along_{name}")
        base = add("Add", [add("Reshape", [along, constant(f"row_shape_{name}", np.array(row_shape, np.int64))],
                               f"rows_{name}"), constant(f"taps_{name}", taps_at)], f"base_{name}")  # [T, H' or 1, W' or 1]
        extent = add("Gather", [in_size, constant(f"in_axis_{name}", np.int64(axis))], f"extent_{name}")
        positions.append((base, extent))
    displacement_shape = add("Concat", [constant("displacement_dims", np.array([-1, offset_group, taps, 2], np.int64)),
                                        out_size], "displacement_shape", axis=0)
    displacement = add("Reshape", [offset, displacement_shape], "displacement")  # [N, G, T, 2, H', W']
    normalised = []
    for axis, (base, extent) in enumerate(positions):
        name = "yx"[axis]
        delta = add("Gather", [displacement, constant(f"component_{name}", np.int64(axis))], f"delta_{name}", axis=3)
        pixel = add("Add", [delta, base], f"pixel_{name}")  # [N, G, T, H', W'] in input pixels
        # u = (2 * pixel + 1) / extent - 1
        scaled = add("Div", [add("Add", [add("Mul", [pixel, two], f"twice_{name}"),
                                         constant(f"half_step_{name}", np.float32(1))], f"shifted_{name}"), extent],
                     f"scaled_{name}")
        normalised.append(add("Unsqueeze", [add("Sub", [scaled, constant(f"unit_{name}", np.float32(1))],
                                                f"normalised_{name}"), constant(f"last_{name}", np.array([-1]))],
                              f"point_{name}"))
    grid = add("Concat", [normalised[1], normalised[0]], "grid_points", axis=-1)  # (x, y) as GridSample reads
    taps_rows = add("Mul", [constant("taps", np.array([taps], np.int64)),
                            add("Slice", [out_size, constant("first", np.array([0])), constant("second", np.array([1]))],
                                "out_rows")], "taps_rows")
    width = add("Slice", [out_size, constant("second_start", np.array([1])), constant("end", np.array([2]))], "out_cols")
    grid = add("Reshape", [grid, add("Concat", [constant("minus_one", np.array([-1], np.int64)), taps_rows, width,
                                                 constant("xy", np.array([2], np.int64))], "grid_shape", axis=0)],
               "grid")  # [N*G, T*H', W', 2]
    grouped = add("Reshape", [X, add("Concat", [constant("grouped_dims", np.array([-1, channels // offset_group],
                                                                                    np.int64)),
                                                 image_size], "grouped_shape", axis=0)],
                  "grouped")  # [N*G, C/G, H, W]
    sampled = add("GridSample", [grouped, grid], "sampled", mode="linear" if opset >= 20 else "bilinear",
                  padding_mode="zeros", align_corners=0)  # [N*G, C/G, T*H', W']
    sampled = add("Reshape", [sampled, add("Concat", [
        constant("sampled_dims", np.array([-1, offset_group, channels // offset_group, taps], np.int64)), out_size],
        "sampled_shape", axis=0)], "sampled_taps")  # [N, G, C/G, T, H', W']
    if not _expanded_ones(model, mask):  # v1's mask of ones costs no pass
        modulation = add("Reshape", [mask, add("Concat", [
            constant("mask_dims", np.array([-1, offset_group, 1, taps], np.int64)), out_size], "mask_shape", axis=0)],
            "modulation")
        sampled = add("Mul", [sampled, modulation], "modulated")
    columns = add("Reshape", [sampled, add("Concat", [
        constant("column_dims", np.array([-1, channels * taps], np.int64)), out_size], "column_shape", axis=0)],
        "columns")  # [N, C*T, H', W'], channel c*T + t
    weight = onnx.numpy_helper.to_array(initializers[W]).reshape(out_channels, group_channels * taps, 1, 1)
    return rewrite.finish("Conv", [columns, constant("weight", weight), B], SAMPLED_CONV_SUFFIX.lstrip("/"),
                          group=group)


def _expanded_ones(model: onnx.ModelProto, name: str) -> bool:
    """Whether `name` is an initializer of ones, as it is or through Expand (how v1's mask of ones exports)."""
    producer = next((n for n in model.graph.node if name in n.output), None)
    if producer is not None and producer.op_type == "Expand":
        name = producer.input[0]
    elif producer is not None:
        return False
    value = next((t for t in model.graph.initializer if t.name == name), None)
    return value is not None and bool(np.all(onnx.numpy_helper.to_array(value) == 1))


DEFORM_CONV2D = CustomOp(
    torch_op=torch.ops.deploykit.deform_conv2d.default, op_type=OP_TYPE, inputs=INPUTS, outputs=("Y",),
    attributes=ATTRIBUTES, body=function_body, standard_lowering=gather_lowering, min_opset=BODY_OPSET,
    prefer_standard=False, plugin="deform_conv2d")


# --- OpenVINO --------------------------------------------------------------------------------------------------

def to_openvino(node) -> list:
    """OpenVINO ONNX-frontend conversion (``openvino.frontend.NodeContext`` -> outputs) of the node, and of ONNX
    ``DeformConv``, whose inputs and attributes are the same (B and mask optional, attributes defaulted there):
    one native ``DeformableConvolution`` (opset 8), whose offset and mask layouts are the contract's.

    ``bilinear_interpolation_pad=True`` because OpenVINO's default (False) moves samples that fall less than a
    pixel outside the image onto its edge, where torchvision, mmcv and ONNX read zeros beyond the border.
    """
    from openvino import opset8 as ov

    X, W, offset, B, mask = (_optional_input(node, i) for i in range(len(INPUTS)))
    pads = list(node.get_attribute("pads", [0, 0, 0, 0]))
    y = ov.deformable_convolution(
        X, offset, W, strides=list(node.get_attribute("strides", [1, 1])), pads_begin=pads[:2], pads_end=pads[2:],
        dilations=list(node.get_attribute("dilations", [1, 1])), mask=mask, group=node.get_attribute("group", 1),
        deformable_group=node.get_attribute("offset_group", 1), bilinear_interpolation_pad=True)
    if B is not None:
        y = ov.add(y, ov.unsqueeze(B, ov.constant(np.array([1, 2], np.int64))))
    return y.outputs()


def _optional_input(node, index: int):
    """Input `index` of an OpenVINO frontend node, or None where the ONNX node omits it (absent, or named "")."""
    if index >= node.get_input_size():
        return None
    value = node.get_input(index)
    return None if value.get_node().get_type_name() == "NullNode" else value
