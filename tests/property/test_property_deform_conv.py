"""Property tests of deformable convolution: the functional ``deploykit.ops.deform_conv2d.deform_conv2d`` and the
DeformConv2d (v1) / ModulatedDeformConv2d (v2) pack layers against the float64 references, and grouped
dynamic-batch exports (the ``deploykit::DeformConv2d`` node, or the standard-op lowering) against onnxruntime.
Drawn: kernel (non-square), stride, dilation, padding per axis, weight groups incl. depthwise, offset groups,
offsets up to the image size (random, integer and half-integer: taps on and across the borders), mask on/off
(incl. exact 0/1), bias on/off, batch 1-4, sizes from the minimum."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from deploykit.nn import DeformConv2d, ModulatedDeformConv2d
from deploykit.ops.deform_conv import SPEC
from deploykit.ops.deform_conv2d import deform_conv2d, deform_conv2d_reference, output_size
from property_support import (MARKS, Case, assert_case_matches_spec, assert_close_to_reference, assert_group_exports,
                              batches, channel_groups, export_settings, input_specs, min_input, module_settings, seeds,
                              size_at_least)

pytestmark = MARKS
FAMILY = "deform_conv"


def divisors(n: int, limit: int = 4) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


@st.composite
def functional_configs(draw):
    cin, cout, group, kind = draw(channel_groups())
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = [draw(st.integers(1, 3)), draw(st.integers(1, 3))]
    dilation = [draw(st.integers(1, 3)), draw(st.integers(1, 3))]
    padding = [draw(st.integers(0, 3)), draw(st.integers(0, 3))]
    size = [size_at_least(draw, min_input(kernel[i], stride[i], dilation[i], 2 * padding[i])) for i in (0, 1)]
    return dict(cin=cin, cout=cout, group=group, kind=kind, kernel=kernel, stride=stride, dilation=dilation,
                padding=padding, size=size, offset_group=draw(st.sampled_from(divisors(cin))),
                offsets=draw(st.sampled_from(["normal", "integer", "half", "large"])),
                mask=draw(st.sampled_from([None, "uniform", "binary"])), bias=draw(st.booleans()))


def functional_tensors(config: dict, seed: int, batch: int) -> dict:
    """Weight, bias, offsets and mask for `config` at `batch` (offsets and mask per sample)."""
    g = torch.Generator().manual_seed(seed)
    c = config
    kh, kw = c["kernel"]
    out = output_size(c["size"], c["kernel"], c["stride"], c["padding"] * 2, c["dilation"])
    shape = (batch, 2 * c["offset_group"] * kh * kw, *out)
    reach = max(c["size"])
    offset = {"normal": lambda: 1.5 * torch.randn(shape, generator=g),
              "integer": lambda: torch.randint(-reach, reach + 1, shape, generator=g).float(),
              "half": lambda: torch.randint(-reach, reach + 1, shape, generator=g).float() + 0.5,
              "large": lambda: reach * torch.randn(shape, generator=g)}[c["offsets"]]()
    mask_shape = (batch, c["offset_group"] * kh * kw, *out)
    mask = None if c["mask"] is None else torch.rand(mask_shape, generator=g)
    if c["mask"] == "binary":
        mask = (mask > 0.5).float()
    return dict(weight=torch.randn(c["cout"], c["cin"] // c["group"], kh, kw, generator=g),
                bias=torch.randn(c["cout"], generator=g) if c["bias"] else None, offset=offset, mask=mask)


class FunctionalLayer(nn.Module):
    """The functional with offsets and mask predicted from the input by a conv, scaled to reach the borders."""

    def __init__(self, config: dict, seed: int) -> None:
        super().__init__()
        self.config = c = config
        t = functional_tensors(config, seed, 1)
        self.weight = nn.Parameter(t["weight"])
        self.bias = None if t["bias"] is None else nn.Parameter(t["bias"])
        kh, kw = c["kernel"]
        self.predict = nn.Conv2d(c["cin"], 3 * c["offset_group"] * kh * kw, c["kernel"], c["stride"], c["padding"],
                                 c["dilation"])
        g = torch.Generator().manual_seed(seed + 1)
        scale = {"normal": 1.0, "integer": 2.0, "half": 2.0, "large": max(c["size"]) / 2}[c["offsets"]]
        with torch.no_grad():
            self.predict.weight.copy_(torch.randn(self.predict.weight.shape, generator=g) * scale
                                      / self.predict.weight[0].numel() ** 0.5)
            self.predict.bias.copy_(torch.randn(self.predict.bias.shape, generator=g) * scale)

    def forward(self, x):
        c = self.config
        out = self.predict(x)
        split = 2 * c["offset_group"] * c["kernel"][0] * c["kernel"][1]
        mask = None if c["mask"] is None else torch.sigmoid(out[:, split:])
        return deform_conv2d(x, out[:, :split], self.weight, self.bias, c["stride"], c["padding"], c["dilation"],
                             mask)


@st.composite
def pack_configs(draw):
    version = draw(st.sampled_from(["v1", "v2"]))
    cin, cout, groups, kind = draw(channel_groups())
    square = draw(st.booleans())
    kernel = draw(st.integers(1, 4)) if square else (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = draw(st.integers(1, 3)) if square else (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = draw(st.integers(1, 3)) if square else (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = draw(st.integers(0, 3)) if square else (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    return dict(version=version, cin=cin, cout=cout, groups=groups, kind=kind, kernel=kernel, stride=stride,
                dilation=dilation, padding=padding, deform_groups=draw(st.sampled_from(divisors(cin))),
                bias=version == "v2" and draw(st.booleans()), offset_scale=draw(st.sampled_from([0.3, 1.0, 3.0])))


def build_pack(config: dict, seed: int) -> nn.Module:
    c = config
    cls = DeformConv2d if c["version"] == "v1" else ModulatedDeformConv2d
    layer = cls(c["cin"], c["cout"], c["kernel"], c["stride"], c["padding"], c["dilation"], c["groups"],
                c["deform_groups"], c["bias"])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a trained-looking offset conv (mmcv's init is zero: a plain conv)
        w = layer.conv_offset.weight
        w.copy_(torch.randn(w.shape, generator=g) * c["offset_scale"] / w[0].numel() ** 0.5)
        layer.conv_offset.bias.copy_(torch.randn(layer.conv_offset.bias.shape, generator=g) * c["offset_scale"])
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g))
    return layer.eval()


def pack_size(draw, layer: nn.Module) -> list[int]:
    return [size_at_least(draw, min_input(layer.kernel_size[i], layer.stride[i], layer.dilation[i],
                                          2 * layer.padding[i])) for i in (0, 1)]


@st.composite
def cases(draw, kinds=("functional", "pack")):
    kind = draw(st.sampled_from(kinds))
    if kind == "functional":
        config = draw(functional_configs())
        return Case(FunctionalLayer(config, draw(seeds)).eval(), (config["cin"], *config["size"]), draw(input_specs),
                    f"deform_conv2d {config}")
    config = draw(pack_configs())
    layer = build_pack(config, draw(seeds))
    size = pack_size(draw, layer)
    return Case(layer, (config["cin"], *size), draw(input_specs), f"{type(layer).__name__} {config} size {size}")


# --- properties ------------------------------------------------------------------------------------------------

@module_settings(ci=25)
@given(config=functional_configs(), seed=seeds, inputs=input_specs, batch=batches)
def test_functional_matches_float64_formula(config, seed, inputs, batch):
    """Offsets and mask drawn directly (not predicted), so integer / half-integer positions and exact 0/1 masks
    reach the sampling."""
    t = functional_tensors(config, seed, batch)
    x = inputs.make((batch, config["cin"], *config["size"]))
    actual = deform_conv2d(x, t["offset"], t["weight"], t["bias"], config["stride"], config["padding"],
                           config["dilation"], t["mask"])
    mask = t["mask"] if t["mask"] is not None else torch.ones(batch, t["offset"].shape[1] // 2,
                                                              *t["offset"].shape[2:])
    bias = t["bias"] if t["bias"] is not None else torch.zeros(config["cout"])
    expected = deform_conv2d_reference(*(v.double().numpy() for v in (x, t["weight"], t["offset"], bias, mask)),
                                       config["stride"], config["padding"] * 2, config["dilation"], config["group"],
                                       config["offset_group"])
    assert_close_to_reference(actual, expected, f"deform_conv2d {config}")


@module_settings(ci=20)
@given(case=cases(("pack",)), batch=batches)
def test_pack_layers_match_float64_reference(case, batch):
    assert_case_matches_spec(case, batch, SPEC)


@export_settings(ci=3, fuzz=63)
@given(group=st.lists(cases(), min_size=8, max_size=8), lowering=st.sampled_from(["custom", "custom", "standard"]))
def test_grouped_export_matches_at_other_batches(group, lowering):
    assert_group_exports(FAMILY, group, lowering=lowering, deploykit_nodes=len(group) if lowering == "custom" else 0)


@pytest.mark.parametrize("opset, lowering", [(20, "standard"), (18, "auto")])
def test_standard_lowering_of_bias_free_layers_exports(opset, lowering):
    """Regression (found by the fuzz profile): two bias-free layers with the same out_channels, one grouped, left a
    ConstantOfShape of their zero bias unfolded after one round of constant folding."""
    from deploykit.export.onnx import onnx_from_model
    from deploykit.export.passes import run_passes
    from deploykit.runtime.ort import session_from_onnx
    from deploykit.verify import rel_to_range

    torch.manual_seed(0)
    model = nn.Sequential(ModulatedDeformConv2d(4, 4, 3, padding=1, groups=2, bias=False),
                          ModulatedDeformConv2d(4, 4, 3, padding=1, groups=1, bias=False)).eval()
    for layer in model:
        nn.init.normal_(layer.conv_offset.weight, std=0.3)  # offsets away from zero
    exported, _ = run_passes(onnx_from_model(model, torch.randn(2, 4, 8, 8), opset=opset, lowering=lowering))
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x).numpy()
    assert rel_to_range(session_from_onnx(exported, ["cpu"]).run(None, {"input": x.numpy()})[0], expected) <= 1e-4


# --- configurations refused --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(in_channels=6, out_channels=8, groups=4), "divisible by groups"),
    (dict(in_channels=6, out_channels=6, deform_groups=4), "divisible by deform_groups"),
])
@pytest.mark.parametrize("cls", [DeformConv2d, ModulatedDeformConv2d])
def test_pack_layers_refuse_groups_that_do_not_divide(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(kernel_size=3, **kwargs)


def test_v1_refuses_a_bias():
    with pytest.raises(ValueError, match="no bias"):
        DeformConv2d(4, 4, 3, bias=True)
