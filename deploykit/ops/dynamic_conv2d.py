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

Lowerings, measured on the development machine (ORT 1.31, 2 threads, Intel Xeon with AVX-512, ms and ratio to a
plain static conv of the same shape; ``bench/bench_dynamic_conv.py`` prints the current numbers):

    case                         batch | static | W as input | Scan (body)  | fold (static) | expert (K convs)
    128->128 3x3 28x28 K=4          1  | 0.71   | 1.46x      | 1.68x        | 1.62x         | ~4x
                                    8  | 5.73   | 1.42x      | 1.62x        | 1.52x         | ~4x
    256->64  1x1 28x28              1  | 0.14   |            | 1.03x        | 1.44x         | (MatMul 0.94x)
                                    8  | 0.99   |            | 1.21x        | 1.09x         | (MatMul 1.07x)
    depthwise 256 3x3 14x14         1  | 0.034  |            | 5.3x         | 3.4x          | 4.9x
                                    8  | 0.18   |            | 5.8x         | 5.0x          | 8.8x

"W as input" (a plain Conv whose weight is a graph input) is the floor for any runtime-computed kernel: ORT only
pre-packs constant weights. The node's body therefore aggregates the kernels with one MatMul and runs a ``Scan``
over the batch with a Conv inside: exact for any batch, within ~15% of that floor for dense convs. With a static
batch the standard lowering folds the batch into the conv groups (one Conv, group = group * N), the fastest
standard form; a dynamic batch cannot fold because ONNX's ``group`` is a static attribute. Per-sample depthwise
convs are slow in every standard form (ORT's fast depthwise path needs constant weights): that is what the GPU
plugin is for. A 1x1 MatMul form is only ~7% faster than Scan and would need a second body, so it is not used.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper
from onnx.reference.op_run import OpRun
from onnxscript import opset20 as op

from deploykit.export.custom_op import DOMAIN, CustomOp
from deploykit.ops import reference as ref

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


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5])
    ctx.attributes = inputs[5:]


def _backward(ctx, grad):
    """Recompute the eager graph and differentiate it: exact gradients for every tensor input."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in ctx.saved_tensors]
        out = _forward(*leaves, *ctx.attributes)
        grads = torch.autograd.grad(out, leaves, grad)
    return (*grads, None, None, None, None)


_dynamic_conv2d.register_autograd(_backward, setup_context=_setup_context)


def dynamic_conv2d(x: torch.Tensor, weight: torch.Tensor, attention: torch.Tensor, bias: torch.Tensor,
                   spatial: torch.Tensor, stride: Sequence[int], pads: Sequence[int], dilation: Sequence[int],
                   groups: int) -> torch.Tensor:
    """Per-sample kernel aggregation + convolution (see the module docstring for shapes). Differentiable; exports
    as one ``deploykit::DynamicConv2d`` node (or folded standard ops for a static batch)."""
    return _dynamic_conv2d(x, weight, attention, bias, spatial, list(stride), list(pads), list(dilation), groups)


def output_size(size: Sequence[int], kernel: Sequence[int], strides: Sequence[int], pads: Sequence[int],
                dilations: Sequence[int]) -> tuple[int, int]:
    return tuple((size[i] + pads[i] + pads[i + 2] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1
                 for i in range(2))


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

def _attribute_ref(name: str, kind: int) -> onnx.AttributeProto:
    attribute = helper.make_attribute_ref(name, kind)
    attribute.ref_attr_name = name
    return attribute


def function_body(opset: int) -> onnx.FunctionProto:
    """The node's standard-op body: one MatMul aggregates the kernels, a Scan convolves sample by sample."""
    conv = helper.make_node("Conv", ["x1", "w_n"], ["y1"])
    conv.attribute.extend(_attribute_ref(name, onnx.AttributeProto.INTS) for name in ("strides", "pads", "dilations"))
    conv.attribute.append(_attribute_ref("group", onnx.AttributeProto.INT))
    per_sample = helper.make_graph(
        [helper.make_node("Constant", [], ["axis0"], value_ints=[0]),
         helper.make_node("Unsqueeze", ["x_n", "axis0"], ["x1"]), conv,
         helper.make_node("Squeeze", ["y1", "axis0"], ["y_n"])],
        "per_sample_conv", [helper.make_value_info("x_n", onnx.TypeProto()), helper.make_value_info("w_n", onnx.TypeProto())],
        [helper.make_value_info("y_n", onnx.TypeProto())])
    nodes = [
        helper.make_node("Constant", [], ["minus_one"], value_ints=[-1]),
        helper.make_node("Constant", [], ["tap_axes"], value_ints=[1, 2]),
        helper.make_node("Constant", [], ["spatial_axes"], value_ints=[2, 3]),
        helper.make_node("Shape", ["W"], ["bank_size"], end=1),
        helper.make_node("Shape", ["W"], ["kernel_shape"], start=1),
        helper.make_node("Concat", ["bank_size", "minus_one"], ["flat_shape"], axis=0),
        helper.make_node("Concat", ["minus_one", "kernel_shape"], ["per_sample_shape"], axis=0),
        helper.make_node("Reshape", ["W", "flat_shape"], ["bank"]),
        helper.make_node("MatMul", ["A", "bank"], ["mixed"]),
        helper.make_node("Reshape", ["mixed", "per_sample_shape"], ["kernels"]),
        helper.make_node("Unsqueeze", ["S", "tap_axes"], ["taps"]),
        helper.make_node("Mul", ["kernels", "taps"], ["attended"]),
        helper.make_node("Scan", ["X", "attended"], ["convolved"], body=per_sample, num_scan_inputs=2),
        helper.make_node("MatMul", ["A", "B"], ["bias"]),
        helper.make_node("Unsqueeze", ["bias", "spatial_axes"], ["bias4"]),
        helper.make_node("Add", ["convolved", "bias4"], ["Y"]),
    ]
    return helper.make_function(DOMAIN, OP_TYPE, list(INPUTS), ["Y"], nodes, [helper.make_opsetid("", opset)],
                                attributes=list(ATTRIBUTES))


def fold_lowering(X, W, A, B, S, strides, pads, dilations, group):
    """Standard ops for a static batch: per-sample kernels as conv groups (group * N). None for a dynamic batch."""
    batch = X.shape[0] if X.shape is not None else None
    if not isinstance(batch, int):
        return None
    bank_size, out_channels = W.shape[0], W.shape[1]
    kernels = op.Reshape(op.MatMul(A, op.Reshape(W, op.Constant(value_ints=[bank_size, -1]))),
                         op.Constant(value_ints=[-1, *W.shape[1:]]))
    kernels = op.Mul(kernels, op.Unsqueeze(S, op.Constant(value_ints=[1, 2])))
    folded = op.Reshape(X, op.Constant(value_ints=[1, -1, *X.shape[2:]]))
    flat_kernels = op.Reshape(kernels, op.Constant(value_ints=[-1, *W.shape[2:]]))
    y = op.Conv(folded, flat_kernels, op.Reshape(op.MatMul(A, B), op.Constant(value_ints=[-1])),
                strides=list(strides), pads=list(pads), dilations=list(dilations), group=group * batch)
    height, width = output_size(X.shape[2:], W.shape[3:], strides, pads, dilations)
    return op.Reshape(y, op.Constant(value_ints=[batch, out_channels, height, width]))


DYNAMIC_CONV2D = CustomOp(
    torch_op=torch.ops.deploykit.dynamic_conv2d.default, op_type=OP_TYPE, inputs=INPUTS, outputs=("Y",),
    attributes=ATTRIBUTES, body=function_body, standard_lowering=fold_lowering, reference=DynamicConv2dReference)
