"""Property tests of PyTorch's own group / depthwise / dilated / transposed convs against the float64 formulas
(deploykit.ops.reference) and through grouped dynamic-batch exports. Drawn: kernel (non-square), stride,
dilation, padding per axis (Conv2d also with reflect / replicate / circular padding), groups incl. depthwise and
multipliers, output_padding, bias on/off, batch 1-4, sizes from the minimum."""

from __future__ import annotations

import numpy as np
import torch
import pytest
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from deploykit.ops import reference as ref
from property_support import (MARKS, Case, assert_close_to_reference, assert_group_exports, batches,
                              channel_groups, export_settings, input_specs, min_input, module_settings, randomize,
                              seeds, size_at_least)

pytestmark = MARKS
FAMILY = "standard_convs"
NUMPY_PAD_MODES = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}


@st.composite
def cases(draw, kinds=("conv", "transposed"), export: bool = False):
    """`export`: output_padding < stride (onnxruntime refuses output_padding >= stride, which PyTorch allows when
    the dilation is larger: the export refuses it, see test_transposed_output_padding_beyond_stride_is_refused...)."""
    kind = draw(st.sampled_from(kinds))
    cin, cout, groups, _ = draw(channel_groups())
    kernel = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    bias = draw(st.booleans())
    if kind == "conv":
        mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
        padding = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
        size = [size_at_least(draw, min_input(kernel[i], stride[i], dilation[i], 2 * padding[i])) for i in (0, 1)]
        if mode == "reflect":  # reflection needs pad < size, circular pad <= size
            size = [max(s, p + 1) for s, p in zip(size, padding)]
        elif mode == "circular":
            size = [max(s, p) for s, p in zip(size, padding)]
        module = nn.Conv2d(cin, cout, kernel, stride, padding, dilation, groups, bias, padding_mode=mode)
    else:
        limit = [stride[i] if export else max(stride[i], dilation[i]) for i in (0, 1)]
        output_padding = tuple(draw(st.integers(0, limit[i] - 1)) for i in (0, 1))
        size = [draw(st.integers(1, 7)), draw(st.integers(1, 7))]
        # the full output is (H-1)s + d(k-1) + 1 + output_padding; padding crops both sides and must leave >= 1
        full = [(size[i] - 1) * stride[i] + dilation[i] * (kernel[i] - 1) + 1 + output_padding[i] for i in (0, 1)]
        padding = tuple(draw(st.integers(0, min(3, (full[i] - 1) // 2))) for i in (0, 1))
        module = nn.ConvTranspose2d(cin, cout, kernel, stride, padding, output_padding, groups, bias, dilation)
    randomize(module, draw(seeds))
    return Case(module.eval(), (cin, *size), draw(input_specs), f"{module!r} input {size}")


def reference(layer: nn.Module, x: torch.Tensor) -> np.ndarray:
    x64, w, b = x.double().numpy(), ref.array(layer.weight), ref.array(layer.bias)
    if isinstance(layer, nn.ConvTranspose2d):
        return ref.conv_transpose2d(x64, w, b, layer.stride, layer.padding, layer.output_padding, layer.groups,
                                    layer.dilation)
    if layer.padding_mode != "zeros":
        (ph, pw) = layer.padding
        x64 = np.pad(x64, ((0, 0), (0, 0), (ph, ph), (pw, pw)), mode=NUMPY_PAD_MODES[layer.padding_mode])
        return ref.conv2d(x64, w, b, layer.stride, 0, layer.dilation, layer.groups)
    return ref.conv2d(x64, w, b, layer.stride, layer.padding, layer.dilation, layer.groups)


@module_settings(ci=25)
@given(case=cases(), batch=batches)
def test_layer_matches_float64_formula(case, batch):
    x = case.input(batch)
    with torch.no_grad():
        actual = case.module(x)
    assert_close_to_reference(actual, reference(case.module, x), case.description)


@export_settings(ci=2, fuzz=63)
@given(group=st.lists(cases(export=True), min_size=8, max_size=8))
def test_grouped_export_matches_at_other_batches(group):
    assert_group_exports(FAMILY, group, deploykit_nodes=0)


def test_transposed_output_padding_beyond_stride_is_refused_in_one_sentence():
    """Found by the fuzz profile: PyTorch allows output_padding >= stride when the dilation is larger, ONNX
    Runtime refuses such a ConvTranspose at run time; the export refuses it first, naming the layer."""
    from deploykit.errors import DeployError
    from deploykit.export.onnx import onnx_from_model

    model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.ConvTranspose2d(2, 2, 3, stride=1, output_padding=1, dilation=2))
    with pytest.raises(DeployError, match=r"^1 is a ConvTranspose2d with output_padding \(1, 1\) not smaller than "
                                          r"its stride \(1, 1\): .+\.$"):
        onnx_from_model(model.eval(), torch.randn(2, 2, 5, 5))
