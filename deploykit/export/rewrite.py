"""Replacing one node of a model's main graph by standard ops, in place. The int8 forms are written with it (a
deformable conv's sampled form, a dynamic conv's bank form)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper


class NodeRewrite:
    """Collects the nodes that replace `node` in `model`'s main graph. Constants become initializers and every new
    value and node is named under the node's name, so the replacement reads as one unit in the graph, in the report
    and in profiles."""

    def __init__(self, model: onnx.ModelProto, node: onnx.NodeProto) -> None:
        self.model, self.node = model, node
        self.prefix = node.name or f"{node.op_type}_{node.input[0]}"
        self.nodes: list[onnx.NodeProto] = []

    def constant(self, name: str, array) -> str:
        tensor = onnx.numpy_helper.from_array(np.asarray(array), f"{self.prefix}/{name}")
        self.model.graph.initializer.append(tensor)
        return tensor.name

    def add(self, op_type: str, inputs: list[str], name: str, **attributes) -> str:
        """Append a node named `<node>/<name>` with one output of the same name; return that output."""
        output = f"{self.prefix}/{name}"
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attributes))
        return output

    def finish(self, op_type: str, inputs: list[str], name: str, **attributes) -> list[onnx.NodeProto]:
        """Append the last node, which writes the replaced node's outputs; put the new nodes where that node was,
        each with its metadata (module scope, class), and drop the initializers only it read. Returns the new
        nodes."""
        graph = self.model.graph
        self.nodes.append(helper.make_node(op_type, inputs, list(self.node.output), name=f"{self.prefix}/{name}",
                                           **attributes))
        for new in self.nodes:
            new.metadata_props.extend(self.node.metadata_props)
        position = list(graph.node).index(self.node)
        graph.node.remove(self.node)
        for offset, new in enumerate(self.nodes):
            graph.node.insert(position + offset, new)
        read = {name for other in graph.node for name in other.input}
        for tensor in [t for t in graph.initializer if t.name in set(self.node.input) - read]:
            graph.initializer.remove(tensor)
        return self.nodes
