"""Where a deployed model first diverges from PyTorch: the first module, in execution order, whose output is
already out of tolerance.

The dynamo exporter records on every ONNX node the PyTorch module it came from (metadata
``pkg.torch.onnx.name_scopes`` = ``['', 'layer1', 'layer1.0', 'layer1.0.conv1', 'conv2d_3']``: the module paths
from the root down, then the op; a module's second call is ``name@1``), and the graph passes keep that metadata. A
module's output in the graph is the value its nodes hand to nodes outside it. `first_divergence` exposes those
values as extra graph outputs, runs the graph once in onnxruntime on the failing input, runs PyTorch in float32 and
float64 with forward hooks, and judges every module's output on the failing sample with the verification rule
(`deploykit.verify.sample_status`). Modules that leave no node in the graph (a Conv whose BatchNorm was fused into
it, by the exporter or by `deploykit.export.fold_batchnorm`; an identity) or whose value has another shape than
PyTorch's are skipped: a fused conv is judged, and reported, as part of the BatchNorm whose output it computes.

It runs only after a failed check, so a passing run pays nothing for it.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import torch
from torch import nn

from deploykit.export.fold_batchnorm import FOLDED_KEY
from deploykit.runtime.ort import session_from_onnx
from deploykit.signature import flatten_outputs
from deploykit.verify import (FAILED, PROBES, Feed, default_dtype, float64_copy, nudged, rel_to_range,
                              sample_status)

NAME_SCOPES = "pkg.torch.onnx.name_scopes"
_CALL_SUFFIX = re.compile(r"@(\d+)$")
ModuleCall = tuple[str, int]  # (module path, call index)


@dataclass
class Divergence:
    """The first module whose output is out of tolerance on the failing sample."""

    module: str  # dotted path; "" is the model's own forward (an op outside every submodule)
    module_class: str
    call: int  # which call of the module (0 unless it runs several times)
    onnx_value: str
    onnx_nodes: list[str]  # "OpType name" of the module's nodes, in graph order (at most 8)
    e_dep: float
    e_ref: float | None  # PyTorch's float32 error on this output (the larger of the plain and ulp-nudged runs)
    bound: float
    iteration: int
    sample: int
    output: str  # the model output whose failure was traced back
    reference: str = "float64"  # what the module outputs were compared with: "float64", or "float32" PyTorch

    def as_dict(self) -> dict:
        result = asdict(self)
        result["class"] = result.pop("module_class")
        return result

    def describe(self) -> str:
        """One line for stderr."""
        where = self.module or "(the model's own forward)"
        reference = f"; PyTorch float32: {self.e_ref:.2g}" if self.e_ref is not None else ""
        nodes = ", ".join(self.onnx_nodes[:3]) + (" ..." if len(self.onnx_nodes) > 3 else "")
        call = f" (call {self.call + 1})" if self.call else ""
        anchor = "float64" if self.reference == "float64" else "PyTorch float32"
        return (f"first divergence: {where}{call} ({self.module_class}; ONNX {nodes}): output {self.e_dep:.2g} of "
                f"its range from {anchor} (bound {self.bound:.2g}{reference}) on sample {self.sample} of "
                f"verification batch {self.iteration}, tracing model output {self.output!r}")


def node_module_calls(node: onnx.NodeProto, key: str | None = None) -> list[ModuleCall]:
    """The module calls a node was exported from, outermost first (empty without exporter metadata). A node into
    which `deploykit.export.fold_batchnorm` folded a BatchNorm computes part of that BatchNorm's output now, so it
    belongs to the BatchNorm's calls (`key` picks one of the two metadata entries instead)."""
    metadata = {p.key: p.value for p in node.metadata_props}
    scopes = metadata.get(key) if key else metadata.get(FOLDED_KEY, metadata.get(NAME_SCOPES))
    scopes = ast.literal_eval(scopes) if scopes and scopes.startswith("[") else None
    if not scopes or scopes[0] != "":
        return []
    calls = []
    for scope in scopes[1:-1]:
        match = _CALL_SUFFIX.search(scope)
        calls.append((scope[:match.start()], int(match.group(1))) if match else (scope, 0))
    return calls


def module_exits(model: onnx.ModelProto) -> dict[ModuleCall, list[tuple[str, str]]]:
    """Each module call -> the values its nodes pass to nodes outside it (or to the graph's outputs), in graph
    order, each with the "OpType name" of the node that produces it."""
    calls_of = [set(node_module_calls(node)) for node in model.graph.node]
    consumers: dict[str, list[int]] = defaultdict(list)
    for index, node in enumerate(model.graph.node):
        for name in node.input:
            consumers[name].append(index)
    graph_outputs = {o.name for o in model.graph.output}
    # The modules a folded node was exported from lost their output to the BatchNorm folded into it.
    folded_away = {call for node in model.graph.node if any(p.key == FOLDED_KEY for p in node.metadata_props)
                   for call in set(node_module_calls(node, NAME_SCOPES)) - set(node_module_calls(node, FOLDED_KEY))}
    exits: dict[ModuleCall, list[tuple[str, str]]] = defaultdict(list)
    for index, node in enumerate(model.graph.node):
        for call in calls_of[index] - folded_away:
            for value in node.output:
                leaves = value in graph_outputs or any(call not in calls_of[c] for c in consumers[value])
                if value and leaves:
                    exits[call].append((value, f"{node.op_type} {node.name}"))
    return dict(exits)


def module_nodes(model: onnx.ModelProto) -> dict[ModuleCall, list[str]]:
    nodes: dict[ModuleCall, list[str]] = defaultdict(list)
    for node in model.graph.node:
        for call in node_module_calls(node):
            nodes[call].append(f"{node.op_type} {node.name}")
    return dict(nodes)


def first_divergence(model: nn.Module, onnx_model: onnx.ModelProto, feed: Feed, iteration: int, sample: int,
                     tolerance: float, float64: bool = True, providers: Sequence[str] | None = None,
                     threads: int | None = None, output: str | None = None) -> Divergence | None:
    """The first module (in PyTorch's execution order) whose exported output fails the verification rule on
    `sample` of `feed`; None if no module does (the graph carries no exporter metadata, or the error appears only
    after the last module, in which case the model's own forward is reported).

    Args:
        model: the float32 PyTorch model that was exported.
        onnx_model: the exported graph, after the passes (they keep the name-scope metadata).
        feed: the failing input batch; `iteration` is its index in the verification, for the report.
        sample: the failing sample's index in the batch.
        tolerance: the verification tolerance (relative to each module output's range on the sample).
        float64: compare with a float64 copy of `model` (False: the model cannot run in float64).
        providers, threads: onnxruntime settings, as for the verification.
        output: the failing graph output; only modules it depends on are judged. Defaults to the first output.
    """
    outputs = [o.name for o in onnx_model.graph.output]
    graph_output = outputs[0] if output is None else output
    upstream = _upstream_values(onnx_model, graph_output)
    exits = {call: kept for call, values in module_exits(onnx_model).items()
             if (kept := [(v, producer) for v, producer in values if v in upstream])}
    if not exits:
        return None
    exits[("", 0)] = [(graph_output, "graph output")]
    values = sorted({value for values in exits.values() for value, _ in values} - {graph_output})
    deployed = dict(zip([graph_output, *values], run_with_outputs(onnx_model, [graph_output, *values], feed,
                                                                   providers, threads)))
    root = outputs.index(graph_output)
    order, fp32 = _module_outputs(model, feed, torch.float32, root)
    probes = [_module_outputs(model, nudged([feed], seed)[0], torch.float32, root)[1] for seed in range(PROBES)] \
        if float64 else []
    reference = _module_outputs(float64_copy(model), feed, torch.float64, root)[1] if float64 else fp32
    nodes = module_nodes(onnx_model)
    classes = {name: type(module).__name__ for name, module in model.named_modules()}
    for call in order:
        if call not in exits or call not in reference:
            continue
        expected, actual32 = reference[call], fp32[call]
        pick = (lambda a: a[sample]) if expected.ndim else (lambda a: a)
        # Several values of the module's shape may leave it (e.g. a residual input passed through): the module is
        # judged on the closest one, so a divergence is never claimed for a value that is not its output.
        matching = [(rel_to_range(pick(deployed[v]), pick(expected)), v, producer) for v, producer in exits[call]
                    if deployed[v].shape == expected.shape]
        if not matching:
            continue
        e_dep, value, producer = min(matching)
        e_ref = rel_to_range(pick(actual32), pick(expected)) if float64 else None
        if e_ref is not None:
            nudged_errors = [rel_to_range(pick(probe[call]), pick(expected)) for probe in probes if call in probe]
            e_ref = max([e_ref, *nudged_errors])
        status, bound = sample_status(e_dep, e_ref, tolerance)
        if status == FAILED:
            return Divergence(module=call[0], module_class=classes.get(call[0], "?"), call=call[1], onnx_value=value,
                              onnx_nodes=nodes.get(call, [producer])[:8], e_dep=e_dep, e_ref=e_ref, bound=bound,
                              iteration=iteration, sample=sample, output=graph_output,
                              reference="float64" if float64 else "float32")
    return None


def run_with_outputs(onnx_model: onnx.ModelProto, names: list[str], feed: Feed, providers, threads) -> list:
    """Run the graph with `names` (intermediate values included) as its outputs."""
    probed = onnx.ModelProto()
    probed.CopyFrom(onnx_model)
    known = {v.name: v for v in [*probed.graph.value_info, *probed.graph.output, *probed.graph.input]}
    del probed.graph.output[:]
    for name in names:
        info = onnx.ValueInfoProto()
        if name in known:
            info.CopyFrom(known[name])
        else:  # no inferred type: declare float32 of unknown shape
            info = onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        probed.graph.output.append(info)
    return session_from_onnx(probed, providers, threads).run(names, feed)


def _upstream_values(model: onnx.ModelProto, output: str) -> set[str]:
    """Every value `output` is computed from (itself included)."""
    producer = {value: node for node in model.graph.node for value in node.output}
    seen, pending = set(), [output]
    while pending:
        value = pending.pop()
        if value in seen:
            continue
        seen.add(value)
        if value in producer:
            pending.extend(name for name in producer[value].input if name)
    return seen


def _module_outputs(model: nn.Module, feed: Feed, dtype: torch.dtype, root_output: int = 0) -> tuple[
        list[ModuleCall], dict[ModuleCall, np.ndarray]]:
    """Every module call's output tensor (for modules returning one), keyed by (path, call index), and the calls in
    the order they finished; the model's own call is represented by its output number `root_output` (flattened as
    the export flattens it)."""
    order: list[ModuleCall] = []
    outputs: dict[ModuleCall, np.ndarray] = {}
    calls: dict[str, int] = defaultdict(int)

    def record(name: str, _module, _args, output) -> None:
        call = (name, calls[name])
        calls[name] += 1
        if name == "" and not isinstance(output, torch.Tensor):
            output = flatten_outputs(output)[root_output][1]
        # Modules returning several tensors (e.g. ODConv's four attentions) are passed over: which ONNX value
        # matches which tensor is ambiguous.
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            order.append(call)
            outputs[call] = output.detach().numpy().copy()

    handles = [module.register_forward_hook(lambda m, a, o, name=name: record(name, m, a, o))
               for name, module in model.named_modules()]
    try:
        with torch.inference_mode(), default_dtype(dtype):
            model(*(torch.from_numpy(a).to(dtype) if np.issubdtype(a.dtype, np.floating) else torch.from_numpy(a)
                    for a in feed.values()))
    finally:
        for handle in handles:
            handle.remove()
    return order, outputs
