"""Dynamic spatial export: one file runs at several input sizes and matches PyTorch; models that cannot refuse."""

from __future__ import annotations

import pytest
import torch

from deploykit.errors import DeployError
from deploykit.export.onnx import onnx_from_model
from deploykit.export.passes import run_passes
from deploykit.inputs import structured_noise
from deploykit.models import build_model, check_dynamic_spatial, random_model
from deploykit.runtime.ort import session_from_onnx
from deploykit.verify import rel_to_range

# Two sizes per model, non-square, neither the traced one; batch 1 and 2 from the same file.
SIZES = ((1, 3, 128, 160), (2, 3, 96, 96))
TRACED = (1, 3, 112, 144)


def _headless_dcn_backbone() -> torch.nn.Module:
    """dcn_resnet50 as the pipeline builds it from an mmdet detector checkpoint: no classifier (num_classes=0),
    the output is layer4's feature map."""
    classifier = random_model("dcn_resnet50", input_shape=TRACED[1:], calibration_batches=1)
    state_dict = {k: v for k, v in classifier.state_dict().items() if not k.startswith("fc.")}
    return build_model("dcn_resnet50", {"num_classes": 0}, state_dict)


MODELS = {
    "od_resnet18": lambda: random_model("od_resnet18", input_shape=TRACED[1:], calibration_batches=1),
    "dcn_resnet50": lambda: random_model("dcn_resnet50", input_shape=TRACED[1:], calibration_batches=1),
    "dcn_resnet50_headless": _headless_dcn_backbone,
}
# The classifier adds only pooling and a Linear to the headless backbone: slow, to keep the default suite short.
_SLOW = {"dcn_resnet50"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW else n for n in sorted(MODELS)])
def test_one_file_serves_several_sizes(name):
    model = MODELS[name]()
    min_size = check_dynamic_spatial(name.removesuffix("_headless"))
    exported, _ = run_passes(onnx_from_model(model, torch.randn(TRACED), dynamic_spatial=True, min_spatial=min_size))

    dims = exported.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "", "height", "width"] and dims[1].dim_value == 3
    for value in (*exported.graph.value_info, *exported.graph.output):  # shape inference stays complete
        assert all(d.HasField("dim_value") or d.HasField("dim_param") for d in value.type.tensor_type.shape.dim), \
            value.name
    session = session_from_onnx(exported, ["cpu"])
    generator = torch.Generator().manual_seed(0)
    for shape in SIZES:
        x = structured_noise(shape[0], shape[1:], generator)
        with torch.no_grad():
            expected = model(x).numpy()
        actual = session.run(None, {"input": x.numpy()})[0]
        assert actual.shape == expected.shape and rel_to_range(actual, expected) <= 1e-4, shape


@pytest.mark.parametrize("arch", ["tvconv_mobilenet_v2", "acmix_resnet26", "tf_efficientnet_cc_b0_4e"])
def test_size_specific_models_refuse(arch):
    with pytest.raises(DeployError, match=f"^{arch} cannot export a dynamic spatial size: .+\\.$"):
        check_dynamic_spatial(arch)


def test_dynamic_spatial_needs_a_dynamic_batch():
    with pytest.raises(DeployError, match="dynamic batch"):
        onnx_from_model(torch.nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8), dynamic_batch=False, dynamic_spatial=True)


class _DeformableNet(torch.nn.Module):
    """Conv, a modulated deformable conv, global pool: the detection-backbone pattern, small enough to export fast."""

    def __init__(self):
        super().__init__()
        from deploykit.nn import ModulatedDeformConv2d

        self.stem = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.dcn = ModulatedDeformConv2d(8, 8, 3, padding=1)
        torch.nn.init.normal_(self.dcn.conv_offset.weight, std=0.05)  # offsets that depend on the input
        self.head = torch.nn.Linear(8, 6)

    def forward(self, x):
        return self.head(torch.relu(self.dcn(torch.relu(self.stem(x)))).mean((2, 3)))


def test_the_pipeline_verifies_a_second_size_and_serves_every_size(tmp_path):
    from deploykit import ExportConfig, export_model
    from deploykit.runtime import Predictor

    torch.manual_seed(0)
    model = _DeformableNet().eval()
    result = export_model(ExportConfig(model=model, input_shape=(1, 3, 48, 40), dynamic_spatial=True,
                                       output_dir=tmp_path / "out", triton_repo=tmp_path / "models"))
    assert result.verdict == "passed"
    assert result.report["export"]["dynamic_spatial"]["verified_shapes"] == [[1, 3, 48, 40], [2, 3, 80, 72]]
    assert "dims: [ 3, -1, -1 ]" in (tmp_path / "models" / "DeformableNet" / "config.pbtxt").read_text()
    predictor = Predictor(tmp_path / "out")
    x = structured_noise(2, (3, 65, 33), torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert rel_to_range(predictor(x.numpy()), model(x).numpy()) <= 1e-4


def test_static_batch_conflicts_with_dynamic_spatial():
    from deploykit import ExportConfig

    with pytest.raises(DeployError, match="--dynamic-spatial needs a dynamic batch"):
        ExportConfig(model="x.pt", dynamic_batch=False, dynamic_spatial=True)


def test_export_py_refuses_tvconv_in_one_sentence_and_writes_nothing(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    checkpoint = tmp_path / "tvconv.pt"
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "models", "tvconv_mobilenet_v2_x0_1", "-o", str(checkpoint)], cwd=root,
                   check=True, capture_output=True)
    done = subprocess.run([sys.executable, "export.py", "--model", str(checkpoint), "--dynamic-spatial", "-o",
                           str(tmp_path / "out")], cwd=root, capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == ("error: tvconv_mobilenet_v2_x0_1 cannot export a dynamic spatial "
                                                    "size: its per-pixel weights are learned at 96x96, the only size "
                                                    "it takes.")
    assert not (tmp_path / "out").exists()
