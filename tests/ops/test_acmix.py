"""ACmix: the module against the official-formula float64 reference, the official layout and init, training, and
its ONNX export (dynamic batch, float32 throughout, compact graph) against the module."""

from __future__ import annotations

import collections
import random

import numpy as np
import onnx
import pytest
import torch

from conftest import assert_export_matches, assert_trains
from deploykit.nn.acmix import ACmix
from deploykit.ops.acmix import SPEC
from deploykit.verify import rel_to_range

from deploykit.models.acmix import acmix_resnet26, acmix_resnet38, acmix_resnet50

TOL = SPEC.tolerance["float32"]
# An ACmix layer exports to about 35 nodes (3 Conv, 4 Gather, 3 MatMul, Softmax, elementwise and reshapes); the
# unfold-based official forward exports to about 40. Either way far from "thousands of Gathers".
MAX_NODES_PER_LAYER = 100


def random_config(seed: int) -> dict:
    """Stride 1/2, head 1/2/4, k_att 3/5/7, batch 1/3, non-square even sizes (stride 2 needs them)."""
    rng = random.Random(seed)
    kernel_att = rng.choice([3, 5, 7])
    height, width = rng.sample(range(4, 15, 2), 2)  # reflection padding needs H, W > k_att // 2
    return dict(in_planes=rng.choice([8, 16]), out_planes=rng.choice([8, 16]), kernel_att=kernel_att,
                head=rng.choice([1, 2, 4]), stride=rng.choice([1, 2]), batch=rng.choice([1, 3]), height=height,
                width=width)


def build(config: dict, seed: int) -> ACmix:
    """Every parameter random (rates, shift kernels and conv_p included), scaled so the softmax stays soft."""
    generator = torch.Generator().manual_seed(seed)
    module = ACmix(config["in_planes"], config["out_planes"], config["kernel_att"], config["head"], 3,
                   config["stride"])
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=generator) * fan_in ** -0.5)
        module.rate1.copy_(0.5 + torch.rand(1, generator=generator))
        module.rate2.copy_(-0.5 - torch.rand(1, generator=generator))
    return module.eval()


def random_input(config: dict, batch: int | None = None, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (batch or config["batch"], config["in_planes"], config["height"], config["width"])
    return torch.randn(shape, generator=generator)


CONFIGS = [random_config(seed) for seed in range(10)]
# Named corner cases: the bottleneck setting at stride 2 with k_att=7 on the smallest size it allows, one head of
# 16 channels, and an odd non-square size at stride 1.
CONFIGS += [dict(in_planes=16, out_planes=16, kernel_att=7, head=4, stride=2, batch=3, height=8, width=12),
            dict(in_planes=8, out_planes=16, kernel_att=5, head=1, stride=1, batch=1, height=9, width=6)]


def config_id(index: int) -> str:
    return "-".join(f"{k}{v}" for k, v in CONFIGS[index].items())


@pytest.mark.parametrize("index", range(len(CONFIGS)), ids=config_id)
def test_module_matches_float64_reference(index):
    config = CONFIGS[index]
    module = build(config, seed=index)
    x = random_input(config)
    with torch.no_grad():
        actual = module(x).numpy()
    expected = SPEC.reference(module, x.numpy().astype(np.float64))
    assert actual.shape == expected.shape == (config["batch"], config["out_planes"],
                                              config["height"] // config["stride"], config["width"] // config["stride"])
    assert rel_to_range(actual, expected) <= TOL


def test_reference_depends_on_both_paths_and_the_positional_encoding():
    """Guard against a reference (or module) that silently drops a term: each changes the output by > 1%."""
    config = CONFIGS[-2]
    module = build(config, seed=3)
    x = random_input(config).numpy()
    expected = SPEC.reference(module, x)
    for name in ("conv_p.weight", "rate1", "rate2"):
        changed = build(config, seed=3)
        with torch.no_grad():
            changed.get_parameter(name).zero_()
        assert rel_to_range(SPEC.reference(changed, x), expected) > 1e-2, name
        with torch.no_grad():
            assert rel_to_range(changed(torch.from_numpy(x)).numpy(), expected) > 1e-2, name


def official_layout(in_planes: int, out_planes: int, head: int, kernel_conv: int) -> dict[str, tuple]:
    """Keys and shapes of the official ACmix state_dict (references.md sec. 6), independent of the module's code."""
    head_dim = out_planes // head
    layout = {"rate1": (1,), "rate2": (1,)}
    for conv in ("conv1", "conv2", "conv3"):
        layout |= {f"{conv}.weight": (out_planes, in_planes, 1, 1), f"{conv}.bias": (out_planes,)}
    layout |= {"conv_p.weight": (head_dim, 2, 1, 1), "conv_p.bias": (head_dim,),
               "fc.weight": (kernel_conv ** 2, 3 * head, 1, 1),
               "dep_conv.weight": (out_planes, kernel_conv ** 2, kernel_conv, kernel_conv)}  # no dep_conv.bias
    return layout


@pytest.mark.parametrize("in_planes, out_planes, head", [(64, 64, 4), (8, 16, 2), (32, 32, 1)])
def test_state_dict_layout_is_official(in_planes, out_planes, head):
    module = ACmix(in_planes, out_planes, 7, head, 3)
    state = module.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == official_layout(in_planes, out_planes, head, 3)
    assert "dep_conv.bias" not in state
    module.load_state_dict({k: torch.randn_like(v) for k, v in state.items()}, strict=True)


def test_init_is_the_official_shift_kernels():
    module = ACmix(16, 16, 7, 4, 3)
    expected = torch.zeros(16, 9, 3, 3)
    for i in range(9):
        expected[:, i, i // 3, i % 3] = 1.0
    assert torch.equal(module.dep_conv.weight.detach(), expected)
    assert module.rate1.item() == module.rate2.item() == 0.5
    # With shift kernels, the conv path at one pixel is the sum over the 9 fc maps of each one's shifted value.
    x = torch.randn(1, 16, 6, 8)
    with torch.no_grad():
        module.rate1.zero_()
        f = module.fc(torch.cat([c(x).reshape(1, 4, 4, 48) for c in (module.conv1, module.conv2, module.conv3)], 1))
        f = torch.nn.functional.pad(f.reshape(1, 9, 4, 6, 8), (1, 1, 1, 1))  # [1, tap, head_dim, H+2, W+2]
        y = module(x)
    i, j = 3, 5
    expected_pixel = 0.5 * sum(f[0, t, :, i + t // 3, j + t % 3] for t in range(9))  # [head_dim]
    # Conv-path channel d*head + j' of a head_dim group: every j' of group d sees the same shifted sum.
    assert torch.allclose(y[0, :, i, j].reshape(4, 4), expected_pixel[:, None].expand(4, 4), atol=1e-5)


def test_constructor_and_forward_reject_unsupported_settings():
    with pytest.raises(ValueError, match="divisible by head"):
        ACmix(8, 10, head=4)
    with pytest.raises(ValueError, match="odd kernel_att"):
        ACmix(8, 8, kernel_att=4)
    with pytest.raises(ValueError, match="dilation=1 only"):
        ACmix(8, 8, dilation=2)
    with pytest.raises(ValueError, match="divisible by 2"):
        ACmix(8, 8, stride=2)(torch.randn(1, 8, 9, 8))
    with pytest.raises(ValueError, match="must exceed 3"):
        ACmix(8, 8)(torch.randn(1, 8, 3, 8))


def test_trains():
    config = CONFIGS[-3]
    assert_trains(build(config, seed=0), random_input(config))


def check_float32_only(model: onnx.ModelProto) -> None:
    """No float64 anywhere: initializers, Constant nodes, Casts and every typed value (inputs, outputs, value_info)."""
    double = onnx.TensorProto.DOUBLE
    assert all(t.data_type != double for t in model.graph.initializer)
    for node in model.graph.node:
        for attr in node.attribute:
            assert not (attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == double), node.name
            assert not (node.op_type == "Cast" and attr.name == "to" and attr.i == double), node.name
    values = [*model.graph.input, *model.graph.output, *model.graph.value_info]
    assert values and all(v.type.tensor_type.elem_type != double for v in values)
    # Shape inference typed every node output, so the check above covers the whole graph.
    typed = {v.name for v in values}
    assert all(out in typed for node in model.graph.node for out in node.output if out)


def export_and_check(module: ACmix, make_input, batches=(1, 2, 5)) -> collections.Counter:
    """Export with a dynamic batch once (standard ops, float32 only); onnxruntime matches the module at every batch
    size. Returns the op counts."""
    model = assert_export_matches(module, make_input, batches, TOL, custom_node=False)
    check_float32_only(model)
    return collections.Counter(node.op_type for node in model.graph.node)


@pytest.mark.parametrize("index", [0, len(CONFIGS) - 2, len(CONFIGS) - 1], ids=lambda i: config_id(i))
def test_export_dynamic_batch_matches_module(index):
    config = CONFIGS[index]
    ops = export_and_check(build(config, seed=index), lambda batch: random_input(config, batch=batch, seed=batch))
    assert sum(ops.values()) <= MAX_NODES_PER_LAYER, ops
    assert ops["Gather"] <= 4, ops  # the k and v windows, plus the two selects of the positional projection
    assert not set(ops) - {"Conv", "Gather", "MatMul", "Softmax", "Split", "Reshape", "Transpose", "Mul", "Add",
                           "Slice"}, ops


def test_export_of_the_bottleneck_layer_is_compact():
    """The ResNet-50 layer2 setting (64 channels at 28x28) exports to a few dozen nodes, 4 of them Gathers."""
    module = ACmix(64, 64, 7, 4, 3).eval()
    ops = export_and_check(module, lambda batch: torch.randn(batch, 64, 28, 28, generator=torch.Generator()
                                                            .manual_seed(batch)), batches=(1, 3))
    print(f"\nACmix(64, 64) at 28x28: {sum(ops.values())} nodes, {ops['Gather']} Gather: {dict(sorted(ops.items()))}")
    assert sum(ops.values()) <= MAX_NODES_PER_LAYER
    assert ops["Gather"] == 4


# Parameters the official ACmix_ResNet(layers) builds (references.md sec. 6; the README's 10.6M/14.6M/18.6M are not
# what the code builds).
OFFICIAL_PARAMETERS = {acmix_resnet26: 10_487_816, acmix_resnet38: 14_410_896, acmix_resnet50: 18_333_976}


@pytest.mark.parametrize("builder", sorted(OFFICIAL_PARAMETERS, key=lambda b: b.__name__), ids=lambda b: b.__name__)
def test_resnet_parameter_counts_are_the_official_codes(builder):
    model = builder()
    count = sum(p.numel() for p in model.parameters())
    assert count == OFFICIAL_PARAMETERS[builder]
    assert round(count / 1e6, 2) == {"acmix_resnet26": 10.49, "acmix_resnet38": 14.41,
                                     "acmix_resnet50": 18.33}[builder.__name__]


def test_resnet_keys_are_the_official_ones():
    state = acmix_resnet50().state_dict()
    block = {k[len("layer1.0."):] for k in state if k.startswith("layer1.0.")}
    acmix = {f"conv2.{k}" for k in official_layout(64, 64, 4, 3)}
    bns = {f"{bn}.{p}" for bn in ("bn1", "bn2", "bn3", "downsample.1")
           for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    assert block == acmix | bns | {"conv1.weight", "conv3.weight", "downsample.0.weight"}
    assert tuple(state["layer2.0.conv2.dep_conv.weight"].shape) == (128, 9, 3, 3)
    assert tuple(state["layer4.2.conv2.fc.weight"].shape) == (9, 12, 1, 1)
    assert tuple(state["fc.weight"].shape) == (1000, 2048)
    assert sum(k.endswith(".rate1") for k in state) == 16


def test_resnet_init_overwrites_the_shift_kernels_like_the_official_model():
    model = acmix_resnet26()
    weight = model.layer1[0].conv2.dep_conv.weight.detach()
    assert not torch.equal(weight, ACmix(64, 64).dep_conv.weight.detach())
    assert abs(weight.std().item() / (2 / (64 * 9)) ** 0.5 - 1) < 0.1  # He-normal, fan_out = 64 * 3 * 3
