"""Issue 19's fixes that are not refusals (those are in the bad-input catalogue, tests/test_bad_inputs.py): image
modes read to the right values, the replay line pasted as printed, which input is which, a second batch size on
the user's own input, progress from the Python API, real safetensors from the zoo tool, report fields, the README.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_one_sentence, tiny_conv_net
from deploykit import cli
from deploykit.checkpoint import load_checkpoint
from deploykit.config import ExportConfig
from deploykit.errors import DeployError
from deploykit.images import Preprocessing, load_images
from deploykit.models import arch_from_file_name, build_model
from deploykit.pipeline import export_model

REPO = Path(__file__).resolve().parents[1]
PLAIN = Preprocessing(mean=(0.0,), std=(1.0,), crop_fraction=1.0)  # pixels as read, in [0, 1], no resampling


def _ramp(height: int = 12, width: int = 16) -> np.ndarray:
    """A non-constant 8-bit RGB image: a colour ramp plus seeded noise."""
    rng = np.random.default_rng(0)
    base = np.linspace(0, 255, height * width * 3).reshape(height, width, 3)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name, mode", [("g16.png", "I;16"), ("g16.tiff", "I;16B")])
def test_16_bit_grey_images_read_to_their_values_not_clipped_white(tmp_path, name, mode):
    pixels = np.random.default_rng(1).integers(0, 65536, (12, 16), dtype=np.uint16)
    Image.frombytes(mode, (16, 12), pixels.astype(">u2" if mode.endswith("B") else "<u2").tobytes()).save(
        tmp_path / name)
    assert Image.open(tmp_path / name).mode == mode
    read = load_images([tmp_path / name], (3, 12, 16), PLAIN)[0]
    expected = pixels.astype(np.float64) / 65535
    for channel in read:
        assert np.abs(channel - expected).max() <= 1e-6


@pytest.mark.parametrize("mode", ["L", "P", "LA", "RGBA", "CMYK", "1"])
def test_every_8_bit_mode_reads_as_pillow_converts_it(tmp_path, mode):
    rgb = Image.fromarray(_ramp())
    image = rgb.convert(mode)
    path = tmp_path / f"x.{'tiff' if mode == 'CMYK' else 'png'}"
    image.save(path)
    read = load_images([path], (3, 12, 16), PLAIN)[0]
    expected = np.asarray(image.convert("RGB"), dtype=np.float64).transpose(2, 0, 1) / 255
    assert np.abs(read - expected).max() <= 1e-6 and read.std() > 0.05


def test_float_image_in_unit_range_is_read_as_is(tmp_path):
    pixels = np.random.default_rng(2).random((12, 16), dtype=np.float32)
    Image.fromarray(pixels).save(tmp_path / "f.tiff")
    read = load_images([tmp_path / "f.tiff"], (1, 12, 16), PLAIN)[0, 0]
    assert np.abs(read - pixels).max() <= 1e-6


@pytest.mark.parametrize("name, arch", [("od_resnet18_fp16.safetensors", "od_resnet18"),
                                        ("scnet50-dc6a7e87.pth", "scnet50"), ("scnet50.bf16.pt", "scnet50"),
                                        ("od_resnet18_fp16-0123abcd.pth", "od_resnet18"), ("resnet9000.pt", None)])
def test_architecture_from_the_file_name(name, arch):
    assert arch_from_file_name(name) == arch


def test_zoo_tool_writes_real_safetensors_with_the_arch(tmp_path, monkeypatch, capsys):
    import deploykit.models.__main__ as zoo_tool

    model = build_model("od_resnet18")
    monkeypatch.setattr(zoo_tool, "random_model", lambda arch, seed: model)  # no calibration: fast
    path = tmp_path / "od.safetensors"
    assert zoo_tool.main(["od_resnet18", "-o", str(path)]) == 0
    assert "calibrating its BatchNorms" in capsys.readouterr().err  # said before the long silent step
    header = int.from_bytes(path.read_bytes()[:8], "little")
    assert json.loads(path.read_bytes()[8:8 + header])["__metadata__"]["arch"] == '"od_resnet18"'
    checkpoint = load_checkpoint(path)
    expected = model.state_dict()
    assert checkpoint.arch == "od_resnet18" and checkpoint.metadata["input_shape"] == [3, 224, 224]
    assert all(torch.equal(checkpoint.state_dict[k], v) for k, v in expected.items())


@pytest.mark.parametrize("argv, fragment", [
    (["-o", "{tmp}/mine.pt"], "exists already; choose another name, or pass --overwrite"),
    (["-o", "{tmp}"], "is a directory"),
    (["-o", "{tmp}/mine.pt/x.pt"], "is not writable"),
    (["-o", "{tmp}/new.pt", "--seed", "99999999999999999999999"], "--seed must be an integer from 0 to"),
])
def test_zoo_tool_refuses_before_the_minute_of_calibration(tmp_path, monkeypatch, capsys, argv, fragment):
    import deploykit.models.__main__ as zoo_tool

    monkeypatch.setattr(zoo_tool, "random_model", lambda arch, seed: pytest.fail("calibrated before refusing"))
    (tmp_path / "mine.pt").write_bytes(b"the user's own checkpoint")
    assert zoo_tool.main(["od_resnet18", *(a.replace("{tmp}", str(tmp_path)) for a in argv)]) == 2
    assert_one_sentence(capsys.readouterr().err.strip().removeprefix("error: "), fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.pt"]
    assert (tmp_path / "mine.pt").read_bytes() == b"the user's own checkpoint"


def _replay_line(stderr: str) -> str:
    return next(line for line in stderr.splitlines() if line.startswith("reproduce: ")).removeprefix("reproduce: ")


def test_float64_inputs_are_cast_aloud_checked_at_two_batch_sizes_and_replayed_from_an_odd_path(tmp_path, capsys,
                                                                                             monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(tiny_conv_net(), tmp_path / "tiny.pt")
    array = np.random.default_rng(3).standard_normal((1, 3, 16, 16))  # float64, batch 1
    np.savez(tmp_path / "x.npz", input=array)
    out = tmp_path / "out dir" / "résultat 'v1'"
    assert cli.main(["--model", str(tmp_path / "tiny.pt"), "--trust-pickle", "--input-shape", "1x3x16x16",
                     "--inputs", str(tmp_path / "x.npz"), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "is float64: cast to float32" in err
    report = json.loads((out / "report.json").read_text())
    assert [o["shape"][0] for o in report["verification"]["outputs"]] == [1, 2]  # a second batch size, same data
    assert report["input_sources"] == [[f"{tmp_path / 'x.npz'} sample 0"], [f"{tmp_path / 'x.npz'} sample 0"] * 2]
    replay = subprocess.run(_replay_line(err), shell=True, cwd=tmp_path, capture_output=True, text=True)
    assert replay.returncode == 0, replay.stdout + replay.stderr


def test_images_are_named_per_batch_and_one_image_is_checked_at_two_batch_sizes(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(tiny_conv_net(), tmp_path / "tiny.pt")
    Image.fromarray(_ramp(24, 24)).save(tmp_path / "cat.png")
    assert cli.main(["--model", str(tmp_path / "tiny.pt"), "--trust-pickle", "--input-shape", "1x3x16x16",
                     "--images", str(tmp_path / "cat.png")]) == 0
    err = capsys.readouterr().err
    assert f"batch 1: {tmp_path / 'cat.png'}, {tmp_path / 'cat.png'}" in err
    assert re.search(r"PASSED: .* sample \d of batch \d \(.*cat\.png\) at ", err), err
    report = json.loads((tmp_path / "deploykit-out" / "Sequential" / "report.json").read_text())  # its class
    assert [o["shape"][0] for o in report["verification"]["outputs"]] == [1, 2]
    assert report["input_sources"] == [[str(tmp_path / "cat.png")], [str(tmp_path / "cat.png")] * 2]
    assert report["config"]["output_dir"] == "deploykit-out/Sequential"  # the default directory, not null
    passes = report["export"]["passes"]
    assert passes["parameter_change"] == passes["after"]["parameters"] - passes["before"]["parameters"]


def test_the_python_api_logs_progress_once_per_call_and_respects_the_callers_logging(tmp_path, capsys, monkeypatch):
    logger = logging.getLogger("deploykit")  # as in a plain script: pytest and earlier CLI runs configured them
    for name, value in (("handlers", []), ("level", logging.NOTSET), ("propagate", True)):
        monkeypatch.setattr(logger, name, value)
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    config = dict(model=tiny_conv_net(), input_shape=(1, 3, 16, 16), output_dir=tmp_path / "out")
    for _ in range(2):
        export_model(ExportConfig(**config))
        assert capsys.readouterr().err.count("Exporting ONNX") == 1  # not once more per earlier call
    export_model(ExportConfig(**config, progress=False))
    assert capsys.readouterr().err == ""
    assert logger.handlers == [] and logger.level == logging.NOTSET  # nothing left behind

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.handlers = [handler]  # the caller's own configuration of deploykit's logger
    logger.setLevel(logging.INFO)  # (setLevel, not the attribute: it also clears the loggers' level caches)
    try:
        export_model(ExportConfig(**config))
    finally:
        logger.setLevel(logging.NOTSET)
    assert capsys.readouterr().err == "" and any("Exporting ONNX" in r.getMessage() for r in records)


def test_the_readme_installs_the_cpu_build_and_ci_is_unchanged():
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"```\n(pip install .*)\n```", readme)
    assert len(commands) == 2
    for command in commands:
        assert command.startswith("pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu && ")
    assert "python -m pip install --quiet --disable-pip-version-check torch==2.13.0\n" in \
        (REPO / ".ci" / "run").read_text()


def test_paths_that_cannot_be_opened_say_why(tmp_path):
    from deploykit.fileio import missing_reason
    from deploykit.runtime.predictor import Predictor

    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    (tmp_path / "broken").symlink_to(tmp_path / "gone")
    assert missing_reason(tmp_path / "a") == "is a symbolic link loop"
    assert missing_reason(tmp_path / "a" / "model.onnx") == "lies under a symbolic link loop"
    assert missing_reason(tmp_path / "broken") == f"is a symbolic link to {tmp_path / 'gone'}, which does not exist"
    assert missing_reason(tmp_path / "nothing") == "does not exist"
    assert missing_reason(tmp_path) == "is a directory"
    with pytest.raises(DeployError) as err:
        Predictor(tmp_path / "a")
    assert_one_sentence(err.value, "a is a symbolic link loop")
