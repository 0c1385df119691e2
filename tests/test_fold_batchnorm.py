"""BatchNorm folding into deploykit::DynamicConv2d (and ODConv's Conv -> Mul): exact, and only where exact.

Every case compares the folded graph with the unfolded one and with PyTorch on random inputs, with non-trivial
BatchNorm statistics; the graph structure shows which shifts moved into the bias bank (softmax or constant-one
kernel weights) and which stayed as an Add (CondConv's sigmoid routing, a filter-attention Mul in between).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import randomize_batchnorm
from deploykit.export.fold_batchnorm import FOLDED_KEY, fold_batchnorm, folded_count
from deploykit.export.onnx import onnx_from_model
from deploykit.export.passes import fold_constants, infer_shapes, run_passes
from deploykit.inputs import structured_noise
from deploykit.models import random_model
from deploykit.nn.condconv import CondConv2d, CondConvRouting
from deploykit.nn.deform_conv import ModulatedDeformConv2dPack
from deploykit.nn.dyconv import DyConv2d
from deploykit.nn.odconv import ODConv2d
from deploykit.runtime.ort import session_from_onnx
from deploykit.verify import rel_to_range


class CondConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.routing = CondConvRouting(6, 4)
        self.conv = CondConv2d(6, 10, 3, stride=2, bias=True, num_experts=4)
        self.bn = nn.BatchNorm2d(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x, self.routing(x))))


class ConvBN(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


def _odconv(kernel: int, experts: int, groups: int = 1, channels: int = 8) -> nn.Module:
    return ConvBN(ODConv2d(channels, channels, kernel, padding=kernel // 2, groups=groups, kernel_num=experts),
                  nn.BatchNorm2d(channels))


def _dcnv2() -> nn.Module:
    """Grouped DCNv2 whose offsets reach a pixel or two (mmcv initialises the offset conv to zeros)."""
    layer = ModulatedDeformConv2dPack(8, 6, 3, padding=1, groups=2, deform_groups=2)
    nn.init.normal_(layer.conv_offset.weight, std=0.3, generator=torch.Generator().manual_seed(5))
    return ConvBN(layer, nn.BatchNorm2d(6))


# case -> (module, its input channels, whether the shift stays as an Add)
CASES = {
    "condconv_sigmoid": (CondConvBN, 6, True),
    "dyconv_softmax": (lambda: ConvBN(DyConv2d(6, 10, 3, padding=1, temperature=1), nn.BatchNorm2d(10)), 6, False),
    "odconv_k4_filter_mul": (lambda: _odconv(3, 4), 8, True),
    "odconv_1x1_k1_plain_conv_mul": (lambda: _odconv(1, 1), 8, True),
    "odconv_depthwise_k4_softmax": (lambda: _odconv(3, 4, groups=8), 8, False),
    "odconv_depthwise_k1_ones": (lambda: _odconv(3, 1, groups=8), 8, False),
    "dcnv2_grouped": (lambda: _dcnv2(), 8, False),
}


def _unfolded_and_folded(module: nn.Module, example: torch.Tensor):
    unfolded = infer_shapes(fold_constants(onnx_from_model(module, example)))
    return unfolded, infer_shapes(fold_batchnorm(copy.deepcopy(unfolded)))


def _count(model, op_type: str) -> int:
    return sum(n.op_type == op_type for n in model.graph.node)


@pytest.mark.parametrize("case", sorted(CASES))
def test_folded_layer_matches_unfolded_and_pytorch(case):
    build, channels, shift_stays = CASES[case]
    generator = torch.Generator().manual_seed(3)
    module = randomize_batchnorm(build(), generator).eval()
    x = torch.randn(2, channels, 11, 13, generator=generator)
    unfolded, folded = _unfolded_and_folded(module, x)

    assert _count(unfolded, "BatchNormalization") == 1 and _count(folded, "BatchNormalization") == 0
    assert _count(folded, "Add") == _count(unfolded, "Add") + shift_stays
    assert folded_count(folded) == 1
    [conv] = [n for n in folded.graph.node if n.op_type in ("Conv", "DynamicConv2d", "DeformConv2d")
              and any(p.key == FOLDED_KEY for p in n.metadata_props)]
    assert conv.name in {n.name for n in unfolded.graph.node}

    with torch.no_grad():
        expected = module(x).numpy()
    outputs = [session_from_onnx(m, ["cpu"]).run(None, {"input": x.numpy()})[0] for m in (unfolded, folded)]
    assert rel_to_range(outputs[1], outputs[0]) <= 1e-5
    assert rel_to_range(outputs[1], expected) <= 1e-5


def test_run_passes_folds_and_keeps_names_and_metadata():
    module = randomize_batchnorm(_odconv(3, 4), torch.Generator().manual_seed(4)).eval()
    raw = onnx_from_model(module, torch.randn(2, 8, 9, 9))
    [norm] = [n for n in raw.graph.node if n.op_type == "BatchNormalization"]
    norm_scopes = {p.key: p.value for p in norm.metadata_props}["pkg.torch.onnx.name_scopes"]
    folded, _ = run_passes(raw)
    [add] = [n for n in folded.graph.node if n.name == norm.name]
    assert add.op_type == "Add" and add.output == norm.output  # the BN's node, now adding the shift
    assert {p.key: p.value for p in add.metadata_props}["pkg.torch.onnx.name_scopes"] == norm_scopes
    dynamic = next(n for n in folded.graph.node if n.op_type == "DynamicConv2d")
    metadata = {p.key: p.value for p in dynamic.metadata_props}
    assert metadata[FOLDED_KEY] == norm_scopes and "pkg.torch.onnx.name_scopes" in metadata


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["od_resnet50", "od_resnet18", "dy_resnet18", "efficientnet_cc_b0_4e"])
def test_folded_zoo_model_matches_unfolded(arch):
    model = random_model(arch)
    x = structured_noise(2, (3, 224, 224), torch.Generator().manual_seed(0))
    unfolded, folded = _unfolded_and_folded(model, x)
    assert folded_count(folded) == _count(unfolded, "BatchNormalization") - _count(folded, "BatchNormalization") > 0
    outputs = [session_from_onnx(m, ["cpu"]).run(None, {"input": x.numpy()})[0] for m in (unfolded, folded)]
    with torch.no_grad():
        expected = model(x).numpy()
    assert rel_to_range(outputs[1], outputs[0]) <= 1e-4
    assert rel_to_range(outputs[1], expected) <= 1e-4
