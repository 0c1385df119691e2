"""Property tests of the DynamicConv2d family: the ``deploykit::dynamic_conv2d`` op itself and the CondConv, DyConv
and ODConv modules, each against its float64 reference (deploykit/ops/<variant>.py), and grouped dynamic-batch
exports against onnxruntime. Drawn: kernel (non-square for the op), stride, dilation, (asymmetric) padding, groups
incl. depthwise and multipliers, channels, experts K 1-8, temperature, bias, batch 1-4, sizes from the minimum."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from deploykit.nn import CondConv2d, CondConvRouting, DyConv2d, ODConv2d
from deploykit.ops import condconv, dyconv, odconv
from deploykit.ops.dynamic_conv2d import dynamic_conv2d, dynamic_conv2d_reference
from property_support import (MARKS, Case, assert_close_to_reference, assert_group_exports, batches,
                              channel_groups, export_settings, input_specs, min_input, module_settings, randomize,
                              seeds, size_at_least)

pytestmark = MARKS
FAMILY = "dynamic_conv"


# --- the op ----------------------------------------------------------------------------------------------------

class OpLayer(nn.Module):
    """The op with its banks as parameters; attentions computed from the input (so the batch varies)."""

    def __init__(self, config: dict, seed: int) -> None:
        super().__init__()
        self.config = config
        g = torch.Generator().manual_seed(seed)
        c = config
        kh, kw = c["kernel"]
        self.weight = nn.Parameter(torch.randn(c["experts"], c["out"], c["in"] // c["groups"], kh, kw, generator=g))
        self.bias = nn.Parameter(torch.randn(c["experts"], c["out"], generator=g))
        self.route = nn.Linear(c["in"], c["experts"])
        self.taps = nn.Linear(c["in"], kh * kw)
        self.fixed_taps = nn.Parameter(torch.randn(1, kh, kw, generator=g))
        randomize(self.route, seed + 1, scale=1.0)
        randomize(self.taps, seed + 2, scale=1.0)

    def attentions(self, x: torch.Tensor):
        pooled = x.mean((2, 3))
        c = self.config
        attention = torch.sigmoid(self.route(pooled)) if c["routing"] == "sigmoid" else \
            torch.softmax(self.route(pooled), 1)
        if c["spatial_per_sample"]:
            spatial = torch.sigmoid(self.taps(pooled)).view(-1, *c["kernel"])
        elif c["unit_taps"]:  # what CondConv and DyConv pass: the body's MatMul-only branch
            spatial = torch.ones_like(self.fixed_taps)
        else:
            spatial = torch.sigmoid(self.fixed_taps)
        return attention, spatial

    def forward(self, x):
        attention, spatial = self.attentions(x)
        c = self.config
        return dynamic_conv2d(x, self.weight, attention, self.bias, spatial, c["stride"], c["pads"], c["dilation"],
                              c["groups"])


@st.composite
def op_configs(draw):
    cin, cout, groups, kind = draw(channel_groups())
    kernel = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    pads = [draw(st.integers(0, kernel[i % 2] // 2 + 1)) for i in range(4)]  # top, left, bottom, right
    size = [size_at_least(draw, min_input(kernel[i], stride[i], dilation[i], pads[i] + pads[i + 2])) for i in (0, 1)]
    return {"in": cin} | dict(out=cout, groups=groups, kind=kind, kernel=kernel, stride=stride,
                dilation=dilation, pads=pads, size=size, experts=draw(st.integers(1, 8)),
                routing=draw(st.sampled_from(["softmax", "sigmoid"])), spatial_per_sample=draw(st.booleans()),
                unit_taps=draw(st.booleans()))


def op_case(config: dict, seed: int, inputs) -> Case:
    return Case(OpLayer(config, seed).eval(), (config["in"], *config["size"]), inputs, f"dynamic_conv2d {config}")


# --- CondConv, DyConv, ODConv ------------------------------------------------------------------------------------

class Routed(nn.Module):
    """CondConv as blocks use it: routing from the input, then the conv."""

    def __init__(self, conv: CondConv2d) -> None:
        super().__init__()
        self.routing_fn = CondConvRouting(conv.in_channels, conv.num_experts)
        self.conv = conv

    def forward(self, x):
        return self.conv(x, self.routing_fn(x))


@st.composite
def module_configs(draw, variant: str):
    cin, cout, groups, kind = draw(channel_groups())
    if variant != "condconv" and draw(st.integers(0, 9)) == 0:
        cin, cout, groups, kind = 3, draw(st.integers(1, 6)), 1, "dense"  # DyConv's in_planes == 3 special case
    kernel, stride, dilation = draw(st.integers(1, 5)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    if variant == "condconv":
        padding = draw(st.sampled_from(["", "same", "valid", 0, 1, 2]))
    else:
        padding = draw(st.integers(0, dilation * (kernel // 2) + 1))
    return dict(variant=variant, cin=cin, cout=cout, groups=groups, kind=kind, kernel=kernel, stride=stride,
                dilation=dilation, padding=padding, experts=draw(st.integers(1, 8)), bias=draw(st.booleans()),
                temperature=draw(st.sampled_from([1.0, 0.5, 4.0, 34.0])))


def build(config: dict, seed: int) -> nn.Module:
    c = config
    if c["variant"] == "condconv":
        conv = CondConv2d(c["cin"], c["cout"], c["kernel"], c["stride"], c["padding"], c["dilation"], c["groups"],
                          c["bias"], c["experts"])
        module = Routed(conv)
        randomize(module.routing_fn, seed, scale=1.0)
        if c["bias"]:
            nn.init.normal_(conv.bias, generator=torch.Generator().manual_seed(seed + 1))
    elif c["variant"] == "dyconv":
        module = DyConv2d(c["cin"], c["cout"], c["kernel"], stride=c["stride"], padding=c["padding"],
                          dilation=c["dilation"], groups=c["groups"], bias=c["bias"], K=c["experts"],
                          temperature=c["temperature"])
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            module.attention.fc2.bias.copy_(2 * torch.randn(module.attention.fc2.bias.shape, generator=g))
            if c["bias"]:
                module.bias.copy_(torch.randn(module.bias.shape, generator=g))
    else:
        module = ODConv2d(c["cin"], c["cout"], c["kernel"], c["stride"], padding=c["padding"],
                          dilation=c["dilation"], groups=c["groups"], kernel_num=c["experts"])
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for conv in (m for m in module.attention.modules() if isinstance(m, nn.Conv2d) and m.bias is not None):
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=g))  # attentions far from uniform
        randomize_bn(module.attention.bn, g)
        module.update_temperature(c["temperature"])
    return module.eval()


def randomize_bn(norm: nn.BatchNorm2d, g: torch.Generator) -> None:
    with torch.no_grad():
        c = norm.num_features
        norm.running_mean.copy_(0.2 * torch.randn(c, generator=g))
        norm.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g))
        norm.weight.copy_(0.5 + torch.rand(c, generator=g))
        norm.bias.copy_(0.2 * torch.randn(c, generator=g))


def module_size(draw, module: nn.Module, config: dict) -> list[int]:
    c = config
    if c["variant"] == "condconv":
        conv = module.conv
        pad = 0 if conv.padding is None else 2 * conv.padding  # dynamic 'same' pads never leave an empty output
        minimum = 1 if conv.padding is None else min_input(c["kernel"], c["stride"], c["dilation"], pad)
    else:
        minimum = min_input(c["kernel"], c["stride"], c["dilation"], 2 * c["padding"])
    return [size_at_least(draw, minimum), size_at_least(draw, minimum)]


def reference(module: nn.Module, config: dict, x: torch.Tensor):
    x64 = x.double().numpy()
    if config["variant"] == "condconv":
        return condconv.SPEC.reference(module.conv, x64, condconv.routing_reference(module.routing_fn, x64))
    return (dyconv if config["variant"] == "dyconv" else odconv).SPEC.reference(module, x64)


@st.composite
def module_cases(draw, variants=("condconv", "dyconv", "odconv")):
    variant = draw(st.sampled_from(variants))
    if variant == "op":
        return op_case(draw(op_configs()), draw(seeds), draw(input_specs))
    config = draw(module_configs(variant))
    module = build(config, draw(seeds))
    size = module_size(draw, module, config)
    return Case(module, (config["cin"], *size), draw(input_specs), f"{variant} {config} size {size}")


# --- properties ------------------------------------------------------------------------------------------------

@module_settings(ci=25)
@given(config=op_configs(), seed=seeds, inputs=input_specs, batch=batches)
def test_op_matches_float64_formula(config, seed, inputs, batch):
    case = op_case(config, seed, inputs)
    x = case.input(batch)
    layer = case.module
    with torch.no_grad():
        actual = layer(x)
        attention, spatial = layer.attentions(x)
    c = layer.config
    expected = dynamic_conv2d_reference(x.double().numpy(), layer.weight.detach().double().numpy(),
                                        attention.double().numpy(), layer.bias.detach().double().numpy(),
                                        spatial.double().numpy(), c["stride"], c["pads"], c["dilation"], c["groups"])
    assert_close_to_reference(actual, expected, case.description)


@pytest.mark.parametrize("variant", ["condconv", "dyconv", "odconv"])
def test_module_matches_float64_reference(variant):
    @module_settings(ci=15, fuzz=500)
    @given(case=module_cases((variant,)), batch=batches)
    def check(case, batch):
        x = case.input(batch)
        with torch.no_grad():
            actual = case.module(x)
        config = {"variant": variant}
        assert_close_to_reference(actual, reference(case.module, config, x), case.description)

    check()


def deploykit_nodes(cases: list[Case]) -> int:
    """Every layer exports one DynamicConv2d node, except ODConv's plain 1x1 single-kernel conv."""
    return sum(not (isinstance(c.module, ODConv2d) and c.module.kernel_size == 1 and c.module.kernel_num == 1)
               for c in cases)


@export_settings(ci=2, fuzz=63)
@given(cases=st.lists(module_cases(("op", "condconv", "dyconv", "odconv")), min_size=8, max_size=8))
def test_grouped_export_matches_at_other_batches(cases):
    assert_group_exports(FAMILY, cases, deploykit_nodes=deploykit_nodes(cases))


# --- configurations the modules refuse -----------------------------------------------------------------------------

@pytest.mark.parametrize("layer", ["CondConv2d", "DyConv2d", "ODConv2d"])
@pytest.mark.parametrize("in_channels, out_channels", [(6, 8), (8, 6)])
def test_dynamic_convs_refuse_channels_not_divisible_by_groups(layer, in_channels, out_channels):
    """Found by the fuzz profile: these used to fail at the first forward with PyTorch's conv error."""
    import deploykit.nn

    with pytest.raises(ValueError, match=rf"^{layer}: in \({in_channels}\) and out \({out_channels}\) channels "
                                         rf"must both be divisible by groups \(4\)$"):
        getattr(deploykit.nn, layer)(in_channels, out_channels, 3, groups=4)
