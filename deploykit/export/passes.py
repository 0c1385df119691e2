"""Graph passes run on every exported model, in this order (see `run_passes`):

1. `fold_constants`: evaluate every input-independent subgraph once and store its result as an initializer
   (onnx-graphsurgeon; generic, not per-op: e.g. TVConv's generated weights become initializers). Nodes that
   depend on a graph input are never touched.
   `check_folded` then asserts that no input-independent node is left: a deployed graph must not recompute
   weights on every run.
   Before folding, every ``Shape`` with ``start``/``end`` becomes ``Shape`` + ``Slice``: onnx-graphsurgeon 0.6.1
   folds such a node as if it had neither (a static [2, 18, 12, 9] tensor's ``Shape(start=2)`` became
   [2, 18, 12, 9], and ``Gather(Shape(start=2), 1)`` gave 18 where 9 was right).
2. `fold_batchnorm` (`deploykit/export/fold_batchnorm.py`): BatchNorms behind a ``deploykit::DynamicConv2d`` or
   ``deploykit::DeformConv2d`` node, or behind ODConv's filter-attention Mul, fold into the conv's kernel and bias
   banks (runtimes fuse only a BatchNorm directly behind a standard Conv); exact, see that module for which shifts
   can move into the bias.
3. `infer_shapes`: strict ONNX shape inference; ``deploykit::`` nodes are inferred through their function bodies.
4. `check_custom_nodes`: every node outside the standard domains must carry a function body.
5. `check`: ``onnx.checker.check_model(full_check=True)`` and an IR version onnxruntime accepts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper
from onnx_graphsurgeon.logger import G_LOGGER as GS_LOGGER

from deploykit.errors import DeployError
from deploykit.export.fold_batchnorm import fold_batchnorm

# onnxruntime 1.31 loads IR <= 13; the exporter writes 10 for opset 20. Newer IR is lowered to this.
MAX_IR_VERSION = 10
STANDARD_DOMAINS = ("", "ai.onnx")
_FOLD_ROUNDS = 4


@dataclass
class GraphStats:
    nodes: int
    initializers: int
    parameters: int  # elements in initializers

    @classmethod
    def of(cls, model: onnx.ModelProto) -> "GraphStats":
        inits = model.graph.initializer
        return cls(len(model.graph.node), len(inits), int(sum(np.prod(t.dims, dtype=np.int64) for t in inits)))


@dataclass
class PassReport:
    """What the passes changed, for the report."""

    before: GraphStats
    after: GraphStats
    folded_nodes: int
    parameter_change: int  # initializer elements after minus before: negative when folding removed weights, positive
    # when it materialised constants larger than the subgraphs they replace (e.g. the deformable convs' sampling grids)

    def as_dict(self) -> dict:
        return asdict(self)


def run_passes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, PassReport]:
    """Run every pass on `model` and return the result with a summary of what changed."""
    before = GraphStats.of(model)
    model = fold_constants(model)
    check_folded(model)
    model = fold_batchnorm(model)
    model = infer_shapes(model)
    check_custom_nodes(model)
    check(model)
    after = GraphStats.of(model)
    return model, PassReport(before, after, folded_nodes=before.nodes - after.nodes,
                             parameter_change=after.parameters - before.parameters)


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace input-independent subgraphs by their values, then drop dead nodes and sort topologically."""
    saved, GS_LOGGER.severity = GS_LOGGER.severity, GS_LOGGER.ERROR  # its size warnings would go to stdout
    try:
        graph = gs.import_onnx(_shape_ranges_as_slices(model))
        # "basic" partitioning folds what it can even if one node in a foldable region fails to evaluate. One round
        # can leave a node whose input only became constant in that round (a ConstantOfShape of a folded shape, seen
        # in the deformable-conv fallback), so fold until nothing changes.
        for _ in range(_FOLD_ROUNDS):
            nodes = len(graph.nodes)
            graph.fold_constants(partitioning="basic", error_ok=True).cleanup(remove_unused_graph_inputs=False)
            if len(graph.nodes) == nodes:
                break
        graph.toposort()
        folded = gs.export_onnx(graph, do_type_check=True)
    finally:
        GS_LOGGER.severity = saved
    _keep_model_fields(model, folded)
    _keep_node_metadata(model, folded)
    return folded


def _shape_ranges_as_slices(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model`, or a copy in which each main-graph ``Shape`` node with ``start`` or ``end`` is a plain ``Shape``
    followed by the ``Slice`` it equals (the same output name), which onnx-graphsurgeon folds correctly."""
    def ranged(node: onnx.NodeProto) -> bool:
        return node.op_type == "Shape" and not node.domain and any(a.name in ("start", "end") for a in node.attribute)

    if not any(ranged(node) for node in model.graph.node):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    nodes = list(copy.graph.node)
    del copy.graph.node[:]
    for node in nodes:
        if not ranged(node):
            copy.graph.node.append(node)
            continue
        bounds = {a.name: a.i for a in node.attribute}
        whole, starts, ends = (f"{node.output[0]}_{suffix}" for suffix in ("whole", "start", "end"))
        copy.graph.initializer.extend([onnx.numpy_helper.from_array(np.array([bounds.get("start", 0)]), starts),
                                       onnx.numpy_helper.from_array(np.array([bounds.get("end", 2 ** 62)]), ends)])
        shape = helper.make_node("Shape", list(node.input), [whole], name=f"{node.name or node.output[0]}_whole")
        shape.metadata_props.extend(node.metadata_props)
        node.ClearField("attribute")
        node.op_type = "Slice"
        node.input[:] = [whole, starts, ends]
        copy.graph.node.extend([shape, node])
    return copy


def _keep_node_metadata(source: onnx.ModelProto, target: onnx.ModelProto) -> None:
    """graphsurgeon drops nodes' ``metadata_props``; put them back by node name. They hold the exporter's name
    scopes (``pkg.torch.onnx.name_scopes``: the PyTorch module each node came from), which `deploykit.localize`
    needs to name the module where a deployed model first diverges."""
    metadata = {node.name: node.metadata_props for node in source.graph.node if node.name and node.metadata_props}
    for node in target.graph.node:
        if node.name in metadata and not node.metadata_props:
            node.metadata_props.extend(metadata[node.name])


def input_independent_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Top-level nodes none of whose inputs derives from a graph input (the graph must be topologically sorted)."""
    dependent = {i.name for i in model.graph.input}
    independent = []
    for node in model.graph.node:
        if any(name in dependent for name in node.input if name):
            dependent.update(node.output)
        else:
            independent.append(node)
    return independent


def check_folded(model: onnx.ModelProto) -> None:
    """Folding must leave no input-independent node (e.g. a weight-generating network recomputed on every run)."""
    left = input_independent_nodes(model)
    if left:
        names = ", ".join(f"{n.op_type} {n.name!r}" for n in left[:3])
        raise DeployError(f"Constant folding left {len(left)} input-independent node(s) ({names}): they could not "
                          f"be evaluated at export time; run with -v to see the exporter's diagnostics.")


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Strict shape inference, so every value (custom nodes included) has a known type and shape."""
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except onnx.shape_inference.InferenceError as err:
        raise DeployError(f"ONNX shape inference failed on the exported graph: {err}.") from err


def check_custom_nodes(model: onnx.ModelProto) -> None:
    """Every non-standard node must be a call of a model-local function, so the file runs anywhere."""
    functions = {(f.domain, f.name) for f in model.functions}
    bare = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node
                   if n.domain not in STANDARD_DOMAINS and (n.domain, n.op_type) not in functions})
    if bare:
        raise DeployError(f"The exported graph has custom nodes without a function body ({', '.join(bare)}); "
                          f"other runtimes could not run it.")


def check(model: onnx.ModelProto) -> None:
    """Validate the model as onnxruntime and TensorRT will see it."""
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise DeployError(f"The exported ONNX model is invalid: {err}.") from err


def _keep_model_fields(source: onnx.ModelProto, target: onnx.ModelProto) -> None:
    """graphsurgeon rebuilds the ModelProto; carry over what it does not know about."""
    target.ir_version = source.ir_version
    target.producer_name, target.producer_version = source.producer_name, source.producer_version
    del target.opset_import[:]
    target.opset_import.extend(source.opset_import)
    del target.metadata_props[:]
    target.metadata_props.extend(source.metadata_props)
