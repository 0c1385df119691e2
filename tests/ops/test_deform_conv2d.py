"""deploykit::DeformConv2d: the torch op against onnx.reference's DeformConv (the ONNX authors' implementation) and
our float64 formula; gradients; the exported node and its standard-op fallback in onnxruntime and onnx.reference;
the input-order mapping to TensorRT's own plugin."""

from __future__ import annotations

import random

import numpy as np
import onnx
import pytest
import torch
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from onnx.reference.ops.op_deform_conv import DeformConv

from deploykit.errors import DeployError
from deploykit.export.custom_op import DOMAIN, PLUGIN_NAMESPACE
from deploykit.export.onnx import onnx_from_model
from deploykit.export.passes import run_passes
from deploykit.ops.deform_conv2d import (DEFORM_CONV2D, INPUTS, SAMPLED_CONV_SUFFIX, TRT_OSS_INPUTS,
                                         TRT_PLUGIN_DOMAIN, deform_conv2d, deform_conv2d_reference, output_size,
                                         to_sampled_conv, to_trt_oss_plugin)
from deploykit.runtime.ort import session_from_onnx
from deploykit.verify import rel_to_range


def random_config(seed: int) -> dict:
    """Kernel 1/3/5, stride 1/2, dilation 1/2, weight groups 1/2/depthwise, offset groups 1/2, mask on/off,
    batch 1/3, non-square input, offsets large enough to push taps across the borders."""
    rng = random.Random(seed)
    channels = rng.choice([4, 8])
    kind = rng.choice(["dense", "grouped", "depthwise"])
    group = {"dense": 1, "grouped": 2, "depthwise": channels}[kind]
    return dict(channels=channels, out_channels=channels if kind == "depthwise" else rng.choice([4, 6]),
                kernel=rng.choice([1, 3, 5]), group=group, offset_group=rng.choice([1, 2]),
                stride=[rng.choice([1, 2]), rng.choice([1, 2])], dilation=[rng.choice([1, 2]), rng.choice([1, 2])],
                padding=[rng.randint(0, 2), rng.randint(0, 2)], masked=rng.random() < 0.7, batch=rng.choice([1, 3]),
                height=rng.randint(9, 13), width=rng.randint(9, 13), offset_scale=rng.choice([1.0, 3.0]))


def random_tensors(config: dict, seed: int = 0, dtype=torch.float32, batch: int | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    n, k, groups = batch or config["batch"], config["kernel"], config["offset_group"]
    out_h, out_w = output_size((config["height"], config["width"]), (k, k), config["stride"],
                               config["padding"] * 2, config["dilation"])
    return dict(
        input=torch.randn(n, config["channels"], config["height"], config["width"], generator=g, dtype=dtype),
        offset=config["offset_scale"] * torch.randn(n, 2 * groups * k * k, out_h, out_w, generator=g, dtype=dtype),
        weight=torch.randn(config["out_channels"], config["channels"] // config["group"], k, k, generator=g,
                           dtype=dtype),
        bias=torch.randn(config["out_channels"], generator=g, dtype=dtype),
        mask=torch.rand(n, groups * k * k, out_h, out_w, generator=g, dtype=dtype) if config["masked"] else None)


def call(config: dict, t: dict) -> torch.Tensor:
    return deform_conv2d(t["input"], t["offset"], t["weight"], t["bias"], config["stride"], config["padding"],
                         config["dilation"], t["mask"])


def onnx_reference(config: dict, t: dict) -> np.ndarray:
    """onnx.reference's DeformConv in float64 (mask omitted for v1, as the ONNX op allows)."""
    arrays = [None if t[k] is None else t[k].double().numpy() for k in ("input", "weight", "offset", "bias", "mask")]
    k = config["kernel"]
    return DeformConv.eval(*arrays, dilations=config["dilation"], group=config["group"], kernel_shape=[k, k],
                           offset_group=config["offset_group"], pads=config["padding"] * 2, strides=config["stride"])


CONFIGS = [random_config(seed) for seed in range(24)]


@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_op_matches_onnx_reference(index):
    config = CONFIGS[index]
    tensors = random_tensors(config, seed=index)
    expected = onnx_reference(config, tensors)
    actual = call(config, tensors).numpy()
    assert actual.shape == expected.shape
    assert rel_to_range(actual, expected) <= 1e-4
    # Our float64 formula agrees too (onnx.reference itself rounds through float32 coordinates: ~1e-6).
    mask = tensors["mask"] if tensors["mask"] is not None else torch.ones(
        tensors["offset"].shape[0], tensors["offset"].shape[1] // 2, *tensors["offset"].shape[2:])
    ours = deform_conv2d_reference(*(v.double().numpy() for v in (tensors["input"], tensors["weight"],
                                                                   tensors["offset"], tensors["bias"], mask)),
                                   config["stride"], config["padding"] * 2, config["dilation"], config["group"],
                                   config["offset_group"])
    assert rel_to_range(ours, expected) <= 1e-5


def test_configs_cover_the_borders_and_every_kind():
    """The randomized configs really sample outside the image, and span the option space."""
    config = dict(CONFIGS[0], offset_scale=3.0, kernel=3, padding=[1, 1])
    t = random_tensors(config)
    assert t["offset"].abs().max() > max(config["height"], config["width"]) / 4
    assert {c["kernel"] for c in CONFIGS} == {1, 3, 5} and {c["offset_group"] for c in CONFIGS} == {1, 2}
    assert {c["masked"] for c in CONFIGS} == {True, False} and {c["batch"] for c in CONFIGS} == {1, 3}
    assert any(c["group"] == c["channels"] for c in CONFIGS) and any(c["group"] == 2 for c in CONFIGS)


def test_zero_offsets_and_unit_mask_give_the_plain_convolution():
    config = dict(CONFIGS[2], masked=False)
    t = random_tensors(config)
    t["offset"].zero_()
    expected = torch.nn.functional.conv2d(t["input"], t["weight"], t["bias"], config["stride"], config["padding"],
                                          config["dilation"], config["group"])
    assert rel_to_range(call(config, t).numpy(), expected.numpy()) <= 1e-5


def test_gradients_match_finite_differences():
    config = dict(CONFIGS[5], batch=2, height=6, width=7, masked=True, kernel=3, padding=[1, 1], offset_scale=1.5)
    tensors = {k: v.requires_grad_() for k, v in random_tensors(config, dtype=torch.float64).items()}
    names = list(tensors)
    assert torch.autograd.gradcheck(lambda *t: call(config, dict(zip(names, t))), tuple(tensors.values()))


@pytest.mark.parametrize("bad, message", [
    (dict(offset=torch.randn(1, 17, 7, 7)), "offset has 17 channels"),
    (dict(offset=torch.randn(1, 18, 6, 7)), "offset"),
    (dict(mask=torch.rand(1, 8, 7, 7)), "mask"),
    (dict(weight=torch.randn(4, 3, 3, 3)), "weight"),
])
def test_shapes_that_do_not_fit_are_named(bad, message):
    t = dict(input=torch.randn(1, 4, 7, 7), offset=torch.randn(1, 18, 7, 7), weight=torch.randn(4, 4, 3, 3),
             mask=torch.rand(1, 9, 7, 7))
    t.update(bad)
    with pytest.raises(ValueError, match=message):
        deform_conv2d(t["input"], t["offset"], t["weight"], None, 1, 1, 1, t["mask"])


class Layer(torch.nn.Module):
    """The op with offsets and mask predicted from the input by a conv, as the pack layers do."""

    def __init__(self, config: dict, seed: int) -> None:
        super().__init__()
        self.config = config
        t = random_tensors(config, seed=seed, batch=1)
        self.weight = torch.nn.Parameter(t["weight"])
        self.bias = torch.nn.Parameter(t["bias"])
        k, groups = config["kernel"], config["offset_group"]
        self.predict = torch.nn.Conv2d(config["channels"], 3 * groups * k * k, k, config["stride"],
                                       config["padding"], config["dilation"])
        with torch.no_grad():
            self.predict.weight.mul_(config["offset_scale"] * 3)

    def forward(self, x):
        out = self.predict(x)
        split = 2 * self.config["offset_group"] * self.config["kernel"] ** 2
        mask = torch.sigmoid(out[:, split:]) if self.config["masked"] else None
        c = self.config
        return deform_conv2d(x, out[:, :split], self.weight, self.bias, c["stride"], c["padding"], c["dilation"], mask)


def deploykit_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == DOMAIN]


@pytest.mark.parametrize("lowering", ["custom", "standard"])
@pytest.mark.parametrize("index", [0, 3, 9, 16])
def test_export_runs_at_any_batch_in_onnxruntime_and_onnx_reference(index, lowering):
    config = CONFIGS[index]
    layer = Layer(config, index).eval()
    model, _ = run_passes(onnx_from_model(layer, random_tensors(config, batch=2)["input"], lowering=lowering))
    if lowering == "custom":
        [node] = deploykit_nodes(model)
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert node.op_type == "DeformConv2d" and attributes["plugin_namespace"] == PLUGIN_NAMESPACE.encode()
        assert list(attributes["pads"]) == config["padding"] * 2 and list(attributes["strides"]) == config["stride"]
        assert (attributes["group"], attributes["offset_group"]) == (config["group"], config["offset_group"])
        [function] = model.functions
        [body] = function.node
        assert body.op_type == "DeformConv" and list(body.input) == list(function.input) == list(INPUTS)
    else:
        assert not deploykit_nodes(model) and "DeformConv" not in {n.op_type for n in model.graph.node}
    session = session_from_onnx(model, ["cpu"])
    evaluator = ReferenceEvaluator(model)
    for batch in (1, 2, 5):
        x = random_tensors(config, seed=batch, batch=batch)["input"]
        with torch.no_grad():
            expected = layer(x).numpy()
        assert rel_to_range(session.run(None, {"input": x.numpy()})[0], expected) <= 1e-4
        assert rel_to_range(evaluator.run(None, {"input": x.numpy()})[0], expected) <= 1e-4


def test_opset_18_falls_back_to_standard_ops_and_refuses_the_node():
    config = CONFIGS[1]
    layer = Layer(config, 1).eval()
    x = random_tensors(config, batch=2)["input"]
    model, _ = run_passes(onnx_from_model(layer, x, opset=18))
    assert not deploykit_nodes(model) and model.opset_import[0].version == 18
    with torch.no_grad():
        expected = layer(x).numpy()
    assert rel_to_range(session_from_onnx(model, ["cpu"]).run(None, {"input": x.numpy()})[0], expected) <= 1e-4
    with pytest.raises(DeployError, match="needs opset >= 19"):
        onnx_from_model(layer, x, opset=18, lowering="custom")


class ModulatedDeformConv2d(OpRun):
    """TensorRT's OSS plugin as documented: inputs (x, offset, mask, weight, bias), one padding per axis."""

    op_domain = TRT_PLUGIN_DOMAIN

    def _run(self, x, offset, mask, weight, bias, stride=None, padding=None, dilation=None, group=None,
             deformable_group=None):
        y = deform_conv2d_reference(x, weight, offset, bias, mask, stride, [*padding, *padding], dilation, group,
                                    deformable_group)
        return (y.astype(x.dtype),)


@pytest.mark.parametrize("index", [0, 4, 9])
def test_mapping_to_tensorrts_own_plugin_keeps_the_meaning(index):
    """The input orders differ (ONNX: X, W, offset, B, mask; TensorRT: x, offset, mask, weight, bias): the rewritten
    graph must compute what ONNX's DeformConv computes."""
    config = dict(CONFIGS[index], masked=True)
    layer = Layer(config, index).eval()
    model, _ = run_passes(onnx_from_model(layer, random_tensors(config, batch=2)["input"]))
    x = random_tensors(config, seed=7, batch=3)["input"].numpy()
    expected = ReferenceEvaluator(model).run(None, {"input": x})[0]
    [node] = deploykit_nodes(model)
    by_name = dict(zip(INPUTS, node.input))
    plugin_model = to_trt_oss_plugin(model)
    [plugin] = [n for n in plugin_model.graph.node if n.domain == TRT_PLUGIN_DOMAIN]
    assert list(plugin.input) == [by_name[name] for name in TRT_OSS_INPUTS]
    assert list(plugin.input) == [by_name[name] for name in ("X", "offset", "mask", "W", "B")]
    actual = ReferenceEvaluator(plugin_model, new_ops=[ModulatedDeformConv2d]).run(None, {"input": x})[0]
    assert rel_to_range(actual, expected) <= 1e-5


def test_tensorrt_plugin_mapping_refuses_asymmetric_pads():
    model = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("DeformConv2d", list(INPUTS), ["Y"], domain=DOMAIN, strides=[1, 1], pads=[1, 1, 0, 0],
                               dilations=[1, 1], group=1, offset_group=1)], "g", [], []))
    with pytest.raises(ValueError, match="symmetric pads"):
        to_trt_oss_plugin(model)


def test_is_registered_for_export():
    from deploykit.variants import custom_ops

    assert DEFORM_CONV2D in custom_ops() and DEFORM_CONV2D.min_opset == 19 and not DEFORM_CONV2D.prefer_standard


@pytest.mark.parametrize("index", range(0, len(CONFIGS), 2))
def test_sampled_conv_form_matches_the_float64_formula(index):
    """The int8 file's form (GridSample taps + a 1x1 Conv, `to_sampled_conv`) computes the op at any batch and
    input size, taps across the borders included."""
    config = CONFIGS[index]
    layer = Layer(config, index).eval()
    model, _ = run_passes(onnx_from_model(layer, random_tensors(config, batch=2)["input"], dynamic_spatial=True))
    [node] = deploykit_nodes(model)
    nodes = to_sampled_conv(model, node)
    assert not deploykit_nodes(model) and nodes[-1].op_type == "Conv" and nodes[-1].name.endswith(SAMPLED_CONV_SUFFIX)
    assert "GridSample" in {n.op_type for n in nodes} and node.input[1] not in {t.name for t in model.graph.initializer}
    assert any(n.name.endswith("/modulated") for n in nodes) == config["masked"]  # v1's ones are not multiplied
    session = session_from_onnx(model, ["cpu"])
    for batch, grow in ((1, 0), (3, 2)):
        grown = dict(config, height=config["height"] + grow, width=config["width"] + 2 * grow)
        x = random_tensors(grown, seed=batch, batch=batch)["input"]
        with torch.no_grad():
            out = layer.predict(x)
        split = 2 * config["offset_group"] * config["kernel"] ** 2
        mask = torch.sigmoid(out[:, split:]) if config["masked"] else torch.ones_like(out[:, split:])
        expected = deform_conv2d_reference(x.double().numpy(), layer.weight.detach().double().numpy(),
                                           out[:, :split].double().numpy(), layer.bias.detach().double().numpy(),
                                           mask.double().numpy(), config["stride"], config["padding"] * 2,
                                           config["dilation"], config["group"], config["offset_group"])
        assert rel_to_range(session.run(None, {"input": x.numpy()})[0], expected) <= 1e-4


def test_sampled_conv_form_survives_the_graph_passes_at_a_static_size():
    """With a static input size the passes fold the form's shape arithmetic; the folded file still computes the op
    (graphsurgeon's folding once mis-read a ``Shape`` with ``start``)."""
    config = dict(CONFIGS[3], height=12, width=9)
    layer = Layer(config, 3).eval()
    x = random_tensors(config, batch=2)["input"]
    model, _ = run_passes(onnx_from_model(layer, x))
    [node] = deploykit_nodes(model)
    to_sampled_conv(model, node)
    folded, _ = run_passes(model)
    with torch.no_grad():
        expected = layer(x).numpy()
    assert rel_to_range(session_from_onnx(folded, ["cpu"]).run(None, {"input": x.numpy()})[0], expected) <= 1e-4
