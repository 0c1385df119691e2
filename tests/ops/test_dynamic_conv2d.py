"""deploykit::DynamicConv2d: the torch op against the float64 formula, its ONNX node against the torch op."""

from __future__ import annotations

import random

import numpy as np
import onnx
import pytest
import torch
from onnx.reference import ReferenceEvaluator

from deploykit.export.custom_op import DOMAIN, PLUGIN_NAMESPACE
from deploykit.export.onnx import onnx_from_model
from deploykit.export.passes import run_passes
from deploykit.ops.dynamic_conv2d import (DYNAMIC_CONV2D, DynamicConv2dReference, dynamic_conv2d,
                                          dynamic_conv2d_reference, to_bank_conv)
from deploykit.runtime.ort import session_from_onnx
from deploykit.verify import rel_to_range


def random_config(seed: int) -> dict:
    """Kernel 1/3/5, stride 1/2, dilation 1/2, groups 1/2/depthwise, K 1/4/8, batch 1/3, non-square, asymmetric pads."""
    rng = random.Random(seed)
    kernel = rng.choice([1, 3, 5])
    channels = rng.choice([4, 6, 8])
    kind = rng.choice(["dense", "grouped", "depthwise"])
    groups = {"dense": 1, "grouped": 2, "depthwise": channels}[kind]
    out_channels = channels if kind == "depthwise" else rng.choice([4, 6, 10])
    pads = [rng.randint(0, kernel // 2 + 1) for _ in range(4)]
    return dict(channels=channels, out_channels=out_channels, kernel=kernel, groups=groups,
                stride=[rng.choice([1, 2]), rng.choice([1, 2])], dilation=[rng.choice([1, 2]), rng.choice([1, 2])],
                pads=pads, experts=rng.choice([1, 4, 8]), batch=rng.choice([1, 3]),
                height=rng.randint(9, 14), width=rng.randint(9, 14), spatial_per_sample=rng.random() < 0.5)


def random_inputs(config: dict, batch: int | None = None, seed: int = 0, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    n, k, e = batch or config["batch"], config["kernel"], config["experts"]
    return dict(
        x=torch.randn(n, config["channels"], config["height"], config["width"], generator=g, dtype=dtype),
        weight=torch.randn(e, config["out_channels"], config["channels"] // config["groups"], k, k, generator=g,
                           dtype=dtype),
        attention=torch.softmax(torch.randn(n, e, generator=g, dtype=dtype) * 2, dim=1),
        bias=torch.randn(e, config["out_channels"], generator=g, dtype=dtype),
        spatial=torch.sigmoid(torch.randn(n if config["spatial_per_sample"] else 1, k, k, generator=g, dtype=dtype)))


def expected_size(config: dict) -> list[int]:
    k, s, d, p = config["kernel"], config["stride"], config["dilation"], config["pads"]
    return [(size + p[i] + p[i + 2] - d[i] * (k - 1) - 1) // s[i] + 1
            for i, size in enumerate((config["height"], config["width"]))]


def call(config: dict, inputs: dict) -> torch.Tensor:
    return dynamic_conv2d(inputs["x"], inputs["weight"], inputs["attention"], inputs["bias"], inputs["spatial"],
                          config["stride"], config["pads"], config["dilation"], config["groups"])


def reference(config: dict, inputs: dict) -> np.ndarray:
    return dynamic_conv2d_reference(*(inputs[k].double().numpy() for k in ("x", "weight", "attention", "bias",
                                                                             "spatial")),
                                    config["stride"], config["pads"], config["dilation"], config["groups"])


CONFIGS = [random_config(seed) for seed in range(24)]


@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_op_matches_float64_formula(index):
    config = CONFIGS[index]
    inputs = random_inputs(config, seed=index)
    actual = call(config, inputs).numpy()
    expected = reference(config, inputs)
    assert actual.shape == expected.shape
    assert rel_to_range(actual, expected) <= 1e-5


def test_gradients_match_finite_differences():
    config = dict(CONFIGS[3], batch=2, height=6, width=7)
    inputs = {k: v.requires_grad_() for k, v in random_inputs(config, dtype=torch.float64).items()}
    assert torch.autograd.gradcheck(lambda *t: call(config, dict(zip(inputs, t))), tuple(inputs.values()))


class Layer(torch.nn.Module):
    """The op with its tensors as parameters, attention computed from the input (so the batch varies)."""

    def __init__(self, config: dict, seed: int, unit_taps: bool = False) -> None:
        super().__init__()
        self.config, self.unit_taps = config, unit_taps
        tensors = random_inputs(config, batch=1, seed=seed)
        self.weight = torch.nn.Parameter(tensors["weight"])
        self.bias = torch.nn.Parameter(tensors["bias"])
        self.route = torch.nn.Linear(config["channels"], config["experts"])
        self.taps = torch.nn.Linear(config["channels"], config["kernel"] ** 2)

    def attentions(self, x):
        """(kernel attention A [N, K], tap attention S) computed from `x`."""
        pooled = x.mean((2, 3))
        k = self.config["kernel"]
        spatial = torch.ones(1, k, k) if self.unit_taps else torch.sigmoid(self.taps(pooled)).view(-1, k, k)
        return torch.softmax(self.route(pooled), 1), spatial

    def forward(self, x):
        attention, spatial = self.attentions(x)
        return torch.relu(dynamic_conv2d(x, self.weight, attention, self.bias, spatial, self.config["stride"],
                                         self.config["pads"], self.config["dilation"], self.config["groups"]))


@pytest.mark.parametrize("index", [0, 5, 11])
def test_export_runs_at_any_batch_from_one_file(index):
    config = CONFIGS[index]
    layer = Layer(config, index).eval()
    example = random_inputs(config, batch=2)["x"]
    model, _ = run_passes(onnx_from_model(layer, example, custom_ops=[DYNAMIC_CONV2D]))
    [node] = [n for n in model.graph.node if n.domain == DOMAIN]
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert node.op_type == "DynamicConv2d" and list(node.input)[1:2] == ["weight"]
    assert attributes["plugin_namespace"] == PLUGIN_NAMESPACE.encode() and attributes["group"] == config["groups"]
    assert list(attributes["pads"]) == config["pads"] and list(attributes["strides"]) == config["stride"]
    assert [(f.domain, f.name) for f in model.functions] == [(DOMAIN, "DynamicConv2d")]
    # ONNX shape inference alone (the exporter's own value_info removed) sees through the node's body.
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    del bare.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(bare, strict_mode=True, data_prop=True).graph.value_info
    inferred = {v.name: v for v in inferred}
    dims = [d.dim_param or d.dim_value for d in inferred[node.output[0]].type.tensor_type.shape.dim]
    assert dims == ["batch", config["out_channels"], *expected_size(config)]
    session = session_from_onnx(model, ["cpu"])
    evaluator = ReferenceEvaluator(model, new_ops=[DynamicConv2dReference])
    for batch in (1, 2, 5):
        x = random_inputs(config, batch=batch, seed=batch)["x"]
        with torch.no_grad():
            expected = layer(x).numpy()
        assert rel_to_range(session.run(None, {"input": x.numpy()})[0], expected) <= 1e-4
        assert rel_to_range(evaluator.run(None, {"input": x.numpy()})[0], expected) <= 1e-4


def test_static_batch_folds_into_standard_ops_unless_custom_is_asked():
    config = CONFIGS[7]
    layer = Layer(config, 7).eval()
    x = random_inputs(config, batch=3)["x"]
    with torch.no_grad():
        expected = layer(x).numpy()
    folded, _ = run_passes(onnx_from_model(layer, x, dynamic_batch=False, custom_ops=[DYNAMIC_CONV2D]))
    assert not [n for n in folded.graph.node if n.domain] and not folded.functions
    [conv] = [n for n in folded.graph.node if n.op_type == "Conv"]
    assert {a.name: a.i for a in conv.attribute}["group"] == config["groups"] * 3
    assert rel_to_range(session_from_onnx(folded, ["cpu"]).run(None, {"input": x.numpy()})[0], expected) <= 1e-4
    custom, _ = run_passes(onnx_from_model(layer, x, dynamic_batch=False, custom_ops=[DYNAMIC_CONV2D],
                                           lowering="custom"))
    assert [n.op_type for n in custom.graph.node if n.domain] == ["DynamicConv2d"]
    assert rel_to_range(session_from_onnx(custom, ["cpu"]).run(None, {"input": x.numpy()})[0], expected) <= 1e-4


DENSE = [i for i, config in enumerate(CONFIGS) if config["groups"] == 1]


@pytest.mark.parametrize("unit_taps", [False, True], ids=["tap-attention", "no-taps"])
@pytest.mark.parametrize("index", DENSE)
def test_bank_conv_form_matches_the_float64_formula(index, unit_taps):
    """The int8 file's form for weight-bound layers (`to_bank_conv`: the whole bank as one static conv, its K
    outputs mixed per sample; taps gathered and scaled first when there is tap attention) computes the op at any
    batch and input size."""
    config = CONFIGS[index]
    layer = Layer(config, index, unit_taps).eval()
    model, _ = run_passes(onnx_from_model(layer, random_inputs(config, batch=2)["x"], dynamic_spatial=True,
                                          custom_ops=[DYNAMIC_CONV2D]))
    [node] = [n for n in model.graph.node if n.domain == DOMAIN]
    nodes = to_bank_conv(model, node)
    assert not [n for n in model.graph.node if n.domain]
    assert {n.op_type for n in nodes} >= {"Conv", "MatMul"} and ("Slice" in {n.op_type for n in nodes}) != unit_taps
    assert not {node.input[1], node.input[4]} & {t.name for t in model.graph.initializer}
    session = session_from_onnx(model, ["cpu"])
    for batch, grow in ((1, 0), (3, 3)):
        grown = dict(config, height=config["height"] + grow, width=config["width"] + 2 * grow)
        x = random_inputs(grown, batch=batch, seed=batch)["x"]
        with torch.no_grad():
            attention, spatial = layer.attentions(x)
        expected = np.maximum(dynamic_conv2d_reference(
            x.double().numpy(), layer.weight.detach().double().numpy(), attention.double().numpy(),
            layer.bias.detach().double().numpy(), spatial.double().numpy(), config["stride"], config["pads"],
            config["dilation"], config["groups"]), 0)
        assert rel_to_range(session.run(None, {"input": x.numpy()})[0], expected) <= 1e-4
