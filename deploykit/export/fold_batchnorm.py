"""Fold inference BatchNorms into the convolution before them, where no runtime can.

ONNX Runtime and TensorRT fuse ``Conv -> BatchNormalization`` themselves, but not a BatchNorm behind a
``deploykit::DynamicConv2d`` or ``deploykit::DeformConv2d`` node (a custom op: its body is inlined, or a plugin runs
it) nor one behind ODConv's filter-attention ``Mul``. For those, with BN(y) = s * y + t per output channel m (s = gamma / sqrt(var + eps),
t = beta - mean * s), this pass rewrites the graph exactly:

- ``DynamicConv2d -> BN``, Y[n] = conv(X[n], S[n] * sum_k A[n,k] W[k]) + sum_k A[n,k] B[k]:
  s[m] scales output channel m of every kernel and bias of the bank, so W' = s * W, B' = s * B give s * Y. The
  shift t enters the bias bank only if every row of A sums to 1 (sum_k A[n,k] (B'[k] + t) = s * bias + t):
  true for a softmax over the kernels (DyConv, ODConv with K > 1) and for ODConv's constant ones (K = 1), not for
  CondConv's sigmoid routing, whose BN becomes ``Add(t)``.
- ``DeformConv2d -> BN``: its W [M, C/g, kH, kW] and B [M] are a Conv's, so W' = s * W, B' = s * B + t.
- ``DynamicConv2d or Conv -> Mul(f) -> BN`` (ODConv's filter attention f): s * (f * y) + t = f * (s * y) + t, so s
  folds into the conv's weights and bias as above, but t is not multiplied by f and cannot move into the bias;
  the BN becomes ``Add(t)``. (A plain ``Conv -> BN`` is left alone: the runtimes fuse it, and its conv keeps
  computing what the PyTorch conv computes, which `deploykit.localize` relies on.)

Rewritten nodes keep their names and ``metadata_props``; each conv and Mul whose output is now scaled gets
`FOLDED_KEY` = the folded BatchNorm's module path, since it no longer computes what its PyTorch module computes.
An ``Add(t)`` that replaces a BN takes the BN's name, metadata and output. Weights are combined in float64.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from deploykit.export.custom_op import DOMAIN
from deploykit.ops.deform_conv2d import OP_TYPE as DEFORM_CONV2D
from deploykit.ops.dynamic_conv2d import OP_TYPE as DYNAMIC_CONV2D

FOLDED_KEY = "deploykit.folded_batchnorm"
_NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"


@dataclass
class _Fold:
    """One BatchNorm to fold: `conv` [-> `mul`] -> `norm`."""

    norm: onnx.NodeProto
    conv: onnx.NodeProto
    mul: onnx.NodeProto | None
    scale: np.ndarray  # s, float64 [M]
    shift: np.ndarray  # t, float64 [M]
    shift_into_bias: bool  # t moves into the conv's bias (else an Add(t) replaces the BN)


class _Index:
    """Producers, consumers and constants of a graph's top level."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.initializers = {t.name: t for t in graph.initializer}
        self.producer = {name: node for node in graph.node for name in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for name in node.input:
                self.consumers[name].append(node)
        # Graph outputs and names that subgraphs read from the outer scope must keep their values.
        self.pinned = {o.name for o in graph.output} | set(_subgraph_reads(graph))
        self.ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in (*graph.value_info, *graph.input)
                      if v.type.tensor_type.HasField("shape")}

    def array(self, name: str) -> np.ndarray | None:
        tensor = self.initializers.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def only_feeds(self, name: str, node: onnx.NodeProto) -> bool:
        """`name` is read by `node` alone (once), so rewriting its value changes nothing else."""
        return name not in self.pinned and [id(c) for c in self.consumers[name]] == [id(node)] and \
            list(node.input).count(name) == 1

    def rank(self, name: str) -> int | None:
        if name in self.initializers:
            return len(self.initializers[name].dims)
        return self.ranks.get(name)


def fold_batchnorm(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold every BatchNorm that follows a DynamicConv2d (directly or through a Mul), or a Conv through a Mul, in
    place (see the module docstring for the algebra). Returns `model`."""
    index = _Index(model)
    folds = [fold for node in model.graph.node if (fold := _match(node, index)) is not None]
    parameters = {name for fold in folds for name in fold.norm.input[1:]}
    for fold in folds:
        _apply(model, index, fold)
    _drop_unused_initializers(model, parameters)
    return model


def folded_count(model: onnx.ModelProto) -> int:
    """How many BatchNorms `fold_batchnorm` folded into convs of `model`."""
    return sum(any(p.key == FOLDED_KEY for p in n.metadata_props) for n in model.graph.node
               if n.op_type in ("Conv", DYNAMIC_CONV2D, DEFORM_CONV2D))


def _match(norm: onnx.NodeProto, index: _Index) -> _Fold | None:
    """The fold `norm` allows, or None."""
    if norm.op_type != "BatchNormalization" or norm.domain not in ("", "ai.onnx") or len(norm.input) != 5 or \
            len(norm.output) != 1 or any(a.name == "training_mode" and a.i for a in norm.attribute):
        return None
    params = [index.array(name) for name in norm.input[1:]]
    if any(p is None or p.ndim != 1 for p in params) or not index.only_feeds(norm.input[0], norm):
        return None
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    epsilon = next((a.f for a in norm.attribute if a.name == "epsilon"), 1e-5)
    scale = gamma / np.sqrt(var + epsilon)

    conv, mul = _conv(norm.input[0], index), None
    if conv is None:
        mul = index.producer.get(norm.input[0])
        if mul is None or mul.op_type != "Mul" or mul.domain not in ("", "ai.onnx"):
            return None
        convolved = [name for name in mul.input if _conv(name, index) is not None]
        others = [name for name in mul.input if name not in convolved]
        # s commutes with f if f broadcasts into the conv output's [N, M, H, W] without adding axes in front
        if len(convolved) != 1 or len(others) != 1 or (index.rank(others[0]) or 5) > 4 or \
                not index.only_feeds(convolved[0], mul):
            return None
        conv = _conv(convolved[0], index)
    elif conv.op_type == "Conv":
        return None  # ORT and TensorRT fuse it themselves
    if _out_channels(conv, index) != len(scale):
        return None
    shift_into_bias = mul is None and (conv.op_type == DEFORM_CONV2D or
                                       _rows_sum_to_one(conv.input[2], _kernel_count(conv, index), index))
    return _Fold(norm, conv, mul, scale, beta - mean * scale, shift_into_bias)


def _conv(name: str, index: _Index) -> onnx.NodeProto | None:
    """The node producing `name` if it is a Conv, DynamicConv2d or DeformConv2d with constant weights and bias."""
    node = index.producer.get(name)
    if node is None or len(node.output) != 1:
        return None
    if node.op_type == "Conv" and node.domain in ("", "ai.onnx"):
        return node if all(n in index.initializers for n in node.input[1:] if n) else None
    if node.op_type in (DYNAMIC_CONV2D, DEFORM_CONV2D) and node.domain == DOMAIN:
        return node if node.input[1] in index.initializers and node.input[3] in index.initializers else None
    return None


def _kernel_count(conv: onnx.NodeProto, index: _Index) -> int:
    return index.initializers[conv.input[1]].dims[0]


def _out_channels(conv: onnx.NodeProto, index: _Index) -> int:
    """M: Conv's and DeformConv2d's W is [M, C/g, kH, kW], DynamicConv2d's [K, M, C/g, kH, kW]."""
    dims = index.initializers[conv.input[1]].dims
    return dims[1] if conv.op_type == DYNAMIC_CONV2D else dims[0]


def _rows_sum_to_one(name: str, kernels: int, index: _Index) -> bool:
    """Whether every row of DynamicConv2d's kernel weights A [N, K] provably sums to 1: a softmax over K, or a
    constant (possibly expanded over the batch) whose rows sum to exactly 1."""
    node = index.producer.get(name)
    if node is not None and node.op_type == "Softmax":
        return all(a.i in (1, -1) for a in node.attribute if a.name == "axis")
    if node is not None and node.op_type == "Expand":
        name = node.input[0]
    constant = index.array(name)
    if constant is None:
        return False
    rows = constant.reshape(-1, constant.shape[-1]) if constant.ndim else constant.reshape(1, 1)
    if rows.shape[1] == 1:  # broadcast over the K axis (e.g. ODConv's ones with K = 1)
        rows = np.repeat(rows, kernels, axis=1)
    return rows.shape[1] == kernels and bool(np.all(rows.astype(np.float64).sum(axis=1) == 1.0))


def _apply(model: onnx.ModelProto, index: _Index, fold: _Fold) -> None:
    conv, norm = fold.conv, fold.norm
    if conv.op_type != DYNAMIC_CONV2D:  # Conv, DeformConv2d: W [M, C/g, kH, kW], bias [M] (DeformConv2d's always)
        weight_axes, bias_shape = (slice(None), None, None, None), (-1,)
        bias = 3 if conv.op_type == DEFORM_CONV2D else 2 if len(conv.input) > 2 and conv.input[2] else None
    else:  # W [K, M, C/g, kH, kW], B [K, M]
        weight_axes, bias_shape, bias = (None, slice(None), None, None, None), (1, -1), 3
    _replace_constant(model, index, conv, 1, lambda w: w * fold.scale[weight_axes])
    if bias is not None:
        into_bias = fold.shift if fold.shift_into_bias else np.zeros_like(fold.shift)
        _replace_constant(model, index, conv, bias,
                          lambda b: b * fold.scale.reshape(bias_shape) + into_bias.reshape(bias_shape))

    module = next((p.value for p in norm.metadata_props if p.key == _NAME_SCOPES_KEY), norm.name)
    for node in (conv, fold.mul):
        if node is not None:
            node.metadata_props.add(key=FOLDED_KEY, value=module)
    last = fold.mul or conv
    if fold.shift_into_bias:  # the BN disappears: the node before it now produces the BN's output
        _drop_value_info(model, last.output[0])
        last.output[0] = norm.output[0]
        model.graph.node.remove(norm)
        return
    dtype = numpy_helper.to_array(index.initializers[norm.input[1]]).dtype
    shift = numpy_helper.from_array(fold.shift.astype(dtype).reshape(-1, 1, 1), _unique(index, f"{norm.name}_shift"))
    model.graph.initializer.append(shift)
    index.initializers[shift.name] = shift
    norm.op_type = "Add"
    del norm.attribute[:]
    del norm.input[2:]
    norm.input[1] = shift.name


def _replace_constant(model: onnx.ModelProto, index: _Index, node: onnx.NodeProto, position: int, change) -> None:
    """Give `node` input `position` (an initializer) the value change(old), computed in float64; a new initializer
    if others read the old one."""
    name = node.input[position]
    old = index.initializers[name]
    value = change(numpy_helper.to_array(old).astype(np.float64)).astype(numpy_helper.to_array(old).dtype)
    if index.only_feeds(name, node):
        old.CopyFrom(numpy_helper.from_array(value, name))
        return
    new = numpy_helper.from_array(value, _unique(index, f"{name}_bn_folded"))
    model.graph.initializer.append(new)
    index.initializers[new.name] = new
    node.input[position] = new.name
    index.consumers[name] = [c for c in index.consumers[name] if c is not node]
    index.consumers[new.name].append(node)


def _unique(index: _Index, name: str) -> str:
    taken = set(index.initializers) | set(index.producer)
    candidate, number = name, 1
    while candidate in taken:
        candidate, number = f"{name}_{number}", number + 1
    return candidate


def _drop_value_info(model: onnx.ModelProto, name: str) -> None:
    for info in [v for v in model.graph.value_info if v.name == name]:
        model.graph.value_info.remove(info)


def _drop_unused_initializers(model: onnx.ModelProto, candidates: set[str]) -> None:
    graph = model.graph
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output} | \
        set(_subgraph_reads(graph))
    for tensor in [t for t in graph.initializer if t.name in candidates and t.name not in used]:
        graph.initializer.remove(tensor)


def _subgraph_reads(graph: onnx.GraphProto) -> Iterator[str]:
    """Every name read by a node inside a subgraph (If/Loop/Scan bodies may read outer-scope values)."""
    for node in graph.node:
        for attribute in node.attribute:
            for subgraph in ([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs):
                for inner in subgraph.node:
                    yield from inner.input
                yield from _subgraph_reads(subgraph)
