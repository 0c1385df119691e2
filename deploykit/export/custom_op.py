"""Export a torch custom op as ONE ``deploykit::<Name>`` ONNX node that carries its own standard-op body.

Why this shape: a dynamic op with no standard ONNX equivalent must stay one node so a fast kernel (a TensorRT
plugin, an ORT custom op) can replace it, yet the file must still run in any runtime that has no such kernel.
ONNX model-local functions give both: runtimes without a kernel inline the function body (standard ops only);
onnxruntime prefers a registered custom-op kernel; TensorRT >= 10.7 picks a registered plugin, and from 10.15 on
only when the node carries a ``plugin_namespace`` attribute, which every node we emit has.

How (torch 2.13, dynamo exporter; see ../shared/notes/ecosystem.md sec. 6 for the verified facts):

1. the op is a ``torch.library.custom_op`` so ``torch.export`` keeps it as one node;
2. a ``custom_translation_table`` entry maps it to the custom-domain node. onnxscript only emits a node whose
   ``onnx.defs`` schema exists, so the schema is registered for the duration of the export and removed afterwards,
   leaving no global state behind;
3. the body (a FunctionProto, built for the model's opset) is appended to ``model.functions``.

An op may also offer a *standard lowering*: a translation into plain ONNX ops used instead of the node where it
applies (e.g. only for a static batch). Whether "auto" prefers it to the node is the op's call, by measurement:
DynamicConv2d's folded form is faster than its body, DeformConv2d's body (ONNX ``DeformConv``) is faster than any
decomposition, which is then only the fallback for opsets the body does not exist in. The ONNX inputs and
attributes of the node are the torch op's arguments of the same names, in the order `inputs` lists them.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import onnx
import onnxscript
from onnx.defs import OpSchema

DOMAIN = "deploykit"
DOMAIN_VERSION = 1
PLUGIN_NAMESPACE = "deploykit"
DEPLOYKIT_OPSET = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)

# Attributes every node carries so that TensorRT's parser selects our plugin (ignored by other runtimes).
PLUGIN_ATTRIBUTES = ("plugin_namespace", "plugin_version")
# Python types of attributes -> ONNX attribute types (tensors are inputs, never attributes).
_ATTRIBUTE_TYPES = {int: OpSchema.AttrType.INT, float: OpSchema.AttrType.FLOAT, str: OpSchema.AttrType.STRING,
                    Sequence[int]: OpSchema.AttrType.INTS, Sequence[float]: OpSchema.AttrType.FLOATS}
_FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]
LOWERINGS = ("auto", "custom", "standard")


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: one object per op
class CustomOp:
    """One torch custom op and the ONNX it exports as.

    Attributes:
        torch_op: the op overload, e.g. ``torch.ops.deploykit.dynamic_conv2d.default``.
        op_type: the node's op_type in domain ``deploykit`` (also the TensorRT plugin's name).
        inputs, outputs: ONNX input/output names; inputs are the torch op's tensor arguments of these names.
        attributes: ONNX attribute name -> Python type (int, float, str, Sequence[int], Sequence[float]).
        body: builds the node's function body (domain ``deploykit``, name `op_type`) for a model opset.
        standard_lowering: optional translation into standard ops, called with the op's arguments by name; it
            returns None where it does not apply (e.g. a dynamic batch), and the node is emitted instead.
        reference: optional ``onnx.reference`` OpRun computing the node, for evaluators that cannot run the body.
        plugin_version: the ``plugin_version`` the TensorRT plugin creator registers.
        plugin: the folder under ``plugins/`` holding the op's CUDA kernel and TensorRT plugin, if it has one.
        min_opset: the first default-domain opset the body exists in; below it only the standard lowering works.
        prefer_standard: whether "auto" lowering uses the standard lowering where it applies (True) or only where
            the node cannot be emitted (False).
    """

    torch_op: Any
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attributes: Mapping[str, type]
    body: Callable[[int], onnx.FunctionProto]
    standard_lowering: Callable[..., Any] | None = None
    reference: type | None = None
    plugin_version: str = "1"
    plugin: str | None = None
    min_opset: int = 1
    prefer_standard: bool = True

    @classmethod
    def from_script(cls, torch_op: Any, script: onnxscript.OnnxFunction, **options: Any) -> "CustomOp":
        """A CustomOp whose body is an ``@onnxscript.script(DEPLOYKIT_OPSET)`` function (names from its signature)."""
        proto = script.to_function_proto()
        params = script.op_signature.params
        python_types = {v: k for k, v in _ATTRIBUTE_TYPES.items()}
        attributes = {p.name: python_types[OpSchema.AttrType[p.type.name]] for p in params if p.is_attribute()}
        return cls(torch_op, script.name, tuple(p.name for p in params if not p.is_attribute()),
                   tuple(proto.output), attributes, lambda opset: with_opset(script.to_function_proto(), opset),
                   **options)

    def schema(self) -> OpSchema:
        """The ``onnx.defs`` schema the exporter needs to emit the node."""
        attributes = [OpSchema.Attribute(name, _ATTRIBUTE_TYPES[kind], "") for name, kind in self.attributes.items()]
        attributes += [OpSchema.Attribute(name, OpSchema.AttrType.STRING, "", required=False)
                       for name in PLUGIN_ATTRIBUTES]
        return OpSchema(self.op_type, DOMAIN, DOMAIN_VERSION,
                        inputs=[OpSchema.FormalParameter(name, "T") for name in self.inputs],
                        outputs=[OpSchema.FormalParameter(name, "T") for name in self.outputs],
                        type_constraints=[("T", _FLOAT_TYPES, "floating-point tensors")], attributes=attributes)

    def translation(self, lowering: str = "auto", opset: int | None = None) -> Callable:
        """The ``custom_translation_table`` entry for the torch op.

        Args:
            lowering: "auto" picks the standard lowering or the node as the op prefers (see `prefer_standard`),
                falling back to the standard lowering below `min_opset`; "custom" always emits the node;
                "standard" requires the standard lowering.
            opset: the model's default-domain opset. Defaults to one the body exists in.

        The exporter reads a translation's Python signature to tell ONNX inputs (unannotated) from attributes
        (annotated with a Python type), so the function gets the torch op's argument names and types.
        """
        parameters, annotations = [], {}
        for argument in self.torch_op._schema.arguments:
            default = argument.default_value if argument.has_default_value() else inspect.Parameter.empty
            parameters.append(inspect.Parameter(argument.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                default=default))
            if (python_type := _TORCH_ATTRIBUTE_TYPES.get(str(argument.type))) is not None:
                annotations[argument.name] = python_type
        node_allowed = opset is None or opset >= self.min_opset

        def translate(*args, **kwargs):
            bound = _bind(self.torch_op, args, kwargs)
            if lowering == "custom" and not node_allowed:
                raise ValueError(f"{DOMAIN}::{self.op_type} needs opset >= {self.min_opset} (its body's); export "
                                 f"at that opset or choose the standard lowering")
            wants_standard = lowering == "standard" or not node_allowed or (lowering == "auto" and self.prefer_standard)
            if lowering != "custom" and wants_standard and self.standard_lowering is not None:
                lowered = self.standard_lowering(**bound)
                if lowered is not None:
                    return lowered
            if lowering == "standard" or not node_allowed:
                raise ValueError(f"{DOMAIN}::{self.op_type} has no standard lowering for this call "
                                 f"(e.g. it needs a static batch)")
            return self._emit(bound)

        translate.__signature__ = inspect.Signature(parameters)
        translate.__annotations__ = annotations
        translate.__name__ = translate.__qualname__ = f"translate_{self.op_type}"
        return translate

    def _emit(self, bound: dict):
        """Emit the single custom-domain node for one torch op call."""
        attributes = {name: list(bound[name]) if isinstance(bound[name], (tuple, list)) else bound[name]
                      for name in self.attributes}
        node = getattr(DEPLOYKIT_OPSET, self.op_type)
        return node(*(bound[name] for name in self.inputs), **attributes, plugin_namespace=PLUGIN_NAMESPACE,
                    plugin_version=self.plugin_version)

    def function_proto(self, opset: int) -> onnx.FunctionProto:
        return self.body(opset)


def forwarding_node(op_type: str, inputs: Sequence[str], outputs: Sequence[str],
                    attributes: Mapping[str, type]) -> onnx.NodeProto:
    """A body node whose attributes refer to the enclosing function's attributes of the same names (e.g. a Conv
    that takes the op's strides, pads, dilations and group)."""
    node = onnx.helper.make_node(op_type, list(inputs), list(outputs))
    for name, kind in attributes.items():
        attribute = onnx.helper.make_attribute_ref(name, onnx.AttributeProto.AttributeType.Value(
            _ATTRIBUTE_TYPES[kind].name))
        attribute.ref_attr_name = name
        node.attribute.append(attribute)
    return node


def with_opset(function: onnx.FunctionProto, opset: int) -> onnx.FunctionProto:
    """Set a function body's default-domain opset to the model's (the checker requires them to agree)."""
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


# torch schema argument types that become ONNX attributes (tensors become inputs).
_TORCH_ATTRIBUTE_TYPES = {"float": float, "int": int, "bool": bool, "str": str, "List[int]": Sequence[int],
                          "List[float]": Sequence[float]}


def _bind(torch_op, args: tuple, kwargs: dict) -> dict:
    """Map a torch op call's positional and keyword arguments to their schema names (defaults filled)."""
    names = [a.name for a in torch_op._schema.arguments]
    bound = {a.name: a.default_value for a in torch_op._schema.arguments if a.has_default_value()}
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


__all__ = ["CustomOp", "DEPLOYKIT_OPSET", "DOMAIN", "LOWERINGS", "PLUGIN_NAMESPACE", "attach_functions",
           "forwarding_node", "registered_schemas", "with_opset"]
