"""INT8 deployment: a calibrated QDQ copy of an exported model, and the verdict that fits it.

`quantize_int8` runs ONNX Runtime's static quantizer (`onnxruntime.quantization.quantize_static`: QDQ format,
per-channel symmetric int8 weights, uint8 activations, MinMax calibration) on the main graph. That quantizer never
looks inside a ``deploykit::`` node's function body (../shared/notes/ecosystem.md sec. 9). A weight-bound dense
``deploykit::DynamicConv2d`` node (a large kernel for few output pixels: late layers) is first rewritten as one static
conv with the whole kernel bank, its outputs mixed per sample (`deploykit.ops.dynamic_conv2d.to_bank_conv`), which the
quantizer runs in int8 like any conv. Every other one (CondConv, DyConv, ODConv) is then replaced by a
``deploykit::DynamicConv2dQDQ`` node whose body runs the per-sample conv in int8
(`deploykit.ops.dynamic_conv2d.quantized_function_body`): its input and output scales are calibrated here on the
same inputs, and its kernel scales are bounds derived from the
kernel bank (`aggregated_kernel_bound`), valid for every sample of any batch. Every ``deploykit::DeformConv2d``
node is first rewritten as its bilinear taps (float ``GridSample``) feeding a 1x1 conv over the sampled channels
(`deploykit.ops.deform_conv2d.to_sampled_conv`), which the quantizer runs in int8 like any conv, and every spatial
mean becomes the ``GlobalAveragePool`` it equals (`_pool_spatial_means`). TVConv's per-pixel conv stays float
(docs/quantization.md says why and what was measured).

The float64 rule of `deploykit.verify` cannot judge an int8 file: its error is quantization noise, orders of
magnitude above float32 rounding. `verify_int8` judges it on held-out inputs against PyTorch's float32 outputs by
what deployment changes for the user: top-1 / top-5 agreement for class scores, cosine and SQNR for every output.
On failure `layer_losses` names the layers that lose the most signal (per-layer SQNR, the quantized analogue of
the first divergence), and `keep_float` keeps named layers in float32.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from torch import nn

from deploykit.errors import DeployError
from deploykit.export.custom_op import DOMAIN
from deploykit.localize import module_exits, node_module_calls, run_with_outputs
from deploykit.log import LOGGER
from deploykit.ops.deform_conv2d import OP_TYPE as DEFORM_CONV, to_sampled_conv
from deploykit.ops.dynamic_conv2d import (OP_TYPE as DYNAMIC_CONV, QDQ_OP_TYPE, aggregated_kernel_bound,
                                          quantized_function_body, to_bank_conv)
from deploykit.runtime.ort import session_from_onnx
from deploykit.verify import FAILED, PASSED, Feed, Iterations, agreement, run_torch

CALIBRATION_METHOD = "MinMax"
# Thresholds of the int8 verdict (docs/quantization.md, "The int8 verdict"), on the worst held-out sample: measured on
# one small network per family with photos, correct int8 files keep 23-43 dB and agree on top-1; calibrated 1000x
# off, -5.5 dB. Cosine 0.98 is about 14 dB for an error uncorrelated with the signal.
MIN_TOP1 = 0.98
MIN_SQNR_DB = 15.0
MIN_COSINE = 0.98
# Module classes whose nodes stay float32, and why (docs/quantization.md, "What stays float").
FLOAT_MODULES = {
    "deploykit.nn.tvconv.TVConv": "TVConv's per-pixel conv multiplies activations by per-pixel weights (Mul, no "
                                  "int8 kernel); quantizing only its shift conv would add Q/DQ passes, not int8 "
                                  "compute",
}
CLASS_HIERARCHY = "pkg.torch.onnx.class_hierarchy"
# Ops that only move elements: an attention's bound (a Softmax over K, a Sigmoid) holds through them.
_SHAPE_OPS = ("Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand", "Transpose")


@dataclass
class QuantizedModel:
    """The QDQ model and the report's ``quantization`` section (calibration, every node quantized or left in float
    and why, the dynamic convs' scales)."""

    model: onnx.ModelProto
    report: dict


def quantize_int8(model: onnx.ModelProto, calibration_feeds: Sequence[Feed], keep_float: Iterable[str] = (),
                  calibration_source: Sequence[str] | None = None) -> QuantizedModel:
    """Quantize an exported fp32 model to int8 (QDQ), dynamic convs included.

    Args:
        model: the exported model after `deploykit.export.passes.run_passes` (name-scope metadata kept).
        calibration_feeds: input batches the activation ranges are measured on (never the ones it is judged on).
        keep_float: node names or PyTorch module paths (e.g. ``layer1.0.conv1``) to keep in float32.
        calibration_source: what the feeds were read from (file names), for the report. Defaults to None.

    Raises:
        DeployError: no calibration input, or a `keep_float` name that matches no node.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not calibration_feeds:
        raise DeployError("int8 quantization needs calibration inputs; pass images or an .npz with --calibration.")
    kept = nodes_of(model, keep_float)
    model = _copy(model)  # the int8 forms below rewrite it; the caller's fp32 model stays as it is
    sampling = _sample_deform_convs(model, kept)
    bank_convs = _bank_convs(model, kept, calibration_feeds[0])
    _pool_spatial_means(model)
    by_design = {**_float_by_design(model), **sampling}
    with tempfile.TemporaryDirectory(prefix="deploykit-int8-") as scratch:
        source, target = Path(scratch) / "fp32.onnx", Path(scratch) / "int8.onnx"
        onnx.save_model(model, source)
        ranges = _calibrate(source, Path(scratch), calibration_feeds)
        quantize_static(str(source), str(target), None, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=sorted(kept | set(by_design)), calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
                        calibration_cache_path=ranges)
        quantized = onnx.load_model(target)
    _keep_metadata(model, quantized)
    _unquantize_outputs(model, quantized)
    dynamic_convs = bank_convs + _quantize_dynamic_convs(model, quantized, calibration_feeds, kept)
    onnx.checker.check_model(quantized)
    report = {
        "format": "QDQ", "tool": "onnxruntime.quantization.quantize_static",
        "weights": "int8, symmetric, per output channel", "activations": "uint8, asymmetric, per tensor",
        "calibration": {"method": CALIBRATION_METHOD, "batches": len(calibration_feeds),
                        "samples": int(sum(next(iter(f.values())).shape[0] for f in calibration_feeds)),
                        "inputs": list(calibration_source) if calibration_source else None},
        "keep_float": sorted(keep_float),
        **_node_census(quantized, kept, by_design),
        "dynamic_convs": dynamic_convs,
    }
    return QuantizedModel(quantized, report)


def nodes_of(model: onnx.ModelProto, names: Iterable[str]) -> set[str]:
    """The node names `names` stand for: node names as they are, module paths as every node exported from that
    module or one inside it (from the exporter's name-scope metadata)."""
    nodes = set()
    by_name = {node.name for node in model.graph.node}
    for name in names:
        matched = {name} if name in by_name else {
            node.name for node in model.graph.node
            if any(path == name or path.startswith(name + ".") for path, _ in node_module_calls(node))}
        if not matched:
            raise DeployError(f"--keep-float {name} names no node and no module of the exported model; pass a "
                              f"module path as in the report's quantization section (e.g. {_example_path(model)}) "
                              f"or a node name.")
        nodes |= matched
    return nodes


def _float_by_design(model: onnx.ModelProto) -> dict[str, str]:
    """Node name -> why it stays float, for nodes exported from a module class in `FLOAT_MODULES`."""
    reasons = {}
    for node in model.graph.node:
        classes = next((p.value for p in node.metadata_props if p.key == CLASS_HIERARCHY), "")
        reason = next((why for cls, why in FLOAT_MODULES.items() if f"'{cls}'" in classes), None)
        if reason:
            reasons[node.name] = reason
    return reasons


def _example_path(model: onnx.ModelProto) -> str:
    for node in model.graph.node:
        calls = node_module_calls(node)
        if calls and node.op_type in ("Conv", DYNAMIC_CONV):
            return calls[-1][0]
    return "layer1.0.conv1"


def _calibrate(model_path: Path, scratch: Path, feeds: Sequence[Feed]) -> Path:
    """Run onnxruntime's MinMax calibrator and save its ranges where `quantize_static` reads a calibration cache.

    Done here rather than inside `quantize_static` because its calibration session disables every graph
    optimization, and without them onnxruntime cannot type the Scan inside a ``deploykit::`` function body."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, create_calibrator, save_tensors_data

    calibrator = create_calibrator(model_path, augmented_model_path=str(scratch / "augmented.onnx"),
                                   calibrate_method=CalibrationMethod.MinMax)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    calibrator.infer_session = ort.InferenceSession(calibrator.augmented_model_path, options,
                                                    providers=["CPUExecutionProvider"])
    calibrator.collect_data(_FeedReader(feeds))
    cache = scratch / "ranges.json"
    save_tensors_data(calibrator.compute_data(), cache)
    return cache


class _FeedReader:
    """onnxruntime's CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, feeds: Sequence[Feed]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> Feed | None:
        return next(self._feeds, None)


def _keep_metadata(source: onnx.ModelProto, target: onnx.ModelProto) -> None:
    """The quantizer drops nodes' metadata (the module each came from); copy it back by node name."""
    metadata = {node.name: node.metadata_props for node in source.graph.node if node.metadata_props}
    for node in target.graph.node:
        if node.name in metadata and not node.metadata_props:
            node.metadata_props.extend(metadata[node.name])


def quantize_and_check(model: onnx.ModelProto, torch_model: nn.Module, calibration_feeds: Sequence[Feed],
                       feeds: Sequence[Feed], keep_float: Iterable[str] = (),
                       calibration_source: Sequence[str] | None = None, providers: Sequence[str] | None = None,
                       threads: int | None = None) -> tuple[onnx.ModelProto, dict]:
    """`quantize_int8`, then `verify_int8` on `feeds` (held out: never the calibration inputs) against
    `torch_model` in float32; on failure `layer_losses` on the first feed. Returns the int8 model and the report's
    ``quantization`` section (its ``verification`` holds the verdict)."""
    quantized = quantize_int8(model, calibration_feeds, keep_float, calibration_source)
    session = session_from_onnx(quantized.model, providers, threads)
    names = [o.name for o in model.graph.output]
    candidate = [dict(zip(names, session.run(names, feed))) for feed in feeds]
    verification = verify_int8(candidate, run_torch(torch_model, feeds, names))
    if verification.verdict == FAILED:  # on the sample whose first output lost the most
        where = next(iter(verification.outputs.values()))["worst_sample"]
        feed = {name: array[where["sample"]:where["sample"] + 1] for name, array in feeds[where["iteration"]].items()}
        verification.worst_layers = layer_losses(model, quantized.model, feed)
    return quantized.model, {**quantized.report, "verification": verification.as_dict(),
                             "summary": verification.describe(), "reproduce": REPLAY_COMMAND}


REPLAY_COMMAND = ("python -c \"from deploykit.quantize import replay_int8; print(replay_int8('.').describe())\"")


def replay_int8(output_dir: str | Path) -> Int8Verification:
    """The int8 verdict again from an export directory's files alone: ``model.int8.onnx`` run in onnxruntime on
    ``inputs.json``, judged against ``torch_outputs.json``.

    Those saved outputs are PyTorch's float64 outputs rounded to float32 where the run judged against PyTorch's
    float32 outputs; the two differ by float32 rounding (~1e-6 of the range), four orders of magnitude below int8
    noise, so the replay reproduces the verdict and its figures to a few hundredths of a dB."""
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    from deploykit.artifacts import INPUTS_FILE, INT8_MODEL_FILE, TORCH_OUTPUTS_FILE

    output_dir = Path(output_dir)
    feeds = [dict(feed) for feed in load_json(str(output_dir / INPUTS_FILE))]
    reference = [dict(it) for it in RunResults.load(str(output_dir / TORCH_OUTPUTS_FILE))[0][1]]
    session = session_from_onnx(onnx.load_model(output_dir / INT8_MODEL_FILE), ["cpu"], None)
    names = [o.name for o in session.get_outputs()]
    return verify_int8([dict(zip(names, session.run(names, feed))) for feed in feeds], reference)


def log_int8_verdict(section: dict) -> None:
    """The int8 verdict line, the layers that lose the most when it failed, and the replay line."""
    LOGGER.info("%s", section["summary"])
    for layer in section["verification"]["worst_layers"][:3]:
        LOGGER.info("  loses %.1f dB: %s (SQNR %.1f dB in, %.1f dB out); keep it in float with --keep-float %s",
                    layer["loss_db"], layer["module"], layer["sqnr_in_db"], layer["sqnr_out_db"], layer["module"])
    LOGGER.info("reproduce int8: %s", section["reproduce"])


def _unquantize_outputs(fp32: onnx.ModelProto, model: onnx.ModelProto) -> None:
    """Drop the Q/DQ pair the quantizer puts on each graph output, in place: the model's outputs come out in float,
    so scores beyond the range seen in calibration are not clipped (measured: a held-out photo's logits clipped at
    the calibration maximum, 6.5 dB SQNR, where the same model without that pair keeps 30+ dB).

    The quantizer folds a Relu or Clip that ends the graph into that pair (its range clamps as the activation would),
    so where `fp32`'s output comes from one and the pair's source does not, the activation is put back."""
    producer = {output: node for node in model.graph.node for output in node.output}
    fp32_producer = {output: node for node in fp32.graph.node for output in node.output}
    fp32_constants = {t.name: t for t in fp32.graph.initializer}
    for graph_output in model.graph.output:
        dequantize = producer.get(graph_output.name)
        quantize = producer.get(dequantize.input[0]) if dequantize is not None and \
            dequantize.op_type == "DequantizeLinear" else None
        if quantize is None or quantize.op_type != "QuantizeLinear" or quantize.input[0] not in producer:
            continue
        source = producer[quantize.input[0]]
        readers = [n for n in model.graph.node if quantize.input[0] in n.input]
        if readers != [quantize]:
            continue
        model.graph.node.remove(quantize)
        model.graph.node.remove(dequantize)
        activation = fp32_producer.get(graph_output.name)
        if activation is not None and activation.op_type in ("Relu", "Clip") and source.op_type != activation.op_type:
            restored = onnx.NodeProto()
            restored.CopyFrom(activation)
            restored.input[0] = quantize.input[0]
            model.graph.node.insert(list(model.graph.node).index(source) + 1, restored)
            present = {t.name for t in model.graph.initializer}
            model.graph.initializer.extend(fp32_constants[name] for name in restored.input[1:]
                                           if name in fp32_constants and name not in present)
        else:
            source.output[list(source.output).index(quantize.input[0])] = graph_output.name
    used = {name for node in model.graph.node for name in node.input}
    unused = [t for t in model.graph.initializer if t.name not in used]
    for tensor in unused:
        model.graph.initializer.remove(tensor)


# --- deformable convs --------------------------------------------------------------------------------------------

SAMPLING_REASON = ("deformable sampling: bilinear taps at run-time offsets (GridSample) stay float; the 1x1 conv "
                   "they feed runs in int8")


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _sample_deform_convs(model: onnx.ModelProto, kept: set[str]) -> dict[str, str]:
    """Put every ``deploykit::DeformConv2d`` node not kept in float in its sampled form, in place
    (`deploykit.ops.deform_conv2d.to_sampled_conv`: float taps, then a 1x1 conv that the quantizer runs in int8
    with per-channel weights); return the sampling nodes, each with why it stays float."""
    weights = {t.name for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == DEFORM_CONV and n.name not in kept
             and n.input[1] in weights]
    sampling = {}
    for node in nodes:
        sampling.update(dict.fromkeys((new.name for new in to_sampled_conv(model, node)[:-1]), SAMPLING_REASON))
    _drop_function_if_unused(model, DEFORM_CONV)
    return sampling


def _drop_function_if_unused(model: onnx.ModelProto, op_type: str) -> None:
    """Remove the ``deploykit::<op_type>`` function body from `model` if no node calls it any more, in place."""
    if any(n.domain == DOMAIN and n.op_type == op_type for n in model.graph.node):
        return
    kept_functions = [f for f in model.functions if not (f.domain == DOMAIN and f.name == op_type)]
    del model.functions[:]
    model.functions.extend(kept_functions)


# --- spatial means -----------------------------------------------------------------------------------------------

def _pool_spatial_means(model: onnx.ModelProto) -> None:
    """Write every spatial mean of a 4-D tensor (``ReduceMean`` over axes 2 and 3, kept) as the ``GlobalAveragePool``
    it equals, in place; the same name and metadata. Attention branches (ODConv, SE, DyConv) open with one; measured
    on od_resnet50's int8 file in onnxruntime 1.32: 73 -> 54 ms median at batch 1 with bit-identical outputs
    (ReduceMean there reads channels-first float from a transpose of the int8 convs' channels-last output; the pool
    stays in their layout), the fp32 file unchanged."""
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in (*model.graph.value_info, *model.graph.input)
             if v.type.tensor_type.HasField("shape")}

    def spatial_mean(node: onnx.NodeProto) -> bool:
        attributes = _attributes(node)
        axes = attributes.get("axes")
        if axes is None and len(node.input) > 1 and node.input[1] in constants:
            axes = constants[node.input[1]].tolist()
        rank = ranks.get(node.input[0])
        return node.op_type == "ReduceMean" and not node.domain and rank == 4 and axes is not None and \
            sorted(a % rank for a in axes) == [2, 3] and attributes.get("keepdims", 1) == 1

    axes = set()
    for node in [node for node in model.graph.node if spatial_mean(node)]:
        node.op_type = "GlobalAveragePool"
        axes.update(node.input[1:])
        del node.input[1:]
        del node.attribute[:]
    read = {name for node in model.graph.node for name in node.input}
    for tensor in [t for t in model.graph.initializer if t.name in axes - read]:
        model.graph.initializer.remove(tensor)


# --- dynamic convs -----------------------------------------------------------------------------------------------

# A dense dynamic conv whose kernel holds at least this many weights per output channel for each output pixel of a
# sample (C/group * kH * kW / (H' * W'), at the calibration inputs' size) runs in its bank form. Measured per layer
# with `bench/bench_dynamic_conv.py --int8` (ODConv, K=4, batch 1; int8 time / fp32 time, per-sample kernel form vs
# bank form): 512ch 7x7 (94 weights per pixel): 1.39 vs 0.59; 256ch 14x14 (12): 0.93 vs 0.89; 128ch 28x28 (1.5):
# 0.59 vs 1.20; 64ch 56x56 (0.2): 0.61 vs 1.23 (docs/quantization.md, "Weight-bound layers: the bank form").
BANK_FORM_MIN_WEIGHTS_PER_PIXEL = 8.0
BANK_FORM = "bank: one static conv with the K kernels, outputs mixed per sample (weight-bound layer)"
PER_SAMPLE_FORM = "per-sample kernel: int8 QDQ with bank-derived scales"


def _bank_convs(model: onnx.ModelProto, kept: set[str], calibration_feed: Feed) -> list[dict]:
    """Put every weight-bound dense ``deploykit::DynamicConv2d`` node not kept in float in its bank form, in place
    (`deploykit.ops.dynamic_conv2d.to_bank_conv`): its convs then have constant weights that the quantizer gives
    per-channel int8 scales and ORT pre-packs. Weight-bound is judged at the size of one calibration sample."""
    weights = {t.name: t for t in model.graph.initializer}
    candidates = [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == DYNAMIC_CONV
                  and n.name not in kept and n.input[1] in weights and _attributes(n)["group"] == 1]
    if not candidates:
        return []
    one_sample = {name: value[:1] for name, value in calibration_feed.items()}
    outputs = run_with_outputs(model, [n.output[0] for n in candidates], one_sample, ["CPUExecutionProvider"], None)
    summary = []
    for node, output in zip(candidates, outputs):
        _, _, group_channels, kh, kw = weights[node.input[1]].dims
        per_pixel = group_channels * kh * kw / (output.shape[2] * output.shape[3])
        if per_pixel >= BANK_FORM_MIN_WEIGHTS_PER_PIXEL:
            summary.append({"node": node.name, "module": _module_of(node), "form": BANK_FORM,
                            "weights_per_output_pixel": round(per_pixel, 1)})
            to_bank_conv(model, node)
    _drop_function_if_unused(model, DYNAMIC_CONV)
    return summary


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _quantize_dynamic_convs(fp32: onnx.ModelProto, model: onnx.ModelProto, feeds: Sequence[Feed],
                            kept: set[str]) -> list[dict]:
    """Replace every DynamicConv2d node not kept in float by its QDQ form, in place; return what was done."""
    nodes = [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == DYNAMIC_CONV and n.name not in kept]
    if not nodes:
        return []
    constants = {t.name: numpy_helper.to_array(t) for t in fp32.graph.initializer}
    producers = {output: node for node in fp32.graph.node for output in node.output}
    originals = {node.name: node for node in fp32.graph.node}  # the quantizer renames inputs, never nodes
    ranges, attention_max = _observed_ranges(fp32, feeds, [originals[n.name] for n in nodes])
    summary = []
    for node in nodes:
        x, bank, attention, _, taps = originals[node.name].input
        attention_bound, attention_kind = _attention_bound(attention, producers, attention_max[attention])
        taps_max, taps_kind = _taps_bound(taps, producers, constants, ranges[taps])
        weight_bound = aggregated_kernel_bound(constants[bank], attention_bound, taps_max)
        x_scale, x_zero = _uint8_parameters(*ranges[x])
        y_scale, y_zero = _uint8_parameters(*ranges[f"{node.name}/unbiased"])
        parameters = {
            "x_scale": np.float32(x_scale), "x_zero_point": np.uint8(x_zero),
            "w_scale": (np.maximum(weight_bound, np.finfo(np.float32).tiny) / 127).astype(np.float32),
            "w_zero_point": np.zeros(len(weight_bound), np.int8),
            "y_scale": np.float32(y_scale), "y_zero_point": np.uint8(y_zero)}
        names = []
        for key, value in parameters.items():
            names.append(f"{node.name}.{key}")
            model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), names[-1]))
        node.op_type = QDQ_OP_TYPE
        node.input.extend(names)
        summary.append({"node": node.name, "module": _module_of(node), "form": PER_SAMPLE_FORM,
                        "attention": attention_kind, "taps": taps_kind,
                        "weight_scale_range": [float(parameters["w_scale"].min()), float(parameters["w_scale"].max())]})
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    model.functions.append(quantized_function_body(opset))
    _drop_function_if_unused(model, DYNAMIC_CONV)
    return summary


def _observed_ranges(fp32: onnx.ModelProto, feeds: Sequence[Feed], nodes: Sequence[onnx.NodeProto]
                     ) -> tuple[dict[str, tuple[float, float]], dict[str, np.ndarray]]:
    """Over the calibration feeds, from the fp32 graph: (min, max) of each dynamic conv's input X, tap attention S
    and output before the bias (output - A @ B, keyed ``<node>/unbiased``); and max |A[:, k]| per kernel."""
    constants = {t.name: numpy_helper.to_array(t) for t in fp32.graph.initializer}
    names = sorted({name for n in nodes for name in (n.input[0], n.input[2], n.input[4], n.output[0])} - set(constants))
    low: dict[str, float] = defaultdict(lambda: np.inf)
    high: dict[str, float] = defaultdict(lambda: -np.inf)
    attention_max: dict[str, np.ndarray] = {}
    for feed in feeds:
        values = {**constants, **dict(zip(names, run_with_outputs(fp32, names, feed, ["CPUExecutionProvider"], None)))}
        for node in nodes:
            x, _, a, b, s = node.input
            attention = values[a].reshape(-1, values[a].shape[-1])
            attention_max[a] = np.maximum(attention_max.get(a, 0.0), np.abs(attention).max(axis=0))
            bias = (values[a].astype(np.float64) @ values[b]).astype(np.float32)
            for key, array in ((x, values[x]), (s, values[s]),
                               (f"{node.name}/unbiased", values[node.output[0]] - bias[:, :, None, None])):
                low[key] = min(low[key], float(array.min()))
                high[key] = max(high[key], float(array.max()))
    return {key: (low[key], high[key]) for key in low}, attention_max


def _origin(name: str, producers: dict[str, onnx.NodeProto]) -> onnx.NodeProto | None:
    """The node a value comes from, through ops that only move elements."""
    node = producers.get(name)
    while node is not None and node.op_type in _SHAPE_OPS:
        node = producers.get(node.input[0])
    return node


def _attention_bound(name: str, producers: dict[str, onnx.NodeProto], observed: np.ndarray
                     ) -> tuple[np.ndarray | None, str]:
    """(bound of A[:, k] per kernel, or None for a convex combination; how it is known)."""
    origin = _origin(name, producers)
    if origin is not None and origin.op_type == "Softmax":
        return None, "softmax: convex combination of the bank"
    if origin is not None and origin.op_type == "Sigmoid":
        return np.ones_like(observed), "sigmoid: each weight in [0, 1]"
    if name not in producers:
        return observed, "constant"
    return observed, "calibrated (not provably bounded: a larger weight is clipped)"


def _taps_bound(name: str, producers: dict[str, onnx.NodeProto], constants: dict[str, np.ndarray],
                observed: tuple[float, float]) -> tuple[float, str]:
    """(bound of |S|, how it is known)."""
    if name in constants and np.all(constants[name] == 1):
        return 1.0, "none"
    origin = _origin(name, producers)
    if origin is not None and origin.op_type == "Sigmoid":
        return 1.0, "sigmoid: each tap in [0, 1]"
    return max(abs(observed[0]), abs(observed[1])), "calibrated (not provably bounded: a larger tap is clipped)"


def _uint8_parameters(low: float, high: float) -> tuple[float, int]:
    """Scale and zero point of an asymmetric uint8 range that contains 0 (as ORT's MinMax calibration)."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / 255 if high > low else 1.0
    return scale, int(np.clip(round(-low / scale), 0, 255))


# --- report ------------------------------------------------------------------------------------------------------

def _module_of(node: onnx.NodeProto) -> str | None:
    calls = node_module_calls(node)
    return calls[-1][0] if calls else None


def _node_census(model: onnx.ModelProto, kept: set[str], by_design: dict[str, str]) -> dict:
    """Every compute node of the int8 model: quantized (an op onnxruntime's quantizer has an int8 form for, reading
    a DequantizeLinear output, or a DynamicConv2dQDQ node) or float, and why."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    int8_ops = set(QDQRegistry) | set(QLinearOpsRegistry)
    producers = {output: node.op_type for node in model.graph.node for output in node.output}
    quantized, floating = [], []
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        entry = {"node": node.name, "op": f"{node.domain}::{node.op_type}" if node.domain else node.op_type,
                 "module": _module_of(node)}
        reads_int8 = any(producers.get(i) == "DequantizeLinear" for i in node.input)
        if node.op_type == QDQ_OP_TYPE or (not node.domain and node.op_type in int8_ops and reads_int8
                                           and node.name not in kept and node.name not in by_design):
            quantized.append(entry)
            continue
        if node.name in kept:
            reason = "kept in float32 (keep_float)"
        elif node.name in by_design:
            reason = by_design[node.name]
        elif node.domain == DOMAIN:
            reason = f"{node.op_type} has no int8 form (docs/quantization.md)"
        elif node.op_type not in int8_ops:
            reason = f"onnxruntime's quantizer has no int8 form for {node.op_type}"
        else:
            reason = "its inputs are not quantized (they come from float nodes)"
        floating.append({**entry, "reason": reason})
    return {"quantized": quantized, "float": floating}


# --- verdict -----------------------------------------------------------------------------------------------------

@dataclass
class Int8Verification:
    """The int8 file against PyTorch float32 on held-out inputs: agreement, per-output cosine and SQNR."""

    agreement: dict
    outputs: dict[str, dict]
    samples: int
    thresholds: dict = field(default_factory=lambda: {"top1": MIN_TOP1, "sqnr_db": MIN_SQNR_DB,
                                                      "cosine": MIN_COSINE})
    worst_layers: list[dict] = field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        """What breaks a threshold, one phrase each (empty when it passes)."""
        broken = []
        if "top1" in self.agreement and self.agreement["top1"] < MIN_TOP1:
            broken.append(f"top-1 agreement {self.agreement['top1']:.1%} < {MIN_TOP1:.0%}")
        for name, metrics in self.outputs.items():
            if metrics["sqnr_db_min"] < MIN_SQNR_DB:
                broken.append(f"output {name!r} SQNR {metrics['sqnr_db_min']:.1f} dB < {MIN_SQNR_DB:g} dB")
            if metrics["cosine_min"] < MIN_COSINE:
                broken.append(f"output {name!r} cosine {metrics['cosine_min']:.4f} < {MIN_COSINE:g}")
        return broken

    @property
    def verdict(self) -> str:
        return FAILED if self.failures else PASSED

    def as_dict(self) -> dict:
        return {**asdict(self), "verdict": self.verdict, "failures": self.failures}

    def describe(self) -> str:
        """One line for stderr."""
        parts = [f"{self.samples} held-out samples"]
        if "top1" in self.agreement:
            parts.append(f"top-1 {self.agreement['top1']:.0%}" +
                         (f", top-5 {self.agreement['top5']:.0%}" if "top5" in self.agreement else ""))
        parts += [f"{name!r} SQNR >= {m['sqnr_db_min']:.1f} dB, cosine >= {m['cosine_min']:.4f}"
                  for name, m in self.outputs.items()]
        why = f" ({'; '.join(self.failures)})" if self.failures else ""
        return f"{self.verdict.upper()}: int8 onnxruntime vs PyTorch float32, {', '.join(parts)}{why}"


def sqnr_db(actual: np.ndarray, expected: np.ndarray) -> float:
    """10 log10(sum expected^2 / sum (actual - expected)^2): signal over quantization noise, in dB."""
    expected = np.asarray(expected, np.float64)
    noise = float(np.sum((np.asarray(actual, np.float64) - expected) ** 2))
    signal = float(np.sum(expected ** 2))
    if noise == 0:
        return float("inf")
    return 10 * np.log10(signal / noise) if signal > 0 else float("-inf")


def verify_int8(candidate: Iterations, pytorch: Iterations) -> Int8Verification:
    """Judge int8 outputs (`candidate`) against PyTorch float32 (`pytorch`) on the same held-out feeds.

    Every output is measured per sample (SQNR and cosine, the worst kept); class scores ([N, classes]) also by
    top-1 / top-5 agreement (`deploykit.verify.agreement`)."""
    outputs = {}
    for name in candidate[0]:
        sqnrs, cosines, where = [], [], []
        for iteration, (actual, expected) in enumerate((it[name], ref[name]) for it, ref in zip(candidate, pytorch)):
            for row in range(len(expected)):
                sqnrs.append(sqnr_db(actual[row], expected[row]))
                cosines.append(_cosine(actual[row], expected[row]))
                where.append((iteration, row))
        worst = int(np.argmin(sqnrs))
        outputs[name] = {"sqnr_db_min": sqnrs[worst], "sqnr_db_median": float(np.median(sqnrs)),
                         "cosine_min": min(cosines), "worst_sample": {"iteration": where[worst][0],
                                                                      "sample": where[worst][1]}}
    samples = sum(len(next(iter(it.values()))) for it in pytorch)
    return Int8Verification(agreement(candidate, pytorch), outputs, samples)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / norms) if norms > 0 else float(np.array_equal(a, b))


def layer_losses(fp32: onnx.ModelProto, int8: onnx.ModelProto, feed: Feed, top: int = 5) -> list[dict]:
    """The modules that lose the most signal in the int8 graph, worst first.

    Each module call's output value (`deploykit.localize.module_exits`, the same metadata as the first divergence)
    is read from both graphs on `feed`; its SQNR is compared with the SQNR of the values entering it, and the drop
    (dB) ranks the modules. Only innermost modules that hold a compute node are ranked (a stage that contains a bad
    layer loses no more than the layer)."""
    exits = module_exits(fp32)
    compute = {call for node in fp32.graph.node if node.op_type in ("Conv", "Gemm", "MatMul") or node.domain
               for call in node_module_calls(node)[-1:]}
    entries = _entering_values(fp32, compute)
    present = {o for node in int8.graph.node for o in node.output} | {i.name for i in int8.graph.input}
    # Values are compared before their QuantizeLinear, so a layer is charged with the quantization of its inputs,
    # its weights and its arithmetic. The quantizer fuses an activation into the conv before it (Conv + Relu -> one
    # Conv named like the Relu's output, the Relu left to the uint8 clamp): such a value is read after its
    # QuantizeLinear -> DequantizeLinear pair, where the clamp has applied.
    quantized_copy = _quantized_copies(int8)
    activations = {node.input[0]: node.output[0] for node in fp32.graph.node if node.op_type in ("Relu", "Clip")}
    values = {v for call in compute for v in [v for v, _ in exits.get(call, [])] + entries.get(call, [])}
    pairs = {}  # fp32 value -> (its name in the fp32 graph, the int8 value compared with it)
    for value in values:
        if value in present:
            pairs[value] = (value, value)
        elif activations.get(value) in present:
            pairs[value] = (activations[value], quantized_copy.get(activations[value], activations[value]))
    fp32_names = sorted({name for name, _ in pairs.values()})
    int8_names = sorted({name for _, name in pairs.values()})
    reference = dict(zip(fp32_names, run_with_outputs(fp32, fp32_names, feed, ["CPUExecutionProvider"], None)))
    quantized = dict(zip(int8_names, run_with_outputs(int8, int8_names, feed, ["CPUExecutionProvider"], None)))
    sqnr = {value: sqnr_db(quantized[q], reference[f]) for value, (f, q) in pairs.items()}
    losses = []
    for call in compute:
        outs = [value for value, _ in exits.get(call, []) if value in sqnr]
        if not outs:
            continue
        before = min((sqnr.get(v, float("inf")) for v in entries.get(call, [])), default=float("inf"))
        after = min(sqnr[v] for v in outs)
        losses.append({"module": call[0], "call": call[1], "sqnr_in_db": before, "sqnr_out_db": after,
                       "loss_db": before - after})
    losses.sort(key=lambda entry: (-entry["loss_db"], entry["sqnr_out_db"]))
    return losses[:top]


def _quantized_copies(model: onnx.ModelProto) -> dict[str, str]:
    """Value -> the output of its QuantizeLinear -> DequantizeLinear pair, for values the quantizer quantized."""
    dequantized = {node.input[0]: node.output[0] for node in model.graph.node if node.op_type == "DequantizeLinear"}
    return {node.input[0]: dequantized[node.output[0]] for node in model.graph.node
            if node.op_type == "QuantizeLinear" and node.output[0] in dequantized}


def _entering_values(model: onnx.ModelProto, calls: set) -> dict:
    """Each module call -> the activation values its nodes read from outside it (initializers excluded)."""
    constants = {t.name for t in model.graph.initializer}
    produced_in: dict[str, set] = {}
    for node in model.graph.node:
        for output in node.output:
            produced_in[output] = set(node_module_calls(node))
    for graph_input in model.graph.input:
        produced_in[graph_input.name] = set()
    entering: dict = defaultdict(list)
    for node in model.graph.node:
        for call in set(node_module_calls(node)) & calls:
            for name in node.input:
                if name and name not in constants and name in produced_in and call not in produced_in[name]:
                    entering[call].append(name)
    return entering
