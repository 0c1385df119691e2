"""CondConv: routing + expert mixing against the float64 formula; training; dynamic-batch export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import assert_export_matches, assert_trains, conv_input, random_conv_config
from deploykit.nn import CondConv2d, CondConvRouting
from deploykit.ops.condconv import SPEC, routing_reference
from deploykit.verify import rel_to_range


class Routed(nn.Module):
    """The unit CondConv is used as: routing from the input, then the conv (as in CondConvResidual)."""

    def __init__(self, config: dict, padding, bias: bool) -> None:
        super().__init__()
        self.routing_fn = CondConvRouting(config["in_channels"], config["experts"])
        self.conv = CondConv2d(config["in_channels"], config["out_channels"], config["kernel"], config["stride"],
                               padding, config["dilation"], config["groups"], bias, config["experts"])

    def forward(self, x):
        return self.conv(x, self.routing_fn(x))


CONFIGS = [(random_conv_config(seed), ["", "same", 1][seed % 3], seed % 2 == 0) for seed in range(15)]


@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_matches_float64_reference(index):
    config, padding, bias = CONFIGS[index]
    module = Routed(config, padding, bias).eval()
    x = conv_input(config)
    with torch.no_grad():
        actual = module(x).numpy()
    x64 = x.double().numpy()
    expected = SPEC.reference(module.conv, x64, routing_reference(module.routing_fn, x64))
    assert rel_to_range(actual, expected) <= SPEC.tolerance["float32"]


def test_routing_is_an_independent_sigmoid_per_expert():
    routing = CondConvRouting(8, 4)
    weights = routing(torch.randn(3, 8, 5, 5))
    assert ((weights > 0) & (weights < 1)).all() and not torch.allclose(weights.sum(1), torch.ones(3))


def test_tf_same_padding_is_asymmetric_at_stride_2():
    conv = CondConv2d(4, 4, 3, stride=2, padding="same")
    assert conv.pads((10, 9)) == [0, 1, 1, 1] and conv.padding is None


def test_trains():
    config = dict(CONFIGS[0][0], batch=4)
    assert_trains(Routed(config, "", True), conv_input(config))


@pytest.mark.parametrize("index", [1, 2])
def test_export_dynamic_batch(index):
    config, padding, bias = CONFIGS[index]
    assert_export_matches(Routed(config, padding, bias), lambda b: conv_input(config, batch=b, seed=b))


def test_state_dict_layout_is_timms():
    conv = CondConv2d(8, 16, 3, groups=2, bias=True, num_experts=4)
    assert {k: tuple(v.shape) for k, v in conv.state_dict().items()} == {"weight": (4, 16 * 4 * 9), "bias": (4, 16)}
    np.testing.assert_array_equal(sorted(CondConvRouting(8, 4).state_dict()), ["bias", "weight"])
