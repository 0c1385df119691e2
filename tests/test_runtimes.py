"""One seam for runtimes (`deploykit.runtime.base`): the pipeline verifies the same file in every runtime asked for,
the Predictor runs any of them, and a Triton repository carries an OpenVINO-backend model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import DivergesWhenExported, assert_one_sentence, tiny_conv_net
from deploykit import DeployError, ExportConfig, export_model
from deploykit.runtime import Predictor
from deploykit.runtime.base import RUNTIMES, load_runner
from deploykit.serving import parse_config
from test_own_model import TinyDetector, seeded

openvino = pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'deploykit[openvino]')")


@pytest.fixture(scope="module")
def detector_export(tmp_path_factory):
    """A two-input-free detector with a deformable head: dict outputs, dynamic batch and size, verified in
    onnxruntime and OpenVINO, with a Triton repository."""
    model = seeded(TinyDetector())
    with torch.no_grad():
        model.head.conv_offset.weight.mul_(0.1)
    root = tmp_path_factory.mktemp("runtimes")
    result = export_model(ExportConfig(model=model, input_shape=(1, 3, 40, 40), dynamic_spatial=True,
                                       runtimes=["onnxruntime", "openvino"], output_dir=root / "out",
                                       triton_repo=root / "triton"))
    return model, result


def test_the_same_file_is_verified_in_every_runtime_asked_for(detector_export):
    _, result = detector_export
    assert result.verdict == "passed"
    section = result.report["openvino"]
    assert section["runtime"]["runtime"] == "openvino" and section["verification"]["verdict"] == "passed"
    assert section["verification"]["counts"]["passed"] == len(result.report["verification"]["samples"])


def test_a_runtime_that_fails_fails_the_run(tmp_path, monkeypatch):
    """The verdict is the worst over the runtimes: OpenVINO made 1% off here fails the run, onnxruntime passes."""
    from deploykit.runtime import openvino as ov_runtime

    run = ov_runtime.OpenVinoRunner.run
    monkeypatch.setattr(ov_runtime.OpenVinoRunner, "run",
                        lambda self, feed: {k: v * 1.01 for k, v in run(self, feed).items()})
    result = export_model(ExportConfig(model=tiny_conv_net(), input_shape=(1, 3, 16, 16),
                                       runtimes=["openvino"], output_dir=tmp_path / "out"))
    assert result.report["verification"]["verdict"] == "passed"
    assert result.report["openvino"]["verification"]["verdict"] == "failed" and result.verdict == "failed"


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_predictor_runs_any_runtime_with_the_models_structure(detector_export, runtime):
    model, result = detector_export
    x = np.random.default_rng(5).standard_normal((3, 3, 56, 48)).astype(np.float32)
    with torch.no_grad():
        expected = model.double()(torch.from_numpy(x).double())
    with Predictor(result.output_dir, runtime=runtime) as predictor:
        got = predictor(x)
    assert set(got) == {"p3", "p4"}
    for name in got:
        want = expected[name].numpy()
        assert np.abs(got[name] - want).max() <= 1e-4 * np.abs(want).max()


def test_triton_repository_carries_an_openvino_backend_model(detector_export):
    _, result = detector_export
    assert result.report["triton"]["models"] == ["TinyDetector", "TinyDetector_openvino"]
    folder = result.report["triton"]["repository"] + "/TinyDetector_openvino"
    config = parse_config(open(f"{folder}/config.pbtxt").read())
    assert config.backend == "openvino" and config.max_batch_size == 8
    assert [i.name for i in config.input] == ["input"] and [list(i.dims) for i in config.input] == [[3, -1, -1]]
    assert [o.name for o in config.output] == ["p3", "p4"]
    parameters = {p: config.parameters[p].string_value for p in config.parameters}
    assert parameters == {"INFERENCE_PRECISION_HINT": "f32"}
    # The IR reads in a bare OpenVINO (no deploykit conversions registered) and computes what the file computes.
    compiled = openvino.Core().compile_model(f"{folder}/1/model.xml", "CPU", parameters)
    x = np.random.default_rng(6).standard_normal((2, 3, 40, 40)).astype(np.float32)
    ir = compiled(x)
    onnx_outputs = Predictor(result.output_dir).run({"input": x})
    for port in compiled.outputs:
        name = port.get_any_name()
        assert np.abs(ir[port] - onnx_outputs[name]).max() <= 1e-5 * np.abs(onnx_outputs[name]).max()


def test_runner_interface_is_the_same_for_every_runtime(detector_export):
    _, result = detector_export
    feed = {"input": np.random.default_rng(7).standard_normal((2, 3, 40, 40)).astype(np.float32)}
    outputs = {}
    for runtime in ("onnxruntime", "openvino"):
        runner = load_runner(runtime, result.files["model.onnx"], threads=1, hint="LATENCY", providers=["cpu"])
        assert [i.name for i in runner.inputs] == ["input"] and [o.name for o in runner.outputs] == ["p3", "p4"]
        assert runner.batch_range == (1, None) and runner.describe()["runtime"] == runtime
        outputs[runtime] = runner.run(feed)
        runner.close()
    for name in ("p3", "p4"):
        a, b = outputs["onnxruntime"][name], outputs["openvino"][name]
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()


def test_unknown_runtimes_are_one_sentence():
    with pytest.raises(DeployError) as err:
        ExportConfig(model="x.pt", runtimes=["onnxruntime", "tflite"])
    assert_one_sentence(err.value, "'tflite'", ", ".join(RUNTIMES))
    assert ExportConfig(model="x.pt", runtimes=["tensorrt"]).engine  # --engine folds into --runtimes


def test_diverging_model_fails_in_both_and_names_the_module(tmp_path):
    model = DivergesWhenExported(tiny_conv_net()).eval()
    result = export_model(ExportConfig(model=model, input_shape=(1, 3, 16, 16), runtimes=["openvino"],
                                       output_dir=tmp_path / "out"))
    assert result.verdict == "failed" and result.report["openvino"]["verification"]["verdict"] == "failed"
    assert result.report["verification"]["first_divergence"]["module"] == ""


@pytest.mark.parametrize("family", ["odconv", "odconv_late", "condconv_depthwise", "scconv", "deform_conv"])
def test_the_int8_file_runs_and_verifies_in_openvino_too(family, tmp_path):
    """The QDQ file, per-sample kernels dense and depthwise (their Q/DQ pairs as FakeQuantize ops), a dynamic conv's
    bank form and deformable taps (GridSample) included, judged like onnxruntime's and computing what onnxruntime's computes up to int8 rounding."""
    from bench.photos import CALIBRATION_PHOTOS, VERIFICATION_PHOTOS, save_crops
    from deploykit.quantize import sqnr_db
    from test_quantize import int8_config, tiny_model

    photos = save_crops(tmp_path / "calibration", CALIBRATION_PHOTOS), save_crops(tmp_path / "held", VERIFICATION_PHOTOS)
    result = export_model(int8_config(tiny_model(family), photos, tmp_path, runtimes=["openvino"]))
    section = result.report["quantization"]["openvino"]
    assert section["run"] and section["verdict"] == "passed" and result.verdict == "passed"
    feed = {"input": np.random.default_rng(8).standard_normal((3, 3, 64, 64)).astype(np.float32)}
    ort_int8 = Predictor(result.output_dir, precision="int8").run(feed)["output"]
    ov_int8 = Predictor(result.output_dir, runtime="openvino", precision="int8").run(feed)["output"]
    assert sqnr_db(ov_int8, ort_int8) >= 30
