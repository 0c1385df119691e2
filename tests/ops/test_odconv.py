"""ODConv: the four attentions against the float64 formula, the official head omissions, training, export."""

from __future__ import annotations

import pytest
import torch

from conftest import (assert_export_matches, assert_trains, conv_input, randomize_batchnorm,
                      random_conv_config)
from deploykit.nn import ODConv2d
from deploykit.ops.odconv import SPEC
from deploykit.verify import rel_to_range

CONFIGS = [(random_conv_config(seed), [1.0, 3.0][seed % 2]) for seed in range(18)]
CONFIGS += [(dict(CONFIGS[0][0], kernel=1, experts=1), 1.0)]  # the official plain 1x1 path


def build(config: dict, temperature: float, seed: int = 0) -> ODConv2d:
    module = ODConv2d(config["in_channels"], config["out_channels"], config["kernel"], config["stride"],
                      padding=config["dilation"] * (config["kernel"] // 2), dilation=config["dilation"],
                      groups=config["groups"], kernel_num=config["experts"])
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in (m for m in module.attention.modules() if isinstance(m, torch.nn.Conv2d)):
            if conv.bias is not None:
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator))  # attentions far from uniform
        randomize_batchnorm(module, generator)
    module.update_temperature(temperature)
    return module.eval()


@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_matches_float64_reference(index):
    config, temperature = CONFIGS[index]
    module = build(config, temperature, index)
    x = conv_input(config)
    with torch.no_grad():
        actual = module(x).numpy()
    assert rel_to_range(actual, SPEC.reference(module, x.double().numpy())) <= SPEC.tolerance["float32"]


def test_heads_the_official_code_omits():
    depthwise_1x1_single = ODConv2d(8, 8, 1, groups=8, kernel_num=1)
    keys = {k.split(".")[1] for k in depthwise_1x1_single.state_dict() if k.startswith("attention.")}
    assert keys == {"fc", "bn", "channel_fc"}
    full = ODConv2d(8, 16, 3, kernel_num=4)
    assert {k: tuple(v.shape) for k, v in full.state_dict().items() if "_fc.weight" in k or k == "weight"} == {
        "attention.channel_fc.weight": (8, 16, 1, 1), "attention.filter_fc.weight": (16, 16, 1, 1),
        "attention.spatial_fc.weight": (9, 16, 1, 1), "attention.kernel_fc.weight": (4, 16, 1, 1),
        "weight": (4, 16, 8, 3, 3)}
    assert "attention.bn.running_var" in full.state_dict()


def test_trains():
    config = dict(CONFIGS[2][0], batch=4, experts=4, kernel=3)
    assert_trains(build(config, 1.0), conv_input(config))


@pytest.mark.parametrize("index", [0, 3])
def test_export_dynamic_batch(index):
    config, temperature = CONFIGS[index]
    config = dict(config, kernel=3)  # a k>1 layer always goes through the deploykit node
    assert_export_matches(build(config, temperature, index), lambda b: conv_input(config, batch=b, seed=b))
