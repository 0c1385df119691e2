"""``deploykit::DynamicConv2d``: per-sample kernel aggregation + convolution, shared by CondConv, DyConv and ODConv.

Contract (the ONNX node, the torch op and the TensorRT plugin all take exactly this):

    inputs  X [N, C, H, W]            features
            W [K, M, C/group, kH, kW] kernel bank
            A [N, K]                  per-sample kernel weights (CondConv routing, DyConv / ODConv softmax)
            B [K, M]                  bias bank (zeros when the layer has no bias)
            S [N or 1, kH, kW]        per-sample tap attention (ODConv's spatial attention; ones otherwise)
    attrs   strides [2], pads [4] (top, left, bottom, right), dilations [2], group
            plugin_namespace "deploykit", plugin_version "1"
    output  Y [N, M, H', W'],  Y[n] = conv(X[n], S[n] * sum_k A[n,k] W[k]) + sum_k A[n,k] B[k]

Every input is required, so one function body serves every call; a layer without bias or tap attention passes
the neutral value. ODConv's channel and filter attentions are plain scalings of the input and the output and stay
outside the op.

Lowerings, measured on the development machine (ORT 1.31, 2 threads, Intel Xeon with AVX-512; ms and ratio to a
plain static conv of the same shape; ``python bench/bench_dynamic_conv.py`` prints the current numbers):

    128->128 3x3 28x28, K=4               batch 1          batch 8
    static conv (floor)                   0.70             5.71
    conv with its weight as an input      1.47x            1.38x     <- floor for any runtime-computed kernel
    node body, dynamic batch              1.56x            1.66x
    fold, static batch (standard ops)     1.61x            1.54x
    first candidates, same harness:  Loop over the batch 1.77x / 1.86x; Pad+9 Slice+MatMul taps 2.9x / 3.6x;
    one big MatMul + 9 shifted Slices 2.7x / 3.7x; K static convs + weighted sum ~4x (K times the FLOPs).
    depthwise 256 3x3 14x14 (per-sample): Scan 5.3x / 5.8x, fold 3.4x / 5.0x, K convs 4.9x / 8.8x of a static
    depthwise conv (0.034 / 0.18 ms): ORT's fast depthwise path needs constant weights; the GPU plugin is the fix.
    1x1 256->64: Scan 1.03x / 1.21x, a batched MatMul 0.94x / 1.07x (not worth a second body).

ORT only pre-packs constant weights, so every form pays the weight-as-input floor; the node's body is the best
dynamic-batch form found (see `function_body` for the details that mattered), and with a static batch the
standard lowering folds the batch into the conv groups (one Conv, group = group * N), the fastest standard form.
A dynamic batch cannot fold because ONNX's ``group`` is a static attribute.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper
from onnx.reference.op_run import OpRun
from onnxscript import opset20 as op

from deploykit.export.custom_op import DOMAIN, CustomOp, forwarding_node
from deploykit.export.rewrite import NodeRewrite
from deploykit.ops import reference as ref
from deploykit.ops.autograd import differentiate_by_recomputing
from deploykit.ops.reference import conv_output_size as output_size

OP_TYPE = "DynamicConv2d"
INPUTS = ("X", "W", "A", "B", "S")
ATTRIBUTES = {"strides": Sequence[int], "pads": Sequence[int], "dilations": Sequence[int], "group": int}


# --- PyTorch ---------------------------------------------------------------------------------------------------

def _per_sample_kernels(W: torch.Tensor, A: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """[N, M, C/g, kH, kW] = S[n] * sum_k A[n,k] W[k]."""
    kernels = (A @ W.reshape(W.shape[0], -1)).reshape(A.shape[0], *W.shape[1:])
    return kernels * S[:, None, None]


def _forward(X: torch.Tensor, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, S: torch.Tensor,
             strides: Sequence[int], pads: Sequence[int], dilations: Sequence[int], group: int) -> torch.Tensor:
    """Eager implementation: the batch folded into conv groups, one F.conv2d for all samples."""
    batch, out_channels = X.shape[0], W.shape[1]
    kernels = _per_sample_kernels(W, A, S)
    top, left, bottom, right = pads
    if (top, left) != (bottom, right):
        X, padding = F.pad(X, (left, right, top, bottom)), (0, 0)
    else:
        padding = (top, left)
    y = F.conv2d(X.reshape(1, -1, *X.shape[2:]), kernels.reshape(-1, *kernels.shape[2:]), (A @ B).reshape(-1),
                 tuple(strides), padding, tuple(dilations), group * batch)
    return y.reshape(batch, out_channels, *y.shape[2:])


@torch.library.custom_op("deploykit::dynamic_conv2d", mutates_args=())
def _dynamic_conv2d(X: torch.Tensor, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, S: torch.Tensor,
                    strides: list[int], pads: list[int], dilations: list[int], group: int) -> torch.Tensor:
    return _forward(X, W, A, B, S, strides, pads, dilations, group)


@_dynamic_conv2d.register_fake
def _(X, W, A, B, S, strides, pads, dilations, group):
    return X.new_empty(X.shape[0], W.shape[1], *output_size(X.shape[2:], W.shape[3:], strides, pads, dilations))


differentiate_by_recomputing(_dynamic_conv2d, _forward, tensor_count=5)


def dynamic_conv2d(x: torch.Tensor, weight: torch.Tensor, attention: torch.Tensor, bias: torch.Tensor,
                   spatial: torch.Tensor, stride: Sequence[int], pads: Sequence[int], dilation: Sequence[int],
                   groups: int) -> torch.Tensor:
    """Per-sample kernel aggregation + convolution (see the module docstring for shapes). Differentiable; exports
    as one ``deploykit::DynamicConv2d`` node (or folded standard ops for a static batch)."""
    return _dynamic_conv2d(x, weight, attention, bias, spatial, list(stride), list(pads), list(dilation), groups)


def check_groups(layer: str, in_channels: int, out_channels: int, groups: int) -> None:
    """Refuse a channel split the kernel bank cannot have, in one sentence (instead of PyTorch's conv error at the
    first forward)."""
    if groups < 1 or in_channels % groups or out_channels % groups:
        raise ValueError(f"{layer}: in ({in_channels}) and out ({out_channels}) channels must both be divisible by "
                         f"groups ({groups})")


def register_neutral_inputs(module: torch.nn.Module, kernels: int, out_channels: int, kernel_size: int) -> None:
    """Give `module` the op's neutral bias bank (`no_bias`, zeros [K, M]) and tap attention (`unit_taps`, ones
    [1, k, k]) for layers without them. Non-persistent buffers: they follow `.to()` but stay out of checkpoints."""
    module.register_buffer("no_bias", torch.zeros(kernels, out_channels), persistent=False)
    module.register_buffer("unit_taps", torch.ones(1, kernel_size, kernel_size), persistent=False)


# --- float64 reference ---------------------------------------------------------------------------------------

def dynamic_conv2d_reference(X: np.ndarray, W: np.ndarray, A: np.ndarray, B: np.ndarray, S: np.ndarray,
                             strides: Sequence[int], pads: Sequence[int], dilations: Sequence[int],
                             group: int) -> np.ndarray:
    """The contract's formula, sample by sample, in float64 NumPy."""
    X, W, A, B, S = (np.asarray(t, dtype=np.float64) for t in (X, W, A, B, S))
    top, left, bottom, right = pads
    X = np.pad(X, ((0, 0), (0, 0), (top, bottom), (left, right)))
    outputs = []
    for n in range(X.shape[0]):
        kernel = np.tensordot(A[n], W, axes=1) * S[n if S.shape[0] > 1 else 0]
        bias = A[n] @ B
        outputs.append(ref.conv2d(X[n:n + 1], kernel, bias, strides, 0, dilations, group))
    return np.concatenate(outputs)


class DynamicConv2dReference(OpRun):
    """``onnx.reference`` kernel for the node (its evaluator cannot run attributes inside a Scan body)."""

    op_domain = DOMAIN

    def _run(self, X, W, A, B, S, strides=None, pads=None, dilations=None, group=None, plugin_namespace=None,
             plugin_version=None):
        return (dynamic_conv2d_reference(X, W, A, B, S, strides, pads, dilations, group).astype(X.dtype),)


DynamicConv2dReference.__name__ = OP_TYPE  # OpRun classes are looked up by the node's op_type


# --- ONNX ------------------------------------------------------------------------------------------------------

def _conv(x: str, w: str, b: str, y: str) -> onnx.NodeProto:
    """A Conv whose attributes are the function's (strides, pads, dilations, group)."""
    return forwarding_node("Conv", [x, w, b], [y], ATTRIBUTES)


def _untyped(name: str) -> onnx.ValueInfoProto:
    return helper.make_value_info(name, onnx.TypeProto())


def function_body(opset: int) -> onnx.FunctionProto:
    """The node's standard-op body: mix the kernel bank per sample, then convolve sample by sample.

    Per-sample kernels are the only large intermediate (N x M x C/g x kH x kW floats), so they are written once
    and never copied; what mattered in onnxruntime, by measurement:
    - without tap attention (S all ones: CondConv, DyConv) the kernels are [N, K] @ bank [K, M*C/g*T], one
      MatMul that reads the bank once for the whole batch;
    - with tap attention (ODConv) each sample's kernel rows are bank [M*C/g, K*T] @ (A[n, k] * diag(S[n]))
      [K*T, T], T = kH*kW: the bank relayout is a constant that runtimes fold at load time, and S costs no extra
      pass over the kernels (a broadcast Mul or Tile + Mul afterwards cost 5-15% of a whole OD-ResNet-50);
    - the bias goes into each Conv; a batch of one runs one Conv, larger batches a Scan (its slices are views).
    """
    per_sample = helper.make_graph([_conv("x_n", "w_n", "b_n", "y_n")], "per_sample_conv",
                                   [_untyped("x_n"), _untyped("w_n"), _untyped("b_n")], [_untyped("y_n")])
    single_sample = helper.make_graph([
        helper.make_node("Reshape", ["kernel_rows", "kernel_shape"], ["kernel"]),
        _conv("X", "kernel", "stacked_biases", "single")], "single_sample", [], [_untyped("single")])
    every_sample = helper.make_graph([
        helper.make_node("Unsqueeze", ["X", "batch_axis"], ["samples"]),
        helper.make_node("Scan", ["samples", "kernels", "biases"], ["convolved"], body=per_sample, num_scan_inputs=3),
        helper.make_node("Squeeze", ["convolved", "batch_axis"], ["scanned"])], "every_sample", [],
        [_untyped("scanned")])
    # Without tap attention: [N, K] @ bank [K, M*C/g*T], reading the bank once for the whole batch.
    without_taps = helper.make_graph([
        helper.make_node("Shape", ["W"], ["bank_size"], end=1),
        helper.make_node("Concat", ["bank_size", "minus_one"], ["flat_bank_shape"], axis=0),
        helper.make_node("Reshape", ["W", "flat_bank_shape"], ["flat_bank"]),
        helper.make_node("MatMul", ["A", "flat_bank"], ["mixed"])], "without_taps", [], [_untyped("mixed")])
    # With tap attention: bank [M*C/g, K*T] @ D[n] [K*T, T], D[n] = A[n, k] * diag(S[n]).
    with_taps = helper.make_graph([
        helper.make_node("Transpose", ["W"], ["bank_by_filter"], perm=[1, 2, 0, 3, 4]),
        helper.make_node("Concat", ["row_count", "minus_one"], ["bank_shape"], axis=0),
        helper.make_node("Reshape", ["bank_by_filter", "bank_shape"], ["bank"]),
        helper.make_node("Shape", ["S"], ["taps_batch"], end=1),
        helper.make_node("Concat", ["taps_batch", "one_i64", "one_i64", "taps"], ["taps_row_shape"], axis=0),
        helper.make_node("Reshape", ["S", "taps_row_shape"], ["taps_row"]),
        helper.make_node("Concat", ["taps", "taps"], ["square"], axis=0),
        helper.make_node("ConstantOfShape", ["square"], ["square_zeros"]),
        helper.make_node("EyeLike", ["square_zeros"], ["identity"]),
        helper.make_node("CastLike", ["identity", "S"], ["identity_like"]),
        helper.make_node("Mul", ["taps_row", "identity_like"], ["taps_diagonal"]),
        helper.make_node("Unsqueeze", ["A", "pair_axes"], ["weights"]),
        helper.make_node("Mul", ["weights", "taps_diagonal"], ["mixing"]),
        helper.make_node("Shape", ["A"], ["samples_in_a"], end=1),
        helper.make_node("Concat", ["samples_in_a", "minus_one", "taps"], ["mixing_shape"], axis=0),
        helper.make_node("Reshape", ["mixing", "mixing_shape"], ["mixing_rows"]),
        helper.make_node("MatMul", ["bank", "mixing_rows"], ["kernel_rows_tapped"]),
    ], "with_taps", [], [_untyped("kernel_rows_tapped")])
    nodes = [
        helper.make_node("Constant", [], ["minus_one"], value_ints=[-1]),
        helper.make_node("Constant", [], ["one"], value_float=1.0),
        helper.make_node("Constant", [], ["one_i64"], value_ints=[1]),
        helper.make_node("Constant", [], ["batch_axis"], value_ints=[1]),
        helper.make_node("Constant", [], ["pair_axes"], value_ints=[2, 3]),
        helper.make_node("Shape", ["W"], ["kernel_shape"], start=1),
        helper.make_node("Shape", ["W"], ["rows"], start=1, end=3),
        helper.make_node("ReduceProd", ["rows"], ["row_count"], keepdims=1),
        helper.make_node("Shape", ["W"], ["window"], start=3),
        helper.make_node("ReduceProd", ["window"], ["taps"], keepdims=1),
        helper.make_node("CastLike", ["one", "S"], ["one_like_s"]),
        helper.make_node("ReduceMin", ["S"], ["smallest_tap"], keepdims=0),
        helper.make_node("ReduceMax", ["S"], ["largest_tap"], keepdims=0),
        helper.make_node("Equal", ["smallest_tap", "one_like_s"], ["smallest_is_one"]),
        helper.make_node("Equal", ["largest_tap", "one_like_s"], ["largest_is_one"]),
        helper.make_node("And", ["smallest_is_one", "largest_is_one"], ["taps_are_ones"]),
        helper.make_node("If", ["taps_are_ones"], ["kernel_rows"], then_branch=without_taps, else_branch=with_taps),
        helper.make_node("Concat", ["minus_one", "kernel_shape"], ["per_sample_shape"], axis=0),
        helper.make_node("Reshape", ["kernel_rows", "per_sample_shape"], ["kernels"]),
        helper.make_node("Shape", ["A"], ["batch"], end=1),
        helper.make_node("MatMul", ["A", "B"], ["biases"]),
        helper.make_node("Reshape", ["biases", "minus_one"], ["stacked_biases"]),
        helper.make_node("Equal", ["batch", "one_i64"], ["batch_is_one"]),
        helper.make_node("Squeeze", ["batch_is_one"], ["single_batch"]),
        helper.make_node("If", ["single_batch"], ["Y"], then_branch=single_sample, else_branch=every_sample),
    ]
    return helper.make_function(DOMAIN, OP_TYPE, list(INPUTS), ["Y"], nodes, [helper.make_opsetid("", opset)],
                                attributes=list(ATTRIBUTES))


def fold_lowering(X, W, A, B, S, strides, pads, dilations, group):
    """Standard ops for a static batch: per-sample kernels as conv groups (group * N). None for a dynamic batch."""
    batch = X.shape[0] if X.shape is not None else None
    if not isinstance(batch, int):
        return None
    bank_size, kernel_shape = W.shape[0], list(W.shape[1:])
    per_sample = math.prod(kernel_shape)
    taps = kernel_shape[-2] * kernel_shape[-1]
    mixed = op.MatMul(A, op.Reshape(W, op.Constant(value_ints=[bank_size, per_sample])))
    tiled_taps = op.Tile(op.Reshape(S, op.Constant(value_ints=[-1, taps])),
                         op.Constant(value_ints=[1, per_sample // taps]))
    kernels = op.Reshape(op.Mul(mixed, tiled_taps), op.Constant(value_ints=[-1, *kernel_shape[1:]]))
    folded = op.Reshape(X, op.Constant(value_ints=[1, -1, *X.shape[2:]]))
    y = op.Conv(folded, kernels, op.Reshape(op.MatMul(A, B), op.Constant(value_ints=[-1])),
                strides=list(strides), pads=list(pads), dilations=list(dilations), group=group * batch)
    height, width = output_size(X.shape[2:], W.shape[3:], strides, pads, dilations)
    return op.Reshape(y, op.Constant(value_ints=[batch, kernel_shape[0], height, width]))


# --- int8 (QDQ) -------------------------------------------------------------------------------------------------

QDQ_OP_TYPE = "DynamicConv2dQDQ"
# The quantization parameters follow the contract's inputs: x_scale / x_zero_point (uint8, calibrated on X),
# w_scale / w_zero_point [M] (int8, symmetric per output channel, from `aggregated_kernel_bound`), y_scale /
# y_zero_point (uint8, calibrated on the convolution before its bias).
QDQ_INPUTS = (*INPUTS, "x_scale", "x_zero_point", "w_scale", "w_zero_point", "y_scale", "y_zero_point")


def aggregated_kernel_bound(bank: np.ndarray, attention_max: np.ndarray | None = None,
                            taps_max: float = 1.0) -> np.ndarray:
    """A bound [M] on |S[n] * sum_k A[n,k] W[k]| per output channel that holds for every sample, from the bank alone.

    Softmax attention (`attention_max` None: each row of A is a convex combination) gives max_k max|W[k, o]|;
    attention known to lie in [0, a_k] (sigmoid routing: a_k = 1) gives sum_k a_k max|W[k, o]|; tap attention in
    [0, taps_max] scales either. The per-sample kernel then quantizes to int8 with the scale bound / 127, fixed
    before any input is seen, so no sample's kernel is ever clipped.
    """
    per_kernel = np.abs(np.asarray(bank, dtype=np.float64)).reshape(*bank.shape[:2], -1).max(axis=2)  # [K, M]
    bound = per_kernel.max(axis=0) if attention_max is None else np.asarray(attention_max, np.float64) @ per_kernel
    return bound * taps_max


def quantized_function_body(opset: int) -> onnx.FunctionProto:
    """`function_body` with every per-sample Conv in int8, in the QDQ layout ORT fuses into QLinearConv even though
    the kernel is computed at run time: Q/DQ on the input and on the kernel (per output channel, axis 0), Conv
    without bias, Q/DQ on its output, then the per-sample bias added in float (ORT fuses no float bias)."""
    body = function_body(opset)
    _quantize_convs(body.node)
    body.name = QDQ_OP_TYPE
    del body.input[:]
    body.input.extend(QDQ_INPUTS)
    return body


def _quantize_convs(nodes) -> None:
    """Replace each Conv(x, w, b) -> y in `nodes` and their subgraphs by its QDQ form, in place."""
    for index in reversed(range(len(nodes))):
        node = nodes[index]
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                _quantize_convs(attribute.g.node)
        if node.op_type != "Conv":
            continue
        x, w, b = node.input
        y = node.output[0]
        conv = onnx.NodeProto()
        conv.CopyFrom(node)
        conv.input[:] = [f"{x}_dq", f"{w}_dq"]
        conv.output[:] = [f"{y}_unbiased"]
        replacement = [
            helper.make_node("QuantizeLinear", [x, "x_scale", "x_zero_point"], [f"{x}_q"]),
            helper.make_node("DequantizeLinear", [f"{x}_q", "x_scale", "x_zero_point"], [f"{x}_dq"]),
            helper.make_node("QuantizeLinear", [w, "w_scale", "w_zero_point"], [f"{w}_q"], axis=0),
            helper.make_node("DequantizeLinear", [f"{w}_q", "w_scale", "w_zero_point"], [f"{w}_dq"], axis=0),
            conv,
            helper.make_node("QuantizeLinear", [f"{y}_unbiased", "y_scale", "y_zero_point"], [f"{y}_q"]),
            helper.make_node("DequantizeLinear", [f"{y}_q", "y_scale", "y_zero_point"], [f"{y}_dq"]),
            helper.make_node("Constant", [], [f"{b}_axes"], value_ints=[1, 2]),
            helper.make_node("Unsqueeze", [b, f"{b}_axes"], [f"{b}_per_channel"]),
            helper.make_node("Add", [f"{y}_dq", f"{b}_per_channel"], [y]),
        ]
        nodes.pop(index)
        for offset, new in enumerate(replacement):
            nodes.insert(index + offset, new)


def to_bank_conv(model: onnx.ModelProto, node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """Rewrite one ``deploykit::DynamicConv2d`` node of `model`'s main graph (W an initializer, group 1) as one static
    conv with the whole kernel bank whose K outputs are mixed per sample, in place; returns the new nodes. Batch and
    spatial size stay dynamic.

    Exact in real arithmetic, by linearity: conv(X, S[n] * sum_k A[n,k] W[k]) = sum_k A[n,k] conv_S(X, W[k]), where
    conv_S scales tap t's contribution by S[n, t]. Without tap attention (S a constant of ones) that is one Conv
    with K*M output channels. With it, the taps are gathered first (im2col: a Pad and one strided Slice per tap,
    concatenated tap-major), scaled by S, and convolved 1x1 with the bank laid out to match. Every conv then has
    constant weights, so a quantizer gives them per-channel int8 weights and a runtime pre-packs them: K times the
    multiply-adds, but no per-sample kernel to compute, quantize and re-pack (docs/quantization.md says when that
    pays).
    """
    rewrite = NodeRewrite(model, node)
    add, constant = rewrite.add, rewrite.constant
    initializers = {t.name: t for t in model.graph.initializer}
    X, W, A, B, S = node.input
    bank = onnx.numpy_helper.to_array(initializers[W])
    kernels, out_channels, channels, kh, kw = bank.shape
    taps = kh * kw
    values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    strides, pads, dilations = list(values["strides"]), list(values["pads"]), list(values["dilations"])
    tap_weights = initializers.get(S)
    if tap_weights is not None and np.all(onnx.numpy_helper.to_array(tap_weights) == 1):
        outputs = add("Conv", [X, constant("bank", bank.reshape(kernels * out_channels, channels, kh, kw))],
                      "bank_conv", strides=strides, pads=pads, dilations=dilations)
    else:
        top, left, bottom, right = pads
        padded = add("Pad", [X, constant("padding", np.array([0, 0, top, left, 0, 0, bottom, right]))], "padded")
        reach = np.array([dilations[0] * (kh - 1) + 1, dilations[1] * (kw - 1) + 1])
        steps = constant("strides", np.array(strides))
        # rows / columns the first tap spans: (out - 1) * stride + 1, out = (padded - reach) // stride + 1
        room = add("Sub", [add("Shape", [padded], "padded_size", start=2), constant("reach", reach)], "room")
        last_offset = add("Mul", [add("Div", [room, steps], "last_step"), steps], "last_offset")
        span = add("Add", [last_offset, constant("one", np.array([1]))], "span")
        axes = constant("axes", np.array([2, 3]))
        tap_slices = []
        for t in range(taps):
            start = constant(f"start_{t}", np.array([(t // kw) * dilations[0], (t % kw) * dilations[1]]))
            tap_slices.append(add("Slice", [padded, start, add("Add", [start, span], f"end_{t}"), axes, steps],
                                  f"tap_{t}"))
        patches = add("Concat", tap_slices, "patches", axis=1)  # [N, T*C, H', W'], channel t*C + c
        tap_column = add("Reshape", [S, constant("tap_shape", np.array([-1, taps, 1]))], "tap_column")
        tap_rows = add("Tile", [tap_column, constant("per_channel", np.array([1, 1, channels]))], "tap_rows")
        tap_scales = add("Reshape", [tap_rows, constant("rows_shape", np.array([-1, taps * channels, 1, 1]))],
                         "tap_scales")
        by_tap = bank.reshape(kernels * out_channels, channels, taps).transpose(0, 2, 1)  # [K*M, T, C]
        outputs = add("Conv", [add("Mul", [patches, tap_scales], "scaled_patches"),
                               constant("bank", by_tap.reshape(kernels * out_channels, taps * channels, 1, 1))],
                      "bank_conv")
    by_kernel = add("Reshape", [outputs, constant("by_kernel_shape", np.array([0, kernels, -1]))], "by_kernel")
    mixing_row = add("Unsqueeze", [A, constant("row_axis", np.array([1]))], "mixing_row")
    mixed = add("MatMul", [mixing_row, by_kernel], "mixed")  # [N, 1, M*H'*W']
    out_shape = add("Concat", [constant("out_dims", np.array([-1, out_channels])),
                               add("Shape", [outputs], "out_size", start=2)], "out_shape", axis=0)
    biases = add("Reshape", [add("MatMul", [A, B], "biases"),
                             constant("bias_shape", np.array([-1, out_channels, 1, 1]))], "bias_columns")
    return rewrite.finish("Add", [add("Reshape", [mixed, out_shape], "unbiased"), biases], "biased")


DYNAMIC_CONV2D = CustomOp(
    torch_op=torch.ops.deploykit.dynamic_conv2d.default, op_type=OP_TYPE, inputs=INPUTS, outputs=("Y",),
    attributes=ATTRIBUTES, body=function_body, standard_lowering=fold_lowering, reference=DynamicConv2dReference,
    plugin="dynamic_conv2d")


# --- OpenVINO --------------------------------------------------------------------------------------------------

def to_openvino(node) -> list:
    """OpenVINO ONNX-frontend conversion (``openvino.frontend.NodeContext`` -> outputs) of the node; see
    `_openvino_dynamic_conv`."""
    return _openvino_dynamic_conv(node, quantized=False)


def qdq_to_openvino(node) -> list:
    """The same for `QDQ_OP_TYPE`: the input, the per-sample kernel (per output channel) and the unbiased output
    pass through OpenVINO FakeQuantize ops with the node's scales and zero points, the float form of its Q/DQ pairs
    (what OpenVINO's ONNX frontend makes of QuantizeLinear/DequantizeLinear too)."""
    return _openvino_dynamic_conv(node, quantized=True)


def _fake_quantize(value, scale, zero_point, low: int, high: int, channel_shape: tuple[int, ...] | None = None):
    """OpenVINO FakeQuantize equal to QuantizeLinear then DequantizeLinear with `scale` and `zero_point` (integer
    range [low, high]); `channel_shape` reshapes per-channel parameters to broadcast against `value`."""
    from openvino import opset13 as ov

    dtype = value.get_element_type()
    scale, zero_point = ov.convert(scale, dtype), ov.convert(zero_point, dtype)
    if channel_shape is not None:
        scale, zero_point = (ov.reshape(v, _ov_ints(*channel_shape), False) for v in (scale, zero_point))
    bounds = [ov.multiply(ov.subtract(ov.constant(np.array(edge, dtype.to_dtype())), zero_point), scale)
              for edge in (low, high)]
    return ov.fake_quantize(value, *bounds, *bounds, high - low + 1).output(0)


def _openvino_dynamic_conv(node, quantized: bool) -> list:
    """OpenVINO conversion of the node, float or (`quantized`) with its QDQ pairs as FakeQuantize ops.

    Kernels [N, K] @ bank [K, M*C/g*T] in one MatMul (times the tap attention unless it is the constant ones of a
    layer without it), bias A @ B, then per sample, keeping batch and spatial size dynamic (measured in
    docs/openvino.md): dense layers as one batched MatMul over image patches, grouped and depthwise layers as a
    TensorIterator over the batch of one GroupConvolution (as patches they become many tiny MatMuls). OpenVINO's
    CPU plugin refuses the batch folded into the groups (groups = the dynamic batch, computed weights).
    """
    from openvino import opset13 as ov

    X, W, A, B, S = (node.get_input(i) for i in range(len(INPUTS)))
    bank, out_channels, group_channels, kh, kw = W.get_partial_shape().to_shape()
    if quantized:
        x_scale, x_zero, w_scale, w_zero, y_scale, y_zero = (node.get_input(len(INPUTS) + i) for i in range(6))
        X = _fake_quantize(X, x_scale, x_zero, 0, 255)
    group = node.get_attribute("group")
    dense = group == 1
    if dense:  # the patches are ordered taps, then channels: so must the kernels be
        W = ov.transpose(W, _ov_ints(0, 1, 3, 4, 2))
    kernel_shape = (out_channels, kh, kw, group_channels) if dense else (out_channels, group_channels, kh, kw)
    kernels = ov.matmul(A, ov.reshape(W, _ov_ints(bank, -1), False), False, False)
    if not _constant_ones(S):
        taps = ov.reshape(S, _ov_ints(*((-1, 1, kh, kw, 1) if dense else (-1, 1, 1, kh, kw))), False)
        kernels = ov.multiply(ov.reshape(kernels, _ov_ints(-1, *kernel_shape), False), taps)
    if quantized:  # per output channel: [N, M, rest] against scales [1, M, 1]
        per_channel = ov.reshape(kernels, _ov_ints(-1, out_channels, int(np.prod(kernel_shape[1:]))), False)
        kernels = _fake_quantize(per_channel, w_scale, w_zero, -128, 127, (1, out_channels, 1))
    biases = ov.reshape(ov.matmul(A, B, False, False), _ov_ints(-1, out_channels, 1, 1), False)
    top, left, bottom, right = node.get_attribute("pads")
    geometry = (list(node.get_attribute("strides")), [top, left], [bottom, right],
                list(node.get_attribute("dilations")))
    convolve = _patches_matmul if dense else _per_sample_group_convolution
    y = convolve(X, kernels, kernel_shape, group, geometry)
    if quantized:
        y = _fake_quantize(y, y_scale, y_zero, 0, 255)
    return ov.add(y, biases).outputs()


def _ov_ints(*values: int):
    from openvino import opset13 as ov

    return ov.constant(np.array(values, np.int64))


def _patches_matmul(X, kernels, kernel_shape, _group, geometry):
    """[N, M, T*C] @ patches [N, T*C, H'*W'] (ExtractImagePatches, explicit pads by a Pad), seen as [N, M, H', W']."""
    from openvino import opset13 as ov

    out_channels, kh, kw, channels = kernel_shape
    strides, pads_begin, pads_end, dilations = geometry
    if any(pads_begin + pads_end):
        X = ov.pad(X, _ov_ints(0, 0, *pads_begin), _ov_ints(0, 0, *pads_end), "constant",
                   ov.constant(np.zeros((), X.get_element_type().to_dtype())))
    pointwise = (kh, kw) == (1, 1) and list(strides) == [1, 1]
    # [N, T*C, H', W']; a pointwise layer's patches are X itself (no copy)
    patches = X if pointwise else ov.extract_image_patches(X, [kh, kw], strides, dilations, "valid")
    out_size = ov.strided_slice(ov.shape_of(patches), _ov_ints(2), _ov_ints(4), _ov_ints(1), [0], [0])
    y = ov.matmul(ov.reshape(kernels, _ov_ints(-1, out_channels, kh * kw * channels), False),
                  ov.reshape(patches, _ov_ints(0, kh * kw * channels, -1), True), False, False)
    return ov.reshape(y, ov.concat([_ov_ints(-1, out_channels), out_size], 0), False)


def _per_sample_group_convolution(X, kernels, kernel_shape, group, geometry):
    """A TensorIterator over the batch: one GroupConvolution per sample with its own kernel."""
    from openvino import Model, PartialShape
    from openvino import opset13 as ov

    out_channels, group_channels, kh, kw = kernel_shape
    sample = ov.parameter(PartialShape([1, *list(X.get_partial_shape())[1:]]), X.get_element_type())
    kernel = ov.parameter(PartialShape([1, out_channels * group_channels * kh * kw]), X.get_element_type())
    filters = ov.reshape(kernel, _ov_ints(group, out_channels // group, group_channels, kh, kw), False)
    y = ov.group_convolution(sample, filters, *geometry)
    loop = ov.tensor_iterator()
    loop.set_body(Model([y], [sample, kernel]))
    flat_kernels = ov.reshape(kernels, _ov_ints(-1, out_channels * group_channels * kh * kw), False)
    for parameter, value in ((sample, X), (kernel, flat_kernels.output(0))):
        loop.set_sliced_input(parameter, value, 0, 1, 1, -1, 0)  # start 0, stride 1, part 1, to the end, axis 0
    return loop.get_concatenated_slices(y.output(0), 0, 1, 1, -1, 0)


def _constant_ones(output) -> bool:
    """Whether an OpenVINO node output is a constant (a folded initializer, e.g. the neutral tap attention) of ones."""
    producer = output.get_node()
    return producer.get_type_name() == "Constant" and bool(np.all(producer.get_data() == 1))
