"""TensorRT engines: without TensorRT, asking for one fails early with one sentence and writes nothing (these tests
run everywhere); with TensorRT, a GPU and the built plugin library, engines of models with deploykit:: nodes are
built, run and verified against PyTorch in fp32 and fp16 at several batch sizes (marked `trt`, deselected by
default: ``pytest -m trt``)."""

from __future__ import annotations

import importlib.util
import shlex

import pytest
import torch

from deploykit import cli
from deploykit.config import ExportConfig
from deploykit.errors import DeployError
from deploykit.runtime import trt

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here: the missing-TensorRT path cannot be shown")
def test_engine_without_tensorrt_fails_in_one_sentence_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["--model", str(tmp_path / "never-read.pt"), "--engine", "--output-dir", str(out)]) == 2
    message = capsys.readouterr().err.strip()
    assert message.count("\n") == 0 and message.startswith("error: ") and message.endswith(".")
    assert "TensorRT" in message and "not installed" in message
    assert not out.exists()  # checked before the checkpoint is even opened


def test_engine_options_need_engine():
    with pytest.raises(DeployError, match="--engine"):
        ExportConfig(model="m.pt", fp16=True)
    with pytest.raises(DeployError, match="max_batch"):
        ExportConfig(model="m.pt", engine=True, max_batch=0)


def test_named_plugin_library_must_exist(tmp_path, monkeypatch):
    with pytest.raises(DeployError, match="does not exist"):
        trt.find_plugin_library(tmp_path / "libmissing.so")
    monkeypatch.setenv(trt.PLUGIN_LIBRARY_ENV, str(tmp_path / "libalso-missing.so"))
    with pytest.raises(DeployError, match="DEPLOYKIT_PLUGINS"):
        trt.find_plugin_library()
    library = tmp_path / "libdeploykit_plugins.so"
    library.write_bytes(b"")
    assert trt.find_plugin_library(library) == library.resolve()


def test_profile_and_reproduce_commands():
    shapes = trt.EngineShapes.spanning([(1, 3, 64, 48), (2, 3, 64, 48)], dynamic_batch=True, max_shape=(8, 3, 64, 48))
    assert (shapes.min, shapes.opt, shapes.max) == ((1, 3, 64, 48), (1, 3, 64, 48), (8, 3, 64, 48))
    static = trt.EngineShapes.spanning([(4, 3, 64, 48)], dynamic_batch=False)
    assert static.min == static.opt == static.max == (4, 3, 64, 48)
    spatial = trt.EngineShapes.spanning([(1, 3, 224, 224), (2, 3, 192, 256)], dynamic_batch=True, min_spatial=32)
    assert (spatial.min, spatial.opt, spatial.max) == ((1, 3, 32, 32), (1, 3, 224, 224), (2, 3, 224, 256))
    with pytest.raises(DeployError, match="keep its fixed dimensions"):
        trt.EngineShapes.spanning([(1, 3, 64, 48)], dynamic_batch=True, max_shape=(8, 3, 96, 48))
    with pytest.raises(DeployError, match="must contain every verification shape"):
        trt.EngineShapes.spanning([(1, 3, 224, 224)], dynamic_batch=True, min_spatial=32, max_shape=(4, 3, 160, 160))
    polygraphy = shlex.split(trt.polygraphy_trt_command("model.onnx", "inputs.json", "torch_outputs.json", "input",
                                                       shapes, True, None, 0.01, 0.01))
    assert polygraphy[:4] == ["polygraphy", "run", "model.onnx", "--trt"] and "--fp16" in polygraphy
    assert polygraphy[polygraphy.index("--trt-max-shapes") + 1] == "input:[8,3,64,48]"
    trtexec = trt.trtexec_command("model.onnx", "model.plan", "input", shapes, False, None)
    assert "--maxShapes=input:8x3x64x48" in trtexec and "--fp16" not in trtexec


# --- with TensorRT ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plugin_library():
    if not HAS_TENSORRT:
        pytest.skip("TensorRT is not installed")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    library = trt.find_plugin_library()
    if library is None:
        pytest.skip("libdeploykit_plugins.so is not built (cmake -S plugins -B plugins/build && "
                    "cmake --build plugins/build), or set DEPLOYKIT_PLUGINS")
    return library


@pytest.mark.trt
@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
@pytest.mark.parametrize("arch", ["dcn_resnet50", "od_resnet18", "efficientnet_cc_b0_4e"])
def test_engine_with_plugins_matches_pytorch(arch, fp16, plugin_library, tmp_path):
    from deploykit.models import random_model

    from deploykit.checkpoint import write_checkpoint
    from deploykit.pipeline import export_model

    checkpoint = write_checkpoint(tmp_path / f"{arch}.pt", arch, random_model(arch).state_dict())
    result = export_model(ExportConfig(model=checkpoint, input_shape=(2, 3, 128, 128), engine=True, fp16=fp16,
                                       max_batch=4, plugins=plugin_library, output_dir=tmp_path / "out"))
    report = result.report
    assert report["export"]["custom_nodes"], "the engine must run deploykit's plugins"
    assert report["tensorrt"]["verification"]["passed"], report["tensorrt"]["verification"]
    assert (tmp_path / "out" / "model.plan").stat().st_size > 0
