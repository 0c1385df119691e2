"""Group, depthwise, dilated and transposed convolutions (PyTorch's own layers) through the whole pipeline.

They need no custom op, but every graph pass runs on them, so they must keep exporting and verifying as the passes
change: each case is checked against the float64 formula (deploykit.ops.reference) and then exported with a
dynamic batch, run in onnxruntime at two batch sizes and compared with PyTorch by the pipeline.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import randomize_batchnorm
from deploykit import ExportConfig, export_model
from deploykit.ops import reference as ref
from deploykit.verify import rel_to_range

# name: (layer, input channels, input H, W); non-square inputs, odd sizes, biases on.
CASES = {
    "grouped 3x3": (nn.Conv2d(8, 12, 3, padding=1, groups=4), 8, (11, 9)),
    "depthwise 5x5 stride 2": (nn.Conv2d(8, 8, 5, stride=2, padding=2, groups=8), 8, (13, 10)),
    "depthwise multiplier 2": (nn.Conv2d(6, 12, 3, padding=1, groups=6), 6, (9, 12)),
    "dilated 3x3 d2": (nn.Conv2d(6, 10, 3, padding=2, dilation=2), 6, (12, 9)),
    "dilated 3x3 d(2,3) stride 2": (nn.Conv2d(6, 10, 3, stride=2, padding=(2, 3), dilation=(2, 3)), 6, (15, 14)),
    "transposed 4x4 stride 2": (nn.ConvTranspose2d(8, 6, 4, stride=2, padding=1), 8, (7, 5)),
    "transposed 3x3 stride 2 output_padding 1": (nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1,
                                                                    output_padding=1), 8, (6, 7)),
    "transposed grouped dilated": (nn.ConvTranspose2d(8, 12, 3, stride=2, padding=2, output_padding=1, groups=4,
                                                      dilation=2), 8, (5, 6)),
    "transposed depthwise stride 3": (nn.ConvTranspose2d(6, 6, 5, stride=3, padding=1, output_padding=2, groups=6),
                                      6, (4, 5)),
}


def float64_reference(layer: nn.Module, x: torch.Tensor):
    x64, w, b = x.double().numpy(), ref.array(layer.weight), ref.array(layer.bias)
    if isinstance(layer, nn.ConvTranspose2d):
        return ref.conv_transpose2d(x64, w, b, layer.stride, layer.padding, layer.output_padding, layer.groups,
                                    layer.dilation)
    return ref.conv2d(x64, w, b, layer.stride, layer.padding, layer.dilation, layer.groups)


@pytest.mark.parametrize("name", sorted(CASES))
def test_layer_matches_float64_formula(name):
    layer, channels, size = CASES[name]
    x = torch.randn(3, channels, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_to_range(layer(x).numpy(), float64_reference(layer, x)) <= 1e-5


@pytest.mark.parametrize("name", sorted(CASES))
def test_exports_and_verifies_through_the_pipeline(name, tmp_path):
    layer, channels, size = CASES[name]
    model = randomize_batchnorm(nn.Sequential(layer, nn.BatchNorm2d(layer.out_channels), nn.ReLU()),
                                torch.Generator().manual_seed(0)).eval()
    result = export_model(ExportConfig(model=model, input_shape=(2, channels, *size), output_dir=tmp_path))
    checks = result.report["verification"]["outputs"]
    assert result.passed and [c["shape"][0] for c in checks] == [2, 3]
    assert all(c["rel_to_range"] <= 1e-5 for c in checks)
    assert result.report["export"]["custom_nodes"] == []
