"""OpenVINO runs the exported file as it is: every conv family against PyTorch float64, beside onnxruntime on the
same file, at two batch sizes (and a second spatial size where the family allows); deformable conv at the borders."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from deploykit.errors import DeployError
from deploykit.export.onnx import onnx_from_model
from deploykit.export.passes import run_passes
from deploykit.inputs import structured_noise
from deploykit.nn import (ACmix, CondConv2d, CondConvRouting, DeformConv2d, DyConv2d, ModulatedDeformConv2d,
                          ODConv2d, SCConv, TVConv)
from deploykit.ops.deform_conv2d import deform_conv2d, deform_conv2d_reference
from deploykit.runtime.ort import session_from_onnx
from deploykit.verify import float64_copy, rel_to_range
from conftest import randomize_batchnorm

pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'deploykit[openvino]')")

from deploykit.runtime.openvino import (  # noqa: E402
    OpenVinoRunner, compile_model, read_model, require_openvino, save_ir)

TOLERANCE = 1e-4


class _Net(torch.nn.Module):
    """A stem conv, the layer under test, and (for routed layers) its routing: the smallest real use."""

    def __init__(self, layer: torch.nn.Module, channels: int, routing: torch.nn.Module | None = None):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, channels, 3, padding=1)
        self.layer, self.routing = layer, routing

    def forward(self, x):
        x = torch.relu(self.stem(x))
        return self.layer(x, self.routing(x)) if self.routing is not None else self.layer(x)


def _deformable(layer: torch.nn.Module) -> torch.nn.Module:
    torch.nn.init.normal_(layer.conv_offset.weight, std=0.3)  # offsets of a few pixels, some across the border
    torch.nn.init.normal_(layer.conv_offset.bias)
    return layer


# family: (model builder, traced input, a second spatial size or None where the file takes one size only)
FAMILIES = {
    "scconv": (lambda: randomize_batchnorm(_Net(SCConv(8, 8, pooling_r=2), 8), torch.Generator().manual_seed(0)),
               (3, 16, 16), (12, 20)),
    "condconv": (lambda: _Net(CondConv2d(8, 12, 3, stride=2, padding=1, groups=2, num_experts=4), 8,
                              CondConvRouting(8, 4)), (3, 13, 15), (9, 11)),
    "dyconv": (lambda: _Net(DyConv2d(8, 8, 3, padding=2, dilation=2, groups=8, K=4, temperature=4), 8),
               (3, 14, 12), (9, 10)),
    "odconv": (lambda: _Net(ODConv2d(8, 8, 3, padding=1, kernel_num=4), 8), (3, 12, 12), (10, 14)),
    "odconv_1x1": (lambda: _Net(ODConv2d(8, 6, 1, kernel_num=1), 8), (3, 10, 10), (7, 9)),
    "dcn_v1": (lambda: _Net(_deformable(DeformConv2d(8, 8, 3, padding=1, deform_groups=2)), 8), (3, 12, 12),
               (9, 13)),
    "dcn_v2": (lambda: _Net(_deformable(ModulatedDeformConv2d(8, 8, 3, stride=2, padding=1, groups=2)), 8),
               (3, 13, 11), (10, 10)),
    "tvconv": (lambda: _Net(TVConv(8, h=10, w=10), 8), (3, 10, 10), None),
    "acmix": (lambda: _Net(ACmix(8, 8, kernel_att=3, head=2), 8), (3, 8, 8), None),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_same_file_in_openvino_and_onnxruntime(family):
    build, traced, second_size = FAMILIES[family]
    torch.manual_seed(0)
    model = build().eval()
    exported, _ = run_passes(onnx_from_model(model, torch.randn(1, *traced), dynamic_spatial=second_size is not None))
    runner, session = OpenVinoRunner(exported), session_from_onnx(exported, ["cpu"])
    reference = float64_copy(model)
    shapes = [(1, *traced), (3, *traced)] + ([(2, traced[0], *second_size)] if second_size else [])
    generator = torch.Generator().manual_seed(1)
    for shape in shapes:
        x = structured_noise(shape[0], shape[1:], generator)
        with torch.no_grad():
            expected = reference(x.double()).numpy()
        actual = runner.run({"input": x.numpy()})["output"]
        assert actual.shape == expected.shape, shape
        assert rel_to_range(actual, expected) <= TOLERANCE, (shape, "openvino")
        assert rel_to_range(session.run(None, {"input": x.numpy()})[0], expected) <= TOLERANCE, (shape, "ort")
    runner.close()


class _Deform(torch.nn.Module):
    """deform_conv2d with offsets and mask as model inputs, so a test chooses where every tap samples."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, padding: int):
        super().__init__()
        self.weight, self.bias, self.padding = torch.nn.Parameter(weight), torch.nn.Parameter(bias), padding

    def forward(self, x, offset, mask):
        return deform_conv2d(x, offset, self.weight, self.bias, padding=self.padding, mask=mask)


def _border_offsets(rng: np.random.Generator, batch: int, kernel: int, size: tuple[int, int]) -> np.ndarray:
    """Offsets moving every tap of a 3x3, pad-1 deformable conv to within 1.5 px of a border, inside or out (rows
    and columns near -1, 0, H-1 and H)."""
    height, width = size
    taps_y = np.arange(height)[:, None, None] - 1 + np.repeat(np.arange(kernel), kernel)[None, None, :]
    taps_x = np.arange(width)[None, :, None] - 1 + np.tile(np.arange(kernel), kernel)[None, None, :]
    shape = (batch, height, width, kernel * kernel)
    target_y = rng.choice([-1.0, 0.0, height - 1.0, float(height)], shape) + rng.uniform(-0.5, 0.5, shape)
    target_x = rng.choice([-1.0, 0.0, width - 1.0, float(width)], shape) + rng.uniform(-0.5, 0.5, shape)
    offset = np.stack([target_y - taps_y, target_x - taps_x], axis=-1)  # [N, H, W, taps, 2]
    return offset.transpose(0, 3, 4, 1, 2).reshape(batch, -1, height, width).astype(np.float32)


def test_deformable_conv_at_the_borders_reads_zeros_beyond_them():
    rng = np.random.default_rng(0)
    size, channels = (7, 9), 4
    weight, bias = torch.randn(5, channels, 3, 3), torch.randn(5)
    module = _Deform(weight, bias, padding=1)
    x = structured_noise(2, (channels, *size), torch.Generator().manual_seed(0)).numpy()
    offset = _border_offsets(rng, 2, 3, size)
    mask = rng.uniform(0.2, 1.0, (2, 9, *size)).astype(np.float32)
    exported, _ = run_passes(onnx_from_model(module, (torch.from_numpy(x), torch.from_numpy(offset),
                                                      torch.from_numpy(mask)), input_names=("x", "offset", "mask")))
    expected = deform_conv2d_reference(x, weight.numpy(), offset, bias.numpy(), mask, [1, 1], [1, 1, 1, 1], [1, 1],
                                       1, 1)
    for batch in (1, 2):
        feed = {"x": x[:batch], "offset": offset[:batch], "mask": mask[:batch]}
        actual = OpenVinoRunner(exported).run(feed)["output"]
        assert rel_to_range(actual, expected[:batch]) <= TOLERANCE, batch
    # OpenVINO's default border mode (bilinear_interpolation_pad=False) would be wrong here by far: the check has teeth
    assert rel_to_range(_edge_clamping_deform(x, weight.numpy(), offset, bias.numpy(), mask), expected) > 1e-2


def _edge_clamping_deform(x, weight, offset, bias, mask) -> np.ndarray:
    """The same layer built directly in OpenVINO with its default border semantics."""
    import openvino
    from openvino import opset8 as ov

    params = [ov.parameter(a.shape, np.float32) for a in (x, offset, mask)]
    y = ov.deformable_convolution(params[0], params[1], ov.constant(weight), [1, 1], [1, 1], [1, 1], [1, 1],
                                  mask=params[2])
    y = ov.add(y, ov.constant(bias.reshape(1, -1, 1, 1)))
    return compile_model(openvino.Model([y], params))([x, offset, mask])[0]


@pytest.mark.parametrize("optional", ["none", "bias", "mask", "both"])
def test_standard_deform_conv_node(optional):
    """ONNX DeformConv as some files carry it directly (opset 19), with its optional bias and mask present or not
    and attributes left at their defaults."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 6, 7)).astype(np.float32)
    weight = rng.standard_normal((6, 2, 2, 3)).astype(np.float32)  # 2 weight groups, non-square kernel
    offset = rng.uniform(-2.5, 2.5, (2, 2 * 2 * 6, 5, 5)).astype(np.float32)  # 2 offset groups
    bias = rng.standard_normal(6).astype(np.float32)
    mask = rng.uniform(0, 1, (2, 2 * 6, 5, 5)).astype(np.float32)
    with_bias, with_mask = optional in ("bias", "both"), optional in ("mask", "both")
    inputs = ["x", "w", "offset", "b" if with_bias else "", "mask" if with_mask else ""]
    while not inputs[-1]:
        inputs.pop()
    graph = helper.make_graph(
        [helper.make_node("DeformConv", inputs, ["y"], group=2, offset_group=2)], "deform",
        [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["n", *shape[1:]])
         for name, shape in (("x", x.shape), ("offset", offset.shape), ("mask", mask.shape)) if name in inputs],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    feed = {"x": x, "offset": offset, **({"mask": mask} if with_mask else {})}
    expected = deform_conv2d_reference(x, weight, offset, bias if with_bias else np.zeros(6),
                                       mask if with_mask else np.ones_like(mask), [1, 1], [0, 0, 0, 0], [1, 1], 2, 2)
    assert rel_to_range(OpenVinoRunner(model).run(feed)["y"], expected) <= TOLERANCE


def test_runner_describes_itself_and_refuses_bad_feeds():
    model, _ = run_passes(onnx_from_model(torch.nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8)))
    runner = OpenVinoRunner(model, hint="throughput", threads=1)
    assert [(i.name, i.dtype, i.shape) for i in runner.inputs] == [("input", np.float32, (None, 3, 8, 8))]
    assert [(o.name, o.shape) for o in runner.outputs] == [("output", (None, 4, 6, 6))]
    description = runner.describe()
    assert description["runtime"] == "openvino" and description["hint"] == "THROUGHPUT"
    assert description["threads"] == 1 and "deploykit::DynamicConv2d" in description["conversions"]
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8))
    with pytest.raises(DeployError, match=r"^Input 'input' is float64; the model takes float32 .+\.$"):
        runner.run({"input": x})
    with pytest.raises(DeployError, match=r"^Input 'input' has shape \[2, 3, 9, 8\]; .+\.$"):
        runner.run({"input": np.zeros((2, 3, 9, 8), np.float32)})
    with pytest.raises(DeployError, match=r"^The feed has inputs \['image'\]; the model takes \['input'\]\.$"):
        runner.run({"image": x.astype(np.float32)})
    with pytest.raises(DeployError, match=r"^OpenVINO performance hint 'FAST' is unknown; .+\.$"):
        OpenVinoRunner(model, hint="fast")


def test_bad_paths_and_a_missing_openvino_are_one_sentence(tmp_path, monkeypatch):
    with pytest.raises(DeployError, match=r"^The ONNX file .+missing\.onnx does not exist\.$"):
        read_model(tmp_path / "missing.onnx")
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    with pytest.raises(DeployError, match=r"^OpenVINO \S+ cannot read .+broken\.onnx: .+\.$"):
        read_model(tmp_path / "broken.onnx")
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(DeployError, match=r"^OpenVINO is not installed; pip install 'deploykit\[openvino\]'\.$"):
        require_openvino()


# One zoo model per family, plus the TF-padded CondConv and the depthwise OD-MobileNet: full size, so slow.
ZOO = ("scnet50", "efficientnet_cc_b0_4e", "tf_efficientnet_cc_b0_4e", "dy_resnet18", "od_resnet18",
       "od_mobilenetv2_100", "dcn_resnet50", "dcnv1_resnet50", "tvconv_mobilenet_v2", "acmix_resnet26")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ZOO)
def test_zoo_model_in_openvino_and_onnxruntime(arch):
    """The zoo file (dynamic batch; dynamic spatial size where the model allows it) in both runtimes at batch 1 and
    3 (and a second size), each by the float64-anchored rule `export.py` verifies with."""
    from deploykit.models import MODELS, check_dynamic_spatial, random_model
    from test_models import assert_as_accurate_as_pytorch, input_size

    size = input_size(arch)
    dynamic_spatial = not MODELS[arch].fixed_size and MODELS[arch].static_spatial is None
    model = random_model(arch, input_shape=(3, size, size))
    exported, _ = run_passes(onnx_from_model(model, torch.randn(1, 3, size, size), dynamic_spatial=dynamic_spatial,
                                             min_spatial=check_dynamic_spatial(arch) if dynamic_spatial else None))
    runner, session = OpenVinoRunner(exported), session_from_onnx(exported, ["cpu"])
    shapes = [(1, 3, size, size), (3, 3, size, size)] + ([(2, 3, size + 32, size)] if dynamic_spatial else [])
    for shape in shapes:
        x = structured_noise(shape[0], shape[1:], torch.Generator().manual_seed(3))
        assert_as_accurate_as_pytorch(model, x, runner.run({"input": x.numpy()})["output"])
        assert_as_accurate_as_pytorch(model, x, session.run(None, {"input": x.numpy()})[0])


def test_ir_runs_in_a_bare_openvino(tmp_path):
    """The IR (for Triton's OpenVINO backend, which cannot load deploykit's Python conversions) needs no extension."""
    import openvino

    model = _Net(ODConv2d(8, 8, 3, padding=1, kernel_num=4), 8).eval()
    exported, _ = run_passes(onnx_from_model(model, torch.randn(1, 3, 10, 10)))
    xml = save_ir(exported, tmp_path / "model.xml")
    x = structured_noise(2, (3, 10, 10), torch.Generator().manual_seed(0)).numpy()
    bare = openvino.Core().compile_model(xml, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    expected = OpenVinoRunner(exported).run({"input": x})["output"]
    assert rel_to_range(bare({"input": x})[0], expected) <= 1e-6


def test_one_runner_serves_several_threads_as_one():
    from concurrent.futures import ThreadPoolExecutor

    model = _Net(ODConv2d(8, 8, 3, padding=1, kernel_num=4), 8).eval()
    runner = OpenVinoRunner(run_passes(onnx_from_model(model, torch.randn(1, 3, 10, 10)))[0])
    batches = [structured_noise(n % 3 + 1, (3, 10, 10), torch.Generator().manual_seed(n)).numpy() for n in range(12)]
    alone = [runner.run({"input": x})["output"] for x in batches]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda x: runner.run({"input": x})["output"], batches))
    assert all(np.array_equal(a, b) for a, b in zip(alone, together))
