"""SCConv: the module against the paper-formula float64 reference, and its ONNX export against the module."""

from __future__ import annotations

import random

import numpy as np
import onnx
import pytest
import torch
from onnx.reference import ReferenceEvaluator

from conftest import randomize_batchnorm
from deploykit.export.onnx import onnx_from_model
from deploykit.export.passes import run_passes
from deploykit.nn import SCConv
from deploykit.ops.scconv import SPEC
from deploykit.runtime.ort import session_from_onnx
from deploykit.verify import rel_to_range

TOL = SPEC.tolerance["float32"]


def random_config(seed: int) -> dict:
    """Channels, groups (incl. depthwise), stride, dilation, pooling rate, batch, non-square odd sizes."""
    rng = random.Random(seed)
    channels = rng.choice([4, 6, 8, 12])
    groups = rng.choice([g for g in (1, 2, 3, channels) if channels % g == 0])
    dilation = rng.choice([1, 2])
    pooling_r = rng.choice([2, 4])
    return dict(channels=channels, groups=groups, stride=rng.choice([1, 2]), dilation=dilation, pooling_r=pooling_r,
                batch=rng.choice([1, 3]), height=rng.randint(pooling_r, 19), width=rng.randint(pooling_r, 19))


def build(config: dict, seed: int) -> SCConv:
    generator = torch.Generator().manual_seed(seed)
    c = config["channels"]
    module = SCConv(c, c, config["stride"], config["dilation"], config["dilation"], config["groups"],
                    config["pooling_r"])
    with torch.no_grad():
        for conv in (m for m in module.modules() if isinstance(m, torch.nn.Conv2d)):
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.5)
        randomize_batchnorm(module, generator)
    return module.eval()


def random_input(config: dict, batch: int | None = None, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (batch or config["batch"], config["channels"], config["height"], config["width"])
    return torch.randn(shape, generator=generator)


CONFIGS = [random_config(seed) for seed in range(16)]
# Corner cases named explicitly: depthwise at stride 2 with sizes not divisible by 4, and the bottleneck setting.
CONFIGS += [dict(channels=8, groups=8, stride=2, dilation=1, pooling_r=4, batch=3, height=13, width=10),
            dict(channels=16, groups=1, stride=1, dilation=2, pooling_r=4, batch=2, height=9, width=22)]


@pytest.mark.parametrize("index", range(len(CONFIGS)), ids=lambda i: "-".join(f"{k}{v}" for k, v in CONFIGS[i].items()))
def test_module_matches_float64_reference(index):
    config = CONFIGS[index]
    module = build(config, seed=index)
    x = random_input(config)
    with torch.no_grad():
        actual = module(x).numpy()
    expected = SPEC.reference(module, x.numpy().astype(np.float64))
    assert actual.shape == expected.shape
    assert rel_to_range(actual, expected) <= TOL


def test_reference_is_not_trivially_close_to_a_plain_conv():
    """Guard against a reference that silently skips the calibration branch."""
    config = CONFIGS[-1]
    module = build(config, seed=3)
    x = random_input(config).numpy()
    with torch.no_grad():
        plain = module.k4(module.k3(torch.from_numpy(x))).numpy()
    assert rel_to_range(plain, SPEC.reference(module, x)) > 1e-2


def test_constructor_rejects_mismatched_channels():
    with pytest.raises(ValueError, match="inplanes == planes"):
        SCConv(8, 16)


@pytest.mark.parametrize("index", [0, len(CONFIGS) - 2, len(CONFIGS) - 1])
def test_export_dynamic_batch_matches_module(index):
    config = CONFIGS[index]
    module = build(config, seed=index)
    model, _ = run_passes(onnx_from_model(module, random_input(config), dynamic_batch=True))
    # The upsample must be floor-nearest with asymmetric coordinates, the form TensorRT implements.
    resize = [n for n in model.graph.node if n.op_type == "Resize"]
    assert resize and all({a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}["mode"] == b"nearest"
                          for n in resize)
    session = session_from_onnx(model, ["cpu"])
    evaluator = ReferenceEvaluator(model)
    for batch in (1, 3):
        x = random_input(config, batch=batch, seed=batch)
        with torch.no_grad():
            expected = module(x).numpy()
        assert rel_to_range(session.run(None, {"input": x.numpy()})[0], expected) <= TOL
        assert rel_to_range(evaluator.run(None, {"input": x.numpy()})[0], expected) <= TOL
