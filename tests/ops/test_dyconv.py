"""DyConv: softmax(z / T) kernel and bias mixing against the float64 formula; temperature; training; export."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_export_matches, assert_trains, conv_input, random_conv_config
from deploykit.nn import DyConv2d
from deploykit.nn.dyconv import set_temperature, temperature_schedule
from deploykit.ops.dyconv import SPEC
from deploykit.verify import rel_to_range

CONFIGS = [(random_conv_config(seed), [1.0, 4.0, 34.0][seed % 3], seed % 2 == 0) for seed in range(15)]


def build(config: dict, temperature: float, bias: bool) -> DyConv2d:
    module = DyConv2d(config["in_channels"], config["out_channels"], config["kernel"], stride=config["stride"],
                      padding=config["dilation"] * (config["kernel"] // 2), dilation=config["dilation"],
                      groups=config["groups"], bias=bias, K=config["experts"], temperature=temperature)
    if bias:  # the reference init is zeros; test with a real bias bank
        torch.nn.init.normal_(module.bias)
    return module.eval()


@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_matches_float64_reference(index):
    module = build(*CONFIGS[index])
    x = conv_input(CONFIGS[index][0])
    with torch.no_grad():
        actual = module(x).numpy()
    assert rel_to_range(actual, SPEC.reference(module, x.double().numpy())) <= SPEC.tolerance["float32"]


def test_temperature_is_not_state_and_changes_the_output():
    config = dict(CONFIGS[0][0], experts=4)
    module = build(config, 34.0, True)
    assert not any("temperature" in key for key in module.state_dict())
    x = conv_input(config)
    with torch.no_grad():
        hot = module(x)
        set_temperature(module, 1.0)
        cold = module(x)
    assert module.temperature == 1.0 and rel_to_range(hot.numpy(), cold.numpy()) > 1e-3


def test_annealing_schedules():
    assert [temperature_schedule(e) for e in (0, 5, 10, 20)] == [30.0, 15.5, 1.0, 1.0]
    module = DyConv2d(4, 4, 3, temperature=34)
    for _ in range(20):
        module.update_temperature()
    assert module.temperature == 1


def test_trains():
    config = dict(CONFIGS[1][0], batch=4)
    assert_trains(build(config, 4.0, True), conv_input(config))


@pytest.mark.parametrize("index", [0, 4])
def test_export_dynamic_batch(index):
    config, temperature, bias = CONFIGS[index]
    assert_export_matches(build(config, temperature, bias), lambda b: conv_input(config, batch=b, seed=b))
