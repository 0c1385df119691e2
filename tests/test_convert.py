"""`deploykit.convert`: users' models written with official / third-party layer classes become deploykit models.

For every recognised class, a stand-in written from references.md (``tests/convert_standins.py``) sits in a small
nested user model with random weights everywhere (also in the parts the official code initialises to zeros or
ones). The converted model must name every swapped path, compute what the original computes in float64 at batch 1
and 3, leave the original untouched, and export with a dynamic batch that onnxruntime runs at batch 1 and 3 from
one file within 1e-4 of the range of the original's float64 output.
"""

from __future__ import annotations

import copy
import json
import math
import random
import threading
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convert_standins as sa
from conftest import assert_one_sentence, random_conv_config, randomize_batchnorm
from deploykit import nn as dk
from deploykit.conversion import LeftAlone, Swap, convert, export_translations
from deploykit.errors import DeployError
from deploykit.export.onnx import onnx_from_model
from deploykit.runtime.ort import session_from_onnx
from deploykit.verify import rel_to_range


# --- user models, one per family -----------------------------------------------------------------------------

class ODNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(sa.ODConv2d(8, 8, 3, padding=1, kernel_num=4), nn.ReLU(),
                                  sa.ODConv2d(8, 8, 3, stride=2, padding=1, groups=8, kernel_num=2),  # depthwise
                                  sa.ODConv2d(8, 6, 1, kernel_num=1))  # the official 1x1 single-kernel path
        self.body[0].update_temperature(4.0)  # the official default is 1

    def forward(self, x):
        return self.body(self.stem(x))


class DyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(sa.Dynamic_conv2d(3, 8, 3, padding=1), nn.ReLU(),  # in_planes 3: hidden = K
                                      sa.Dynamic_conv2d(8, 6, 3, stride=2, padding=2, dilation=2, K=3, bias=False,
                                                        temperature=7))
        self.features[0].attention.temperature = 10  # the official default is 34

    def forward(self, x):
        return self.features(x)


class CondNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = sa.CondConvBlock(4)

    def forward(self, x):
        return self.block(F.relu(self.stem(x)))


class TVNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 1), sa.TVConv(4, h=8, w=8, TVConv_inter_chans=6, TVConv_Bias=True),
                                 nn.ReLU(), sa.TVConv(4, TVConv_k=5, stride=2, TVConv_inter_layers=0, h=4, w=4))

    def forward(self, x):
        return self.net(x)


class ACNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.mix = nn.Sequential(sa.ACmix(8, 8, kernel_att=3, head=2), nn.ReLU(),
                                 sa.ACmix(8, 8, kernel_att=5, head=4, stride=2))

    def forward(self, x):
        return self.mix(self.stem(x))


class DCNNet(nn.Module):
    """mmcv's pack layers, then an offset/mask conv feeding mmcv's and torchvision's offset-input layers."""

    def __init__(self):
        super().__init__()
        self.v2 = sa.ModulatedDeformConv2dPack(3, 8, 3, padding=1)
        self.v1 = sa.DeformConv2dPack(8, 8, 3, stride=2, padding=1, groups=2, deform_groups=2)
        self.offset = nn.Conv2d(8, 3 * 2 * 9, 3, padding=1)  # offsets and mask logits, 2 offset groups
        self.heads = nn.ModuleDict({"mmcv_v1": sa.DeformConv2d(8, 4, 3, padding=1, deform_groups=2),
                                    "mmcv_v2": sa.ModulatedDeformConv2d(8, 4, 3, padding=1, deform_groups=2),
                                    "tv": sa.TorchvisionDeformConv2d(8, 4, 3, padding=1, groups=2)})

    def forward(self, x):
        x = F.relu(self.v1(F.relu(self.v2(x))))
        predicted = self.offset(x)
        offset, mask = predicted[:, :36], torch.sigmoid(predicted[:, 36:])
        return torch.cat([self.heads["mmcv_v1"](x, offset), self.heads["mmcv_v2"](x, offset, mask),
                          self.heads["tv"](x, offset, mask)], dim=1)


# family -> (model, input [C, H, W], swapped path -> deploykit class)
FAMILIES = {
    "odconv": (ODNet, (3, 9, 10), {"body.0": dk.ODConv2d, "body.2": dk.ODConv2d, "body.3": dk.ODConv2d}),
    "dyconv": (DyNet, (3, 9, 10), {"features.0": dk.DyConv2d, "features.2": dk.DyConv2d}),
    "condconv": (CondNet, (3, 9, 11), {"block.conv_pw": dk.CondConv2d, "block.conv_dw": dk.CondConv2d,
                                       "block.conv_pwl": dk.CondConv2d}),
    "tvconv": (TVNet, (3, 8, 8), {"net.1": dk.TVConv, "net.3": dk.TVConv}),
    "acmix": (ACNet, (3, 8, 8), {"mix.0": dk.ACmix, "mix.2": dk.ACmix}),
    "deform_conv": (DCNNet, (3, 9, 9), {"v2": dk.ModulatedDeformConv2d, "v1": dk.DeformConv2d,
                                        "heads.mmcv_v1": dk.OffsetInputDeformConv2d,
                                        "heads.mmcv_v2": dk.OffsetInputDeformConv2d,
                                        "heads.tv": dk.OffsetInputDeformConv2d}),
}


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights in every parameter (also offset convs and affinity maps, which start at zeros / ones), about
    1/sqrt(fan-in) in size; random BatchNorm statistics; offsets large enough to cross pixels and borders."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module_name, module in model.named_modules():
            for name, parameter in module.named_parameters(recurse=False):
                if isinstance(module, sa.CondConv2d) and name == "weight":  # flat expert kernels
                    fan_in = math.prod(module.weight_shape[1:])
                else:  # kernel banks [K, out, in, k, k] and plain kernels [out, in, k, k]
                    fan_in = parameter[(0,) * (parameter.dim() - 4)][0].numel() if parameter.dim() > 1 else 4
                scale = fan_in ** -0.5 * (3 if "offset" in f"{module_name}.{name}" else 1)
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return randomize_batchnorm(model, generator).eval()


def family_model(family: str, dtype=torch.float64) -> nn.Module:
    return randomized(FAMILIES[family][0]().to(dtype))


def family_input(family: str, batch: int, dtype=torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(batch)
    shape = (batch, *FAMILIES[family][1])
    ramp = torch.linspace(-1, 1, shape[-1]).expand(shape)  # structure plus noise plus a mean, never constant
    return (ramp + torch.randn(shape, generator=generator) + 0.3).to(dtype)


def state_of(model: nn.Module) -> dict:
    return {key: value.clone() for key, value in model.state_dict().items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_layer_is_swapped_and_computes_the_same_in_float64(family):
    model = family_model(family)
    before, types = state_of(model), {name: type(m) for name, m in model.named_modules()}
    conversion = convert(model)

    expected = FAMILIES[family][2]
    assert {s.path: s.target for s in conversion.swaps} == {
        path: f"{cls.__module__}.{cls.__qualname__}" for path, cls in expected.items()}
    assert conversion.left_alone == []
    converted = dict(conversion.model.named_modules())
    for swap in conversion.swaps:
        original = model.get_submodule(swap.path)
        assert swap.source == f"{type(original).__module__}.{type(original).__name__}"
        assert not swap.source.startswith("deploykit")
        assert type(converted[swap.path]) is expected[swap.path]
        assert not converted[swap.path].training
    for batch in (1, 3):
        x = family_input(family, batch)
        with torch.no_grad():
            expected_y, actual_y = model(x), conversion.model(x)
        assert expected_y.std() > 1e-3 * expected_y.abs().max() > 0  # not constant, not zero
        assert rel_to_range(actual_y.numpy(), expected_y.numpy()) <= 1e-10, batch

    # The original is untouched: same classes, same tensors.
    assert {name: type(m) for name, m in model.named_modules()} == types
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_model_exports_with_a_dynamic_batch(family):
    """One export per family, traced at batch 2; onnxruntime at batch 1 and 3 vs the original model in float64."""
    reference = family_model(family)
    deployable = convert(family_model(family, torch.float32)).model
    onnx_model = onnx_from_model(deployable, family_input(family, 2, torch.float32))
    assert onnx_model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    session = session_from_onnx(onnx_model, ["cpu"])
    for batch in (1, 3):
        with torch.no_grad():
            expected = reference(family_input(family, batch)).numpy()
        actual = session.run(None, {"input": family_input(family, batch, torch.float32).numpy()})[0]
        assert rel_to_range(actual, expected) <= 1e-4, batch


def random_layer(family: str, seed: int) -> tuple[nn.Module, Callable[[int], tuple[torch.Tensor, ...]]]:
    """One stand-in layer of a random configuration (conftest's conv shapes where they apply) and its inputs."""
    rng = random.Random(seed)
    c = random_conv_config(seed)
    k, s, d, g = c["kernel"], c["stride"], c["dilation"], c["groups"]
    size = (c["height"], c["width"])
    if family == "odconv":
        layer = sa.ODConv2d(c["in_channels"], c["out_channels"], k, s, d * (k // 2), d, g, kernel_num=c["experts"])
        layer.update_temperature(rng.uniform(0.5, 5))
    elif family == "dyconv":  # the official forward runs with groups=1 only
        layer = sa.Dynamic_conv2d(c["in_channels"], c["out_channels"], k, stride=s, padding=rng.randint(0, 2),
                                  dilation=d, bias=rng.random() < 0.5, K=c["experts"],
                                  temperature=rng.choice([1, 4, 31, 34]))
    elif family == "condconv":
        layer = sa.CondConv2d(c["in_channels"], c["out_channels"], k, s, rng.choice(["", "same", "valid", 1]), d, g,
                              bias=rng.random() < 0.5, num_experts=c["experts"])
    elif family == "deform_conv":
        pack = rng.choice([sa.DeformConv2dPack, sa.ModulatedDeformConv2dPack])
        layer = pack(c["in_channels"], c["out_channels"], k, s, rng.randint(0, 2), d, g,
                     deform_groups=rng.choice([1, 2]) if c["in_channels"] % 2 == 0 else 1,
                     bias=pack is sa.ModulatedDeformConv2dPack and rng.random() < 0.5)
    elif family == "tvconv":
        stride, size = rng.choice([1, 2]), (rng.randint(3, 6), rng.randint(3, 6))
        layer = sa.TVConv(c["in_channels"], rng.choice([1, 3, 5]), stride, rng.randint(1, 4), rng.randint(2, 6),
                          rng.randint(0, 2), rng.random() < 0.5, *size)
        size = (size[0] * stride, size[1] * stride)
    else:  # acmix: sizes divisible by the stride and above the reflection padding
        head, kernel_att, stride = rng.choice([1, 2, 4]), rng.choice([1, 3, 5]), rng.choice([1, 2])
        layer = sa.ACmix(c["in_channels"], head * rng.randint(1, 3), kernel_att, head, 3, stride)
        size = (2 * rng.randint(2, 5), 2 * rng.randint(2, 5))
    layer = randomized(layer.double())
    experts = c["experts"]

    def inputs(batch: int) -> tuple[torch.Tensor, ...]:
        generator = torch.Generator().manual_seed(seed + batch)
        x = torch.randn(batch, c["in_channels"], *size, generator=generator, dtype=torch.float64) + 0.2
        if family != "condconv":
            return (x,)
        return x, torch.sigmoid(torch.randn(batch, experts, generator=generator, dtype=torch.float64))

    return layer, inputs


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("family", FAMILIES)
def test_random_layer_configurations_convert_exactly(family, seed):
    layer, inputs = random_layer(family, seed)
    conversion = convert(layer)
    assert len(conversion.swaps) == 1 and conversion.left_alone == []
    for batch in (1, 3):
        with torch.no_grad():
            expected, actual = layer(*inputs(batch)), conversion.model(*inputs(batch))
        assert expected.std() > 0
        assert rel_to_range(actual.numpy(), expected.numpy()) <= 1e-10, batch


def test_temperatures_are_carried_over():
    od = convert(family_model("odconv")).model
    dy = convert(family_model("dyconv")).model
    assert [m.attention.temperature for m in od.body if isinstance(m, dk.ODConv2d)] == [4.0, 1.0, 1.0]
    assert [m.temperature for m in dy.features if isinstance(m, dk.DyConv2d)] == [10, 7]


# --- look-alikes -----------------------------------------------------------------------------------------------

class ODConv2d(nn.Conv2d):
    """A user's own class that happens to share ODConv's name: a plain conv."""


class Dynamic_conv2d(sa.Dynamic_conv2d):  # noqa: N801
    """Named like DY-CNN's layer, with one kernel instead of a bank."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight = nn.Parameter(self.weight[0].detach().clone())


class LookAlikes(nn.Module):
    def __init__(self):
        super().__init__()
        self.plain = ODConv2d(3, 4, 3)
        self.single = Dynamic_conv2d(3, 4, 3)
        self.inner = nn.Sequential(sa.ACmix(4, 4, kernel_att=3, head=2, kernel_conv=5),  # dep_conv pads 1, not 2
                                   sa.ModulatedDeformConv2dPack(4, 4, 3, padding=1))
        self.inner[1].conv_offset.stride = (2, 2)
        self.real = sa.ODConv2d(4, 4, 3, padding=1)


@pytest.mark.parametrize("path, reason", [
    ("plain", "it has no attribute `attention`"),
    ("single", "its `weight` is (4, 3, 3, 3), not (4, 4, 3, 3, 3)"),
    ("inner.0", "its `dep_conv` pads by (1, 1), not kernel_conv // 2 = 2"),
    ("inner.1", "its `conv_offset` has stride (2, 2), not the layer's (1, 1)"),
])
def test_look_alikes_are_left_alone_with_the_reason(path, reason):
    model = LookAlikes()
    conversion = convert(model)
    left = {entry.path: entry for entry in conversion.left_alone}
    assert set(left) == {"plain", "single", "inner.0", "inner.1"}
    assert left[path].reason == reason
    original = type(model.get_submodule(path))
    assert left[path].source == f"{original.__module__}.{original.__name__}"
    assert type(conversion.model.get_submodule(path)) is original
    assert [s.path for s in conversion.swaps] == ["real"]  # the real one next to them is still swapped


def test_a_rule_says_why_a_layer_does_not_fit():
    from deploykit.ops.odconv import SPEC

    rule, = SPEC.conversions
    assert rule.fits(sa.ODConv2d(4, 4, 3)) is None
    assert rule.fits(ODConv2d(3, 4, 3)) == "it has no attribute `attention`"
    bigger_trunk = sa.ODConv2d(4, 4, 3)
    bigger_trunk.attention.bn = nn.BatchNorm2d(32)  # the width the conv before it has is read from attention.fc
    assert rule.fits(bigger_trunk) == "its `attention.bn.weight` is (32,), not (16,)"


def test_deploykit_modules_and_unrelated_layers_are_not_swapped():
    model = nn.Sequential(dk.ODConv2d(4, 4, 3), dk.DeformConv2d(4, 4, 3), dk.TVConv(4), nn.Conv2d(4, 4, 1))
    conversion = convert(model)
    assert conversion.swaps == [] and conversion.left_alone == []
    assert [type(m) for m in conversion.model] == [type(m) for m in model]


def test_inplace_keeps_the_object_the_mode_sharing_and_frozen_parameters():
    layer = sa.ODConv2d(4, 4, 3, padding=1)
    layer.attention.fc.weight.requires_grad_(False)
    model = nn.Sequential(layer, nn.ReLU(), layer).train()  # one layer used twice
    conversion = convert(model, inplace=True)
    assert conversion.model is model
    assert [s.path for s in conversion.swaps] == ["0", "2"]
    assert model[0] is model[2] and isinstance(model[0], dk.ODConv2d)
    assert model.training and model[0].training
    assert not model[0].attention.fc.weight.requires_grad and model[0].weight.requires_grad


def test_a_model_that_cannot_be_copied_is_refused_in_one_sentence_or_converted_in_place():
    model = nn.Sequential(sa.ODConv2d(4, 4, 3))
    model.lock = threading.Lock()  # deepcopy cannot copy it
    with pytest.raises(DeployError) as caught:
        convert(model)
    assert_one_sentence(caught.value, "deep-copied", "inplace=True")
    assert isinstance(model[0], sa.ODConv2d)
    assert isinstance(convert(model, inplace=True).model[0], dk.ODConv2d)


def test_a_recognised_model_itself_is_swapped_and_the_report_is_plain_data():
    conversion = convert(sa.TorchvisionDeformConv2d(4, 4, 3))
    assert isinstance(conversion.model, dk.OffsetInputDeformConv2d)
    assert conversion.swaps == [Swap("", "torchvision.ops.deform_conv.DeformConv2d",
                                     "deploykit.nn.deform_conv.OffsetInputDeformConv2d")]
    report = json.loads(json.dumps(convert(LookAlikes()).as_dict()))
    assert report["swaps"] == [{"path": "real", "source": "modules.odconv.ODConv2d",
                                "target": "deploykit.nn.odconv.ODConv2d"}]
    assert LeftAlone(**report["left_alone"][0]).path == "plain"


# --- torchvision's functional deform_conv2d --------------------------------------------------------------------

@pytest.fixture
def torchvision_op():
    library = sa.register_torchvision_op()
    yield torch.ops.torchvision.deform_conv2d.default
    library._destroy()
    assert export_translations() == {}, "the stand-in op is removed again"


class FunctionalDCN(nn.Module):
    """User code calling torchvision.ops.deform_conv2d: v2 with bias, then v1 without bias, grouped, stride 2."""

    def __init__(self):
        super().__init__()
        self.offset1 = nn.Conv2d(3, 3 * 9, 3, padding=1)
        self.weight1, self.bias1 = nn.Parameter(torch.empty(6, 3, 3, 3)), nn.Parameter(torch.empty(6))
        self.offset2 = nn.Conv2d(6, 2 * 2 * 9, 3, stride=2, padding=1)
        self.weight2 = nn.Parameter(torch.empty(4, 3, 3, 3))

    def forward(self, x):
        predicted = self.offset1(x)
        y = sa.torchvision_deform_conv2d(x, predicted[:, :18], self.weight1, self.bias1, padding=1,
                                         mask=torch.sigmoid(predicted[:, 18:]))
        return sa.torchvision_deform_conv2d(y, self.offset2(y), self.weight2, stride=2, padding=(1, 1))


def test_export_translations_are_empty_without_torchvision():
    assert export_translations() == {}


@pytest.mark.parametrize("opset", [20, 18])
def test_torchvision_functional_exports_as_deploykit_deform_conv(torchvision_op, opset):
    """Opset 20: two ``deploykit::DeformConv2d`` nodes (ONNX DeformConv inside); 18: the standard-op lowering."""
    assert set(export_translations()) == {torchvision_op}
    reference = randomized(FunctionalDCN().double())
    deployable = copy.deepcopy(reference).float()
    x = (torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(2)) + 0.3)
    onnx_model = onnx_from_model(deployable, x, opset=opset)
    custom = [n for n in onnx_model.graph.node if n.domain == "deploykit"]
    assert [n.op_type for n in custom] == (["DeformConv2d"] * 2 if opset >= 19 else [])
    assert not any(n.domain == "torchvision" for n in onnx_model.graph.node)
    session = session_from_onnx(onnx_model, ["cpu"])
    for batch in (1, 3):
        x = torch.randn(batch, 3, 9, 9, generator=torch.Generator().manual_seed(batch)) + 0.3
        with torch.no_grad():
            expected = reference(x.double()).numpy()
        assert np.abs(expected).max() > 0.1
        assert rel_to_range(session.run(None, {"input": x.numpy()})[0], expected) <= 1e-4, batch
