"""PyTorch module -> ONNX ModelProto with torch.onnx's dynamo exporter.

Opset 20 by default: ``DeformConv`` needs >= 19, and 20 is the opset torch 2.13's exporter emits natively, so no
version-conversion pass (a known source of export failures) runs; TensorRT 10's parser and onnxruntime >= 1.25
both accept it. Other opsets (18-23) can be requested: at 18, for runtimes without ``DeformConv``, deformable convs
take their standard-op lowering. torch 2.13 cannot export below 18 (it leaves the model at 18 and the check fails).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections.abc import Sequence

import onnx
import torch
from torch import nn

from deploykit.errors import DeployError
from deploykit.export.custom_op import LOWERINGS, CustomOp, attach_functions, registered_schemas

DEFAULT_OPSET = 20
SUPPORTED_OPSETS = range(18, 24)
BATCH_DIM_NAME = "batch"
SPATIAL_DIM_NAMES = ("height", "width")
# torch.export specialises a dynamic dimension whose example size is 0 or 1, so a dynamic batch is traced at 2.
_TRACE_BATCH = 2
# The smallest height/width a symbolic spatial dimension may take unless the caller says (sizes 0 and 1 would be
# specialised). Zoo models give their own (`deploykit.models.ModelSpec.min_size`).
_MIN_SPATIAL = 2


def onnx_from_model(model: nn.Module, example: torch.Tensor | tuple[torch.Tensor, ...], *, opset: int | None = None,
                    dynamic_batch: bool | None = None, dynamic_spatial: bool | None = None,
                    min_spatial: int | None = None, input_names: Sequence[str] = ("input",),
                    output_names: Sequence[str] = ("output",), custom_ops: Sequence[CustomOp] | None = None,
                    lowering: str | None = None, verbose: bool = False) -> onnx.ModelProto:
    """Export `model` (called on one tensor) to ONNX.

    Args:
        model: the module, in eval mode.
        example: an input of the shape to export (a tuple for a model with several inputs, all batched); with a
            dynamic batch only their other dimensions are fixed.
        opset: default-domain opset, 18-23. Defaults to 20.
        dynamic_batch: leave dimension 0 symbolic (named "batch"). Defaults to True.
        dynamic_spatial: also leave dimensions 2 and 3 of every (4-D) input symbolic, named "height" and "width".
            Needs a dynamic batch (a static batch lets ops pick size-specific lowerings). Defaults to False.
        min_spatial: the smallest height and width the exported file must accept (torch.export proves the graph
            for every size from there up, and fails if the model cannot take one). Defaults to 2.
        input_names, output_names: ONNX graph input/output names. Default to ("input",) and ("output",).
        custom_ops: the ``deploykit::`` ops the model may call. Defaults to every registered variant's ops.
        lowering: how those ops export: "auto" (default) uses an op's standard-op lowering where it applies
            (e.g. DynamicConv2d folds a static batch into conv groups) and its ``deploykit::`` node elsewhere;
            "custom" always emits the node (for TensorRT plugins); "standard" requires standard ops.
        verbose: let the exporter print its own diagnostics.

    Calls of third-party ops with a deploykit equivalent (torchvision's ``deform_conv2d``) export as that
    equivalent's node, see `deploykit.conversion.export_translations`; layers are swapped beforehand by
    `deploykit.conversion.convert`.

    Returns:
        The ModelProto with every ``deploykit::`` node's function body attached.
    """
    opset = DEFAULT_OPSET if opset is None else opset
    lowering = lowering or "auto"
    if lowering not in LOWERINGS:
        raise DeployError(f"Lowering {lowering!r} is unknown; choose one of {', '.join(LOWERINGS)}.")
    dynamic_batch = True if dynamic_batch is None else dynamic_batch
    if dynamic_spatial and not dynamic_batch:
        raise DeployError("A dynamic spatial size needs a dynamic batch (with a static batch, dynamic convs fold "
                          "the batch into size-specific conv groups); drop the static batch.")
    if opset not in SUPPORTED_OPSETS:
        raise DeployError(f"Opset {opset} is not supported; choose one of {SUPPORTED_OPSETS.start}-"
                          f"{SUPPORTED_OPSETS.stop - 1} (19 is the first with DeformConv; at 18 deformable convs "
                          f"export as standard ops).")
    if custom_ops is None:
        from deploykit.variants import custom_ops as registered_custom_ops
        custom_ops = registered_custom_ops()
    check_exportable(model)
    examples = tuple(example) if isinstance(example, (tuple, list)) else (example,)
    dynamic_shapes = None
    if dynamic_batch:
        examples = tuple(_with_batch(e, max(_TRACE_BATCH, e.shape[0])) for e in examples)
        dynamic_shapes = _dynamic_shapes(examples, dynamic_spatial or False,
                                         _MIN_SPATIAL if min_spatial is None else min_spatial)
    from deploykit.conversion import export_translations  # third-party ops user code calls (torchvision's DCN)

    translations = {**export_translations(lowering, opset),
                    **{op.torch_op: op.translation(lowering, opset) for op in custom_ops}}
    with registered_schemas(custom_ops), _quiet(not verbose):
        try:
            program = torch.onnx.export(
                model, examples, dynamo=True, opset_version=opset, input_names=list(input_names),
                output_names=list(output_names), dynamic_shapes=dynamic_shapes, external_data=False,
                custom_translation_table=translations,
                verbose=verbose,
                report=False, optimize=True)
        except Exception as err:  # the exporter raises many types; all mean "this model did not export"
            if dynamic_batch and re.search(r"Unsupported attribute type: [^\n]*SymbolicTensor", str(err)):
                raise DeployError(BATCH_IN_GROUPS) from err
            raise DeployError(f"torch.onnx could not export the model: {_summary(err)} (run with -v for the "
                              f"exporter's full report).") from err
    return attach_functions(program.model_proto, custom_ops, opset)


BATCH_IN_GROUPS = (
    "torch.onnx could not export the model with a dynamic batch: a layer puts the batch into a conv's groups (the "
    "per-sample kernels of the official CondConv, DY-CNN and ODConv code: groups = batch x g), which ONNX's static "
    "group attribute cannot hold; deploykit converts the official classes it recognises (docs/own-model.md), so "
    "for this one export with --static-batch (the file then takes this batch only), or rebuild it from deploykit.nn "
    "layers, or load its weights into the zoo model with --arch.")


def check_exported_dims(onnx_model: onnx.ModelProto, model: nn.Module, example: dict[str, torch.Tensor | object],
                        dynamic_batch: bool, dynamic_spatial: bool) -> None:
    """Refuse a file whose inputs lost the symbolic dims that were asked for.

    torch.onnx relaxes a dynamic dim that the model's code turns into a Python number (``int(x.shape[0])``,
    ``.item()`` on a size) into a constant without a word; such a file would fail on any other batch. The layer
    responsible is named by tracing again (`specialising_module`)."""
    wanted = ({0: BATCH_DIM_NAME} if dynamic_batch else {}) | \
        (dict(zip((2, 3), SPATIAL_DIM_NAMES)) if dynamic_spatial else {})
    for value in onnx_model.graph.input:
        dims = value.type.tensor_type.shape.dim
        for axis, what in wanted.items():
            if axis >= len(dims) or (axis > 0 and len(dims) != 4) or not dims[axis].HasField("dim_value"):
                continue
            culprit = specialising_module(model, tuple(torch.as_tensor(a) for a in example.values()), axis)
            where = (f"{culprit[0] or 'the model'} ({culprit[1]}) turns it into a Python number (int() or .item() "
                     f"on a size)") if culprit else "the model's code turns it into a Python number (int() or .item() "\
                                                  "on a size)"
            raise DeployError(f"The exported file fixed the {what} of input {value.name!r} at {dims[axis].dim_value} "
                              f"although a dynamic {what} was asked: {where}; convert that layer to a deploykit.nn "
                              f"layer (docs/own-model.md), or export with "
                              f"{'--static-batch' if axis == 0 else 'a static size (drop --dynamic-spatial)'}.")


def specialising_module(model: nn.Module, examples: tuple[torch.Tensor, ...], axis: int) -> tuple[str, str] | None:
    """(path, class) of the innermost module after whose forward dim `axis` of the first input is a constant
    under torch.export's symbolic tracing, the batch (or size) marked dynamic; None if none is found."""
    found: list[tuple[str, str]] = []
    symbol = []

    def remember(_module, args) -> None:
        size = args[0].shape[axis] if args and isinstance(args[0], torch.Tensor) else None
        if isinstance(size, torch.SymInt) and not symbol:
            symbol.append(size.node)

    def check(name: str, module: nn.Module) -> None:
        if found or not symbol:
            return
        node = symbol[0]
        if node.shape_env.replace(node.expr).is_number:
            found.append((name, type(module).__name__))

    handles = [model.register_forward_pre_hook(remember)]
    handles += [module.register_forward_hook(lambda m, a, o, name=name: check(name, m))
                for name, module in model.named_modules()]
    examples = tuple(_with_batch(e, max(_TRACE_BATCH, e.shape[0])) for e in examples)
    dims = [{axis: torch.export.Dim("probe", min=2)} if e.dim() > axis else None for e in examples]
    try:
        with _quiet(True):
            torch.export.export(model, examples, dynamic_shapes=tuple(dims), strict=False)
    except Exception:  # expected: the specialisation violates the constraint once tracing ends
        pass
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def _dynamic_shapes(examples: tuple[torch.Tensor, ...], spatial: bool, min_spatial: int) -> tuple[dict, ...]:
    """torch.export dims: the batch of every input and, if `spatial`, the height and width of every 4-D input
    (one shared Dim each, so inputs of one image keep equal sizes)."""
    batch = torch.export.Dim(BATCH_DIM_NAME, min=1)
    if not spatial:
        return tuple({0: batch} for _ in examples)
    if min_spatial < _MIN_SPATIAL:
        raise DeployError(f"The smallest spatial size to export must be at least {_MIN_SPATIAL}, not {min_spatial} "
                          f"(torch.export specialises sizes 0 and 1).")
    small = [f"{tuple(e.shape)}" for e in examples if e.dim() == 4 and min(e.shape[2:]) < min_spatial]
    if small:
        raise DeployError(f"The example input {small[0]} is smaller than the smallest spatial size to export "
                          f"({min_spatial}); trace at {min_spatial} or more.")
    height, width = (torch.export.Dim(name, min=min_spatial) for name in SPATIAL_DIM_NAMES)
    return tuple({0: batch, 2: height, 3: width} if e.dim() == 4 else {0: batch} for e in examples)


def check_exportable(model: nn.Module) -> None:
    """Refuse layers that export to ONNX nodes no runtime accepts, before the slow export."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ConvTranspose2d) and any(
                p >= s for p, s in zip(module.output_padding, module.stride)):
            raise DeployError(f"{name or 'The model'} is a ConvTranspose2d with output_padding {module.output_padding} "
                              f"not smaller than its stride {module.stride}: PyTorch allows that when the dilation "
                              f"is larger, but ONNX's ConvTranspose does not; lower output_padding below the stride "
                              f"and pad the output instead.")


def _with_batch(example: torch.Tensor, batch: int) -> torch.Tensor:
    if example.shape[0] == batch:
        return example
    repeats = -(-batch // example.shape[0])
    return example.repeat(repeats, *([1] * (example.dim() - 1)))[:batch]


def _summary(err: BaseException) -> str:
    """The most specific line of the exporter's (long, markdown) error: its exception summary if it has one."""
    text = str(err)
    if "## Exception summary" in text:
        text = text.split("## Exception summary", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("⬆")]
    return re.sub(r"^<class '[\w.]+'>: ", "", lines[0] if lines else type(err).__name__).rstrip(".")


@contextlib.contextmanager
def _quiet(enabled: bool):
    """Silence the exporter's progress prints and warnings unless verbose."""
    if not enabled:
        yield
        return
    previous = logging.root.manager.disable
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(previous)
