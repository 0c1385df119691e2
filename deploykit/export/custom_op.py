"""Export a torch custom op as ONE ``deploykit::<Name>`` ONNX node that carries its own standard-op body.

Why this shape: a dynamic op with no standard ONNX equivalent must stay one node so a fast kernel (a TensorRT
plugin, an ORT custom op) can replace it, yet the file must still run in any runtime that has no such kernel.
ONNX model-local functions give both: runtimes without a kernel inline the function body (standard ops only);
onnxruntime prefers a registered custom-op kernel; TensorRT >= 10.7 picks a registered plugin, and from 10.15 on
only when the node carries a ``plugin_namespace`` attribute, which every node we emit has.

How (torch 2.13, dynamo exporter; see ../shared/notes/ecosystem.md sec. 6 for the verified facts):

1. the op is a ``torch.library.custom_op`` so ``torch.export`` keeps it as one node;
2. a ``custom_translation_table`` entry maps it to the custom-domain node. onnxscript only emits a node whose
   ``onnx.defs`` schema exists, so the schema (derived from the body's signature) is registered for the duration
   of the export and removed afterwards, leaving no global state behind;
3. the body, an ``@onnxscript.script(DEPLOYKIT_OPSET)`` function, is appended to ``model.functions`` with its
   default-domain opset set to the model's.

A body and its torch op are tied by argument names: each body input or attribute takes the torch op argument of
the same name.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import onnx
import onnxscript
from onnx.defs import OpSchema

DOMAIN = "deploykit"
DOMAIN_VERSION = 1
PLUGIN_NAMESPACE = "deploykit"
DEPLOYKIT_OPSET = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)

# Attributes every node carries so that TensorRT's parser selects our plugin (ignored by other runtimes).
PLUGIN_ATTRIBUTES = ("plugin_namespace", "plugin_version")
# torch schema argument types that become ONNX attributes (tensors become inputs).
_ATTRIBUTE_TYPES = {"float": float, "int": int, "bool": bool, "str": str, "List[int]": Sequence[int],
                    "List[float]": Sequence[float]}
_FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]


@dataclass(frozen=True)
class CustomOp:
    """One torch custom op and the ONNX node + function body it exports as.

    Attributes:
        torch_op: the op overload, e.g. ``torch.ops.deploykit.dynamic_conv2d.default``.
        body: an ``@onnxscript.script(DEPLOYKIT_OPSET)`` function; its name is the node's op_type, its inputs and
            attributes are named like the torch op's arguments.
        plugin_version: the ``plugin_version`` the TensorRT plugin creator registers.
    """

    torch_op: object
    body: onnxscript.OnnxFunction
    plugin_version: str = "1"

    @property
    def op_type(self) -> str:
        return self.body.name

    def schema(self) -> OpSchema:
        """The ``onnx.defs`` schema the exporter needs to emit the node (inputs, outputs, attributes)."""
        signature = self.body.op_signature
        inputs = [OpSchema.FormalParameter(p.name, "T", param_option=_option(p.required))
                  for p in signature.params if not p.is_attribute()]
        outputs = [OpSchema.FormalParameter(name, "T") for name in self.body.to_function_proto().output]
        attributes = [OpSchema.Attribute(p.name, OpSchema.AttrType[p.type.name], "") for p in signature.params
                      if p.is_attribute()]
        attributes += [OpSchema.Attribute(name, OpSchema.AttrType.STRING, "", required=False)
                       for name in PLUGIN_ATTRIBUTES]
        return OpSchema(self.op_type, DOMAIN, DOMAIN_VERSION, inputs=inputs, outputs=outputs,
                        type_constraints=[("T", _FLOAT_TYPES, "floating-point tensors")], attributes=attributes)

    def translation(self) -> Callable:
        """The ``custom_translation_table`` entry for the torch op.

        The exporter reads a translation's Python signature to tell ONNX inputs (unannotated) from attributes
        (annotated with a Python type), so the function gets the torch op's argument names and types.
        """
        parameters, annotations = [], {}
        for argument in self.torch_op._schema.arguments:
            default = argument.default_value if argument.has_default_value() else inspect.Parameter.empty
            parameters.append(inspect.Parameter(argument.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                default=default))
            if (python_type := _ATTRIBUTE_TYPES.get(str(argument.type))) is not None:
                annotations[argument.name] = python_type

        def translate(*args, **kwargs):
            return self._emit(args, kwargs)

        translate.__signature__ = inspect.Signature(parameters)
        translate.__annotations__ = annotations
        translate.__name__ = translate.__qualname__ = f"translate_{self.op_type}"
        return translate

    def _emit(self, args: tuple, kwargs: dict):
        """Emit the single custom-domain node for one torch op call."""
        bound = _bind(self.torch_op, args, kwargs)
        inputs, attributes = [], {}
        for param in self.body.op_signature.params:
            value = bound[param.name]
            if param.is_attribute():
                attributes[param.name] = list(value) if isinstance(value, (tuple, list)) else value
            else:
                inputs.append(value)
        node = getattr(DEPLOYKIT_OPSET, self.op_type)
        return node(*inputs, **attributes, plugin_namespace=PLUGIN_NAMESPACE, plugin_version=self.plugin_version)

    def function_proto(self, opset: int) -> onnx.FunctionProto:
        """The body as a model-local function whose standard ops use the model's opset version."""
        function = self.body.to_function_proto()
        for entry in function.opset_import:
            if entry.domain in ("", "ai.onnx"):
                entry.version = opset
        return function


@contextlib.contextmanager
def registered_schemas(ops: Iterable[CustomOp]) -> Iterator[None]:
    """Register the ops' ONNX schemas for the duration of an export; remove the ones registered here after."""
    added = []
    try:
        for op in ops:
            if not onnx.defs.has(op.op_type, DOMAIN):
                onnx.defs.register_schema(op.schema())
                added.append(op.op_type)
        yield
    finally:
        for op_type in added:
            onnx.defs.deregister_schema(op_type, DOMAIN_VERSION, DOMAIN)


def attach_functions(model: onnx.ModelProto, ops: Sequence[CustomOp], opset: int) -> onnx.ModelProto:
    """Give every ``deploykit::`` node in `model` its function body, once per op type, in place."""
    by_type = {op.op_type: op for op in ops}
    present = {(f.domain, f.name) for f in model.functions}
    used = sorted({n.op_type for n in _all_nodes(model.graph) if n.domain == DOMAIN})
    unknown = [t for t in used if t not in by_type]
    if unknown:
        raise ValueError(f"no function body is known for {DOMAIN}::{', '.join(unknown)}")
    for op_type in used:
        if (DOMAIN, op_type) not in present:
            model.functions.append(by_type[op_type].function_proto(opset))
    if used and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    return model


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for subgraph in ([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)):
                yield from _all_nodes(subgraph)


def _bind(torch_op, args: tuple, kwargs: dict) -> dict:
    """Map a torch op call's positional and keyword arguments to their schema names (defaults filled)."""
    names = [a.name for a in torch_op._schema.arguments]
    defaults = {a.name: a.default_value for a in torch_op._schema.arguments if a.has_default_value()}
    bound = dict(defaults)
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


def _option(required: bool) -> OpSchema.FormalParameterOption:
    return OpSchema.FormalParameterOption.Single if required else OpSchema.FormalParameterOption.Optional


__all__ = ["CustomOp", "DEPLOYKIT_OPSET", "DOMAIN", "PLUGIN_NAMESPACE", "attach_functions", "registered_schemas"]
