"""`Predictor`: runs an export directory or a bare .onnx exactly as a direct onnxruntime session does, takes any
batch size (a static-batch model runs in padded chunks), answers many threads at once exactly as one thread does,
and refuses bad paths and bad inputs with one sentence. TensorRT runs only where it is installed (marked `trt`);
without it, asking for it fails in one sentence."""

from __future__ import annotations

import importlib.util
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import pytest
import torch
from conftest import assert_one_sentence, export_tiny, tiny_conv_net
from onnx import TensorProto, helper

from deploykit import ExportConfig, export_model
from deploykit.errors import DeployError
from deploykit.runtime import Predictor
from deploykit.runtime.ort import session_from_onnx

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def images(batch: int, seed: int = 5, channels: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, channels, 16, 16)).astype(np.float32)


@pytest.fixture(scope="module")
def module() -> torch.nn.Module:
    return tiny_conv_net()


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, module):
    """A real export (the pipeline's model.onnx and report.json) of the tiny net."""
    out = tmp_path_factory.mktemp("export")
    assert export_model(ExportConfig(model=module, input_shape=(1, 3, 16, 16), output_dir=out)).passed
    return out


@pytest.fixture(scope="module")
def static_file(tmp_path_factory, module):
    """The tiny net exported with a static batch of 2."""
    path = tmp_path_factory.mktemp("static") / "static.onnx"
    onnx.save_model(export_tiny(module, batch=2, dynamic_batch=False), path)
    return path


@pytest.fixture(scope="module")
def two_in_two_out(tmp_path_factory):
    """sum = a + b, product = a * b, on [batch, 3] float32 inputs: the shape of a multi-input model."""
    a, b = (helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 3]) for n in "ab")
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 3]) for n in ("sum", "product")]
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["sum"]), helper.make_node("Mul", ["a", "b"],
                                                                                                ["product"])],
                              "two", [a, b], outputs)
    path = tmp_path_factory.mktemp("two") / "two.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10), path)
    return path


def direct(model_file, x: np.ndarray) -> np.ndarray:
    return session_from_onnx(onnx.load(model_file), ["cpu"]).run(None, {"input": x})[0]


def test_export_directory_matches_a_direct_session(export_dir):
    predictor = Predictor(export_dir)
    assert predictor.runtime == "onnxruntime" and predictor.path == export_dir / "model.onnx"
    assert [(i.name, i.dtype, i.shape) for i in predictor.inputs] == [("input", np.float32, ("batch", 3, 16, 16))]
    assert [(o.name, o.dtype, o.shape) for o in predictor.outputs] == [("output", np.float32, ("batch", 5))]
    report = json.loads((export_dir / "report.json").read_text())
    assert predictor.providers == report["runtime"]["providers"]
    for batch in (1, 4):
        x = images(batch)
        assert np.array_equal(predictor(x), direct(export_dir / "model.onnx", x))
        assert np.array_equal(predictor.run({"input": x})["output"], predictor(x))


def test_bare_onnx_file_matches_a_direct_session(static_file, two_in_two_out):
    x = images(2)
    assert np.array_equal(Predictor(static_file)(x), direct(static_file, x))
    a, b = (np.random.default_rng(seed).standard_normal((4, 3)).astype(np.float32) for seed in (1, 2))
    outputs = Predictor(two_in_two_out).run({"a": a, "b": b})
    assert set(outputs) == {"sum", "product"}
    assert np.array_equal(outputs["sum"], a + b) and np.array_equal(outputs["product"], a * b)


@pytest.mark.parametrize("batch", [3, 5])
def test_static_batch_model_takes_any_batch(static_file, module, batch):
    """Batch 2 fixed in the graph: 3 and 5 run as chunks of 2, the last padded, and every row is its own answer."""
    predictor = Predictor(static_file)
    x = images(batch)
    y = predictor(x)
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    assert y.shape == expected.shape
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert np.array_equal(y[:2], predictor(x[:2]))  # a full chunk is the direct run


@pytest.mark.parametrize("model", ["dynamic", "static"])
def test_many_threads_get_exactly_the_sequential_answers(export_dir, static_file, model):
    predictor = Predictor(export_dir if model == "dynamic" else static_file)
    rng = np.random.default_rng(7)
    requests = [rng.standard_normal((int(rng.integers(1, 6)), 3, 16, 16)).astype(np.float32) for _ in range(200)]
    sequential = [predictor(x) for x in requests]
    start = threading.Barrier(8)

    def serve(share: list[int]) -> list[tuple[int, np.ndarray]]:
        start.wait()
        return [(i, predictor(requests[i])) for i in share]

    with ThreadPoolExecutor(8) as pool:
        answers = [a for chunk in pool.map(serve, [list(range(t, 200, 8)) for t in range(8)]) for a in chunk]
    assert len(answers) == 200
    assert all(np.array_equal(answer, sequential[i]) for i, answer in answers)


@pytest.mark.parametrize("feeds, fragments", [
    ({"image": images(1)}, ["no input named 'image'", "'input'"]),
    ({}, ["'input' is missing"]),
    ({"input": images(1).astype(np.float64)}, ["dtype float64", "takes float32"]),
    ({"input": images(1)[0]}, ["has 3 dimensions", "takes 4"]),
    ({"input": images(1, channels=4)}, ["size 4 at dimension 1", "takes 3 there"]),
    ({"input": images(1)[:, :, :8]}, ["size 8 at dimension 2", "takes 16 there"]),
    ({"input": images(0)}, ["empty"]),
])
def test_bad_inputs_are_refused_in_one_sentence(export_dir, feeds, fragments):
    with pytest.raises(DeployError) as err:
        Predictor(export_dir).run(feeds)
    assert_one_sentence(err.value, *fragments)


def test_multi_io_models_take_every_input_and_one_batch(two_in_two_out):
    """A bare file has no recorded structure: its two outputs come back as a dict by name."""
    predictor = Predictor(two_in_two_out)
    a, b = (np.random.default_rng(seed).standard_normal((2, 3)).astype(np.float32) for seed in (1, 2))
    outputs = predictor(a, b)
    assert set(outputs) == {"sum", "product"} and np.array_equal(outputs["product"], a * b)
    with pytest.raises(DeployError) as err:
        predictor(a)
    assert_one_sentence(err.value, "takes 2 input(s) (a, b) but 1 were given", "predictor.run")
    with pytest.raises(DeployError) as err:
        predictor.run({"a": a, "b": a[:1]})
    assert_one_sentence(err.value, "different batch sizes", "a: 2", "b: 1")


@pytest.mark.parametrize("case, fragments", [
    ("missing", ["does not exist"]),
    ("empty_dir", ["holds no model.onnx"]),
    ("corrupt_onnx", ["not an ONNX model", "corrupt or truncated"]),
    ("corrupt_report", ["Cannot read the export report"]),
    ("other_suffix", ["neither an export directory nor a .onnx or .plan file"]),
    ("unknown_runtime", ["Unknown runtime 'tflite'"]),
    ("onnx_as_tensorrt", ["is an ONNX model", "model.plan"]),
    ("dir_without_engine", ["holds no model.plan", "--engine"]),
])
def test_bad_paths_are_refused_in_one_sentence(tmp_path, export_dir, case, fragments):
    runtime = {"unknown_runtime": "tflite", "onnx_as_tensorrt": "tensorrt", "dir_without_engine": "tensorrt"}
    path = {"missing": tmp_path / "nothing", "empty_dir": tmp_path, "corrupt_onnx": tmp_path / "model.onnx",
            "corrupt_report": tmp_path, "other_suffix": tmp_path / "model.pt", "unknown_runtime": export_dir,
            "onnx_as_tensorrt": export_dir / "model.onnx", "dir_without_engine": export_dir}[case]
    model_bytes = (export_dir / "model.onnx").read_bytes()
    if case == "corrupt_onnx":
        path.write_bytes(model_bytes[: len(model_bytes) // 2])
    elif case == "corrupt_report":
        (tmp_path / "model.onnx").write_bytes(model_bytes)
        (tmp_path / "report.json").write_text('{"runtime": {"providers": ')
    elif case == "other_suffix":
        path.write_bytes(b"not a model")
    with pytest.raises(DeployError) as err:
        Predictor(path, runtime=runtime.get(case))
    assert_one_sentence(err.value, *fragments)


def test_two_onnxruntime_wheels_are_refused(export_dir, monkeypatch):
    """onnxruntime-gpu installed over the base dependency's onnxruntime: one sentence with the command that fixes it."""
    import importlib.metadata

    from deploykit.runtime import ort

    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda wheel: "1.32.0" if wheel == "onnxruntime-gpu" else real_version(wheel))
    ort.check_one_onnxruntime.cache_clear()
    try:
        with pytest.raises(DeployError) as err:
            Predictor(export_dir)
    finally:
        monkeypatch.undo()
        ort.check_one_onnxruntime.cache_clear()
    assert_one_sentence(err.value, "onnxruntime, onnxruntime-gpu are installed together",
                        "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu")


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here: the missing-TensorRT path cannot be shown")
@pytest.mark.parametrize("how", ["plan_file", "export_dir"])
def test_tensorrt_without_tensorrt_is_one_sentence(tmp_path, export_dir, how):
    (tmp_path / "model.onnx").write_bytes((export_dir / "model.onnx").read_bytes())
    (tmp_path / "model.plan").write_bytes(b"an engine that is never read")
    with pytest.raises(DeployError) as err:
        if how == "plan_file":
            Predictor(tmp_path / "model.plan")
        else:
            Predictor(tmp_path, runtime="tensorrt")
    assert_one_sentence(err.value, "model.plan needs TensorRT", "not installed")


@pytest.mark.trt
@pytest.mark.skipif(not HAS_TENSORRT, reason="needs TensorRT (and a GPU)")
def test_tensorrt_engine_splits_batches_beyond_its_profile(tmp_path, module):
    """An engine for batch 1-2: batch 5 runs as 2+2+1, equal to onnxruntime within fp32 tolerance, from 4 threads."""
    from deploykit.runtime import trt

    model = export_tiny(module)
    engine = trt.build_engine(model.SerializeToString(), "input", trt.EngineShapes((1, 3, 16, 16), (2, 3, 16, 16),
                                                                                   (2, 3, 16, 16)))
    (tmp_path / "model.plan").write_bytes(engine)
    x = images(5)
    expected = session_from_onnx(model, ["cpu"]).run(None, {"input": x})[0]
    with Predictor(tmp_path / "model.plan") as predictor:
        assert predictor.runtime == "tensorrt" and predictor.inputs[0].shape == (None, 3, 16, 16)
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(predictor, [x] * 8))
    for answer in answers:
        np.testing.assert_allclose(answer, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
