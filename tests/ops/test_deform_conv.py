"""DeformConv2d (DCNv1) and ModulatedDeformConv2d (DCNv2) pack layers: float64 reference, mmcv's state_dict layout
and legacy keys, initialisation, training, dynamic-batch export; their base OffsetInputDeformConv2d (offset and mask
as forward arguments) against the float64 formula."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from conftest import assert_export_matches, assert_trains, conv_input, random_conv_config
from deploykit.nn import DeformConv2d, ModulatedDeformConv2d
from deploykit.models import upgrade_state_dict
from deploykit.nn.deform_conv import DeformConv2dPack, ModulatedDeformConv2dPack, OffsetInputDeformConv2d
from deploykit.ops.deform_conv import SPEC
from deploykit.ops.deform_conv2d import deform_conv2d_reference
from deploykit.ops.reference import conv_output_size
from deploykit.verify import rel_to_range

LAYERS = {"v1": DeformConv2d, "v2": ModulatedDeformConv2d}


def make_layer(version: str, config: dict, seed: int) -> nn.Module:
    """A layer of `config`'s shape with a trained-looking (non-zero) offset conv, so offsets reach the borders."""
    rng = random.Random(seed)
    deform_groups = rng.choice([g for g in (1, 2) if config["in_channels"] % g == 0])
    k = config["kernel"]
    layer = LAYERS[version](config["in_channels"], config["out_channels"], k, config["stride"],
                            rng.randint(0, k // 2 + 1), config["dilation"], config["groups"], deform_groups)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.conv_offset.weight.copy_(torch.randn(layer.conv_offset.weight.shape, generator=generator) * 0.5)
        layer.conv_offset.bias.copy_(torch.randn(layer.conv_offset.bias.shape, generator=generator))
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator))
    return layer.eval()


CASES = [(version, random_conv_config(seed), seed) for seed in range(12) for version in ("v1", "v2") if
         (seed + (version == "v2")) % 2 == 0 or seed < 4]


@pytest.mark.parametrize("version, config, seed", CASES)
def test_matches_float64_reference(version, config, seed):
    layer = make_layer(version, config, seed)
    x = conv_input(config)
    with torch.no_grad():
        actual = layer(x).numpy()
    assert rel_to_range(actual, SPEC.reference(layer, x.double().numpy())) <= SPEC.tolerance["float32"]


@pytest.mark.parametrize("masked", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("seed", range(3))
def test_offset_input_layer_matches_float64_reference(seed, masked):
    """OffsetInputDeformConv2d (torchvision's module, mmcv's non-pack layers): offset and mask come from outside."""
    config = random_conv_config(seed)
    k, stride, dilation, groups = config["kernel"], config["stride"], config["dilation"], config["groups"]
    layer = OffsetInputDeformConv2d(config["in_channels"], config["out_channels"], k, stride, k // 2, dilation,
                                    groups, bias=seed % 2 == 0).eval()
    x = conv_input(config)
    offset_groups = 2 if config["in_channels"] % 2 == 0 else 1
    size = conv_output_size(x.shape[2:], (k, k), (stride, stride), [k // 2] * 4, (dilation, dilation))
    generator = torch.Generator().manual_seed(seed)
    offset = 2 * torch.randn(x.shape[0], 2 * offset_groups * k * k, *size, generator=generator)
    mask = torch.rand(x.shape[0], offset_groups * k * k, *size, generator=generator)
    with torch.no_grad():
        actual = layer(x, offset, mask if masked else None).numpy()
    bias = layer.bias.detach().numpy() if layer.bias is not None else np.zeros(config["out_channels"])
    expected = deform_conv2d_reference(x.numpy(), layer.weight.detach().numpy(), offset.numpy(), bias,
                                       mask.numpy() if masked else np.ones(mask.shape), (stride, stride),
                                       [k // 2] * 4, (dilation, dilation), groups, offset_groups)
    assert rel_to_range(actual, expected) <= SPEC.tolerance["float32"]


def test_state_dict_layout_is_mmcvs():
    v1 = DeformConv2d(16, 32, 3, padding=1, deform_groups=2)
    assert {k: tuple(v.shape) for k, v in v1.state_dict().items()} == {
        "weight": (32, 16, 3, 3), "conv_offset.weight": (36, 16, 3, 3), "conv_offset.bias": (36,)}
    v2 = ModulatedDeformConv2d(16, 32, 3, padding=1, groups=2, deform_groups=2)
    assert {k: tuple(v.shape) for k, v in v2.state_dict().items()} == {
        "weight": (32, 8, 3, 3), "bias": (32,), "conv_offset.weight": (54, 16, 3, 3), "conv_offset.bias": (54,)}
    assert "bias" not in ModulatedDeformConv2d(16, 32, 3, bias=False).state_dict()
    assert DeformConv2dPack is DeformConv2d and ModulatedDeformConv2dPack is ModulatedDeformConv2d
    with pytest.raises(ValueError, match="no bias"):
        DeformConv2d(4, 4, 3, bias=True)


@pytest.mark.parametrize("version, scale", [("v1", 1.0), ("v2", 0.5)])
def test_fresh_layer_is_a_plain_convolution(version, scale):
    """mmcv zero-initialises the offset conv: no displacement, mask sigmoid(0) = 0.5."""
    layer = LAYERS[version](6, 4, 3, stride=2, padding=1).eval()
    x = torch.randn(2, 6, 9, 11)
    expected = scale * nn.functional.conv2d(x, layer.weight, layer.bias, 2, 1)
    with torch.no_grad():
        assert rel_to_range(layer(x).numpy(), expected.numpy()) <= 1e-5


class Block(nn.Module):
    """A parent with `conv2` as mmdet's ResNet blocks name it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2 = ModulatedDeformConv2d(4, 4, 3, padding=1, bias=False)


def test_legacy_sibling_offset_keys_are_upgraded():
    """Old mmdet checkpoints stored ``conv2_offset.*`` beside ``conv2.weight``; the keys are renamed as mmcv does."""
    source = Block()
    with torch.no_grad():
        source.conv2.conv_offset.weight.normal_()
    legacy = {k.replace("conv2.conv_offset", "conv2_offset"): v for k, v in source.state_dict().items()}
    assert "conv2_offset.weight" in legacy
    upgraded = upgrade_state_dict(Block(), legacy)
    assert upgraded.keys() == source.state_dict().keys() and "conv2_offset.weight" in legacy
    target = Block()
    target.load_state_dict(upgraded, strict=True)
    assert torch.equal(target.conv2.conv_offset.weight, source.conv2.conv_offset.weight)
    assert upgrade_state_dict(Block(), source.state_dict()).keys() == source.state_dict().keys()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_trains_including_the_offset_conv(version):
    config = dict(random_conv_config(3), batch=4)
    layer = make_layer(version, config, 3)
    assert_trains(layer, conv_input(config))
    loss = layer.train()(conv_input(config)).square().mean()
    loss.backward()
    assert layer.conv_offset.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("version, seed", [("v1", 1), ("v2", 2)])
def test_export_dynamic_batch(version, seed):
    config = random_conv_config(seed)
    assert_export_matches(make_layer(version, config, seed), lambda b: conv_input(config, batch=b, seed=b))


@pytest.mark.parametrize("opset, custom_nodes", [(20, ["deploykit::DeformConv2d"]), (18, [])])
def test_pipeline_exports_the_node_or_the_opset_18_fallback(opset, custom_nodes, tmp_path):
    from deploykit import ExportConfig, export_model

    config = random_conv_config(4)
    layer = make_layer("v2", config, 4)
    result = export_model(ExportConfig(model=layer, input_shape=(2, config["in_channels"], 12, 10), opset=opset,
                                       output_dir=tmp_path))
    assert result.passed and result.report["export"]["custom_nodes"] == custom_nodes
    assert result.report["export"]["opset"] == opset
