"""export.py end to end in a subprocess, the polygraphy replay, and every bad input: exit 2, one sentence, no files."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from polygraphy.comparator import RunResults
from torch import nn

from deploykit import cli

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = {"model.onnx", "inputs.json", "torch_outputs.json", "report.json"}


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def scnet50_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "scnet50.pt"
    done = run("-m", "models", "scnet50", "-o", str(path))  # the documented command, from the checkout
    assert done.returncode == 0, done.stderr
    return path


@pytest.fixture(scope="module")
def exported(scnet50_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "scnet50"
    done = run(str(REPO / "export.py"), "--model", str(scnet50_checkpoint), "--input-shape", "1x3x128x128",
               "--output-dir", str(out))
    return done, out


def test_export_succeeds_and_writes_exactly_the_artifacts(exported):
    done, out = exported
    assert done.returncode == 0, done.stderr
    assert {p.name for p in out.iterdir()} == ARTIFACTS
    report = json.loads((out / "report.json").read_text())
    assert report["verification"]["passed"] is True
    assert report["model"]["arch"] == "scnet50" and report["export"]["opset"] == 20
    assert {"torch", "onnx", "onnxruntime", "polygraphy"} <= set(report["versions"])
    assert report["timings_s"]["export"] > 0
    # Progress: each stage and its duration, and the final verdict, on stderr.
    assert "Exporting ONNX (opset 20, dynamic batch) ..." in done.stderr and "done in" in done.stderr
    assert "PASSED" in done.stderr


def test_polygraphy_replays_the_check(exported):
    _, out = exported
    command = json.loads((out / "report.json").read_text())["reproduce"]
    assert command.startswith("polygraphy run model.onnx --onnxrt --load-inputs inputs.json --load-outputs ")
    replay = subprocess.run(shlex.split(command), cwd=out, capture_output=True, text=True, timeout=600)
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert "PASSED" in replay.stdout + replay.stderr


def test_help_is_complete():
    done = run(str(REPO / "export.py"), "--help")
    assert done.returncode == 0
    for option in ("--model", "--arch", "--input-shape", "--static-batch", "--opset", "--inputs", "--output-dir",
                   "--trust-pickle", "-v"):
        assert option in done.stdout


def test_bad_input_in_a_subprocess_exits_2_without_traceback(tmp_path):
    done = run(str(REPO / "export.py"), "--model", str(tmp_path / "nope.pt"), "-o", str(tmp_path / "out"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == f"error: Checkpoint {tmp_path / 'nope.pt'} does not exist."
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


class TinyNet(nn.Module):
    """Not a zoo model: exported from a trusted pickle, so its input shape must be given."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2))

    def forward(self, x):
        return self.body(x)


class DriftsWhenExported(TinyNet):
    """Computes something else under torch.export: a stand-in for a wrong export rule."""

    def forward(self, x):
        y = super().forward(x)
        return y + 0.1 if torch.compiler.is_exporting() else y


def errors(tmp_path: Path, capsys, *argv: str) -> str:
    """Run the CLI in-process; assert exit 2, one `error:` sentence, no traceback, no artifacts; return it."""
    out = tmp_path / "out"
    assert cli.main([*argv, "--output-dir", str(out)]) == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    message = stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and message.endswith(".")
    assert not out.exists() or not ({p.name for p in out.iterdir()} & ARTIFACTS)
    return message


def test_missing_and_unreadable_files(tmp_path, capsys):
    assert "does not exist" in errors(tmp_path, capsys, "--model", str(tmp_path / "missing.pt"))
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert "not a PyTorch checkpoint" in errors(tmp_path, capsys, "--model", str(tmp_path / "notes.txt"))


def test_truncated_checkpoint(tmp_path, capsys, scnet50_checkpoint):
    truncated = tmp_path / "scnet50.pt"
    truncated.write_bytes(scnet50_checkpoint.read_bytes()[:1_000_000])
    assert "corrupt or truncated" in errors(tmp_path, capsys, "--model", str(truncated))


def test_unknown_arch_lists_the_known_ones(tmp_path, capsys, scnet50_checkpoint):
    message = errors(tmp_path, capsys, "--model", str(scnet50_checkpoint), "--arch", "resnet9000")
    assert "Unknown architecture 'resnet9000'" in message and "scnet50_v1d" in message


def test_bare_state_dict_needs_an_arch_and_must_fit_it(tmp_path, capsys, scnet50_checkpoint):
    state = torch.load(scnet50_checkpoint, weights_only=True)["state_dict"]
    bare = tmp_path / "weights.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, bare)
    assert "pass --arch" in errors(tmp_path, capsys, "--model", str(bare))
    message = errors(tmp_path, capsys, "--model", str(bare), "--arch", "scnet101")
    assert "does not fit scnet101" in message and "missing (layer3.6.conv1_a.weight" in message


def test_arch_contradicting_the_checkpoint(tmp_path, capsys, scnet50_checkpoint):
    message = errors(tmp_path, capsys, "--model", str(scnet50_checkpoint), "--arch", "scnet101")
    assert "contradicts the checkpoint" in message


@pytest.mark.parametrize("shape, reason", [("1x3x64x64", "SCConv pools by 4 at 1/32 of the input"),
                                           ("1x4x128x128", "expected input"),
                                           ("1x3x128", "cannot take an input of shape 1x3x128")])
def test_input_shape_the_model_cannot_take(tmp_path, capsys, scnet50_checkpoint, shape, reason):
    message = errors(tmp_path, capsys, "--model", str(scnet50_checkpoint), "--input-shape", shape)
    assert f"scnet50 cannot take an input of shape {shape}" in message and reason in message


def test_malformed_input_shape_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--model", "x.pt", "--input-shape", "1x3xbig"])
    assert exit_info.value.code == 2 and "1x3x224x224" in capsys.readouterr().err


def test_unwritable_output_dir(tmp_path, capsys, scnet50_checkpoint):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli.main(["--model", str(scnet50_checkpoint), "--output-dir", str(blocker / "out")]) == 2
    assert "is not writable" in capsys.readouterr().err


def test_pickled_module_needs_the_trust_flag(tmp_path, capsys):
    torch.save(TinyNet(), tmp_path / "tiny.pt")
    assert "--trust-pickle" in errors(tmp_path, capsys, "--model", str(tmp_path / "tiny.pt"))
    assert "pass --input-shape" in errors(tmp_path, capsys, "--model", str(tmp_path / "tiny.pt"), "--trust-pickle")
    out = tmp_path / "trusted"
    assert cli.main(["--model", str(tmp_path / "tiny.pt"), "--trust-pickle", "--input-shape", "2x3x9x14",
                     "--output-dir", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == ARTIFACTS


def test_verification_failure_exits_1_and_keeps_the_evidence(tmp_path, capsys):
    torch.save(DriftsWhenExported(), tmp_path / "drift.pt")
    out = tmp_path / "out"
    assert cli.main(["--model", str(tmp_path / "drift.pt"), "--trust-pickle", "--input-shape", "1x3x8x8",
                     "--output-dir", str(out)]) == 1
    report = json.loads((out / "report.json").read_text())
    assert report["verification"]["passed"] is False
    assert all(check["max_abs"] == pytest.approx(0.1, rel=1e-3) for check in report["verification"]["outputs"])
    assert "FAILED" in capsys.readouterr().err


@pytest.mark.parametrize("failure, status", [(OSError(28, "No space left on device"), 2), (KeyboardInterrupt(), 130)])
def test_failed_or_interrupted_write_leaves_nothing(tmp_path, capsys, monkeypatch, failure, status):
    torch.save(TinyNet(), tmp_path / "tiny.pt")

    def fail(self, path):
        Path(path).write_text("half")
        raise failure

    monkeypatch.setattr(RunResults, "save", fail)
    out = tmp_path / "out"
    assert cli.main(["--model", str(tmp_path / "tiny.pt"), "--trust-pickle", "--input-shape", "1x3x8x8",
                     "--output-dir", str(out)]) == status
    assert not out.exists()  # created only for the write, and removed again when it fails


def test_static_batch_npz_inputs_and_opset_19(tmp_path):
    torch.save(TinyNet(), tmp_path / "tiny.pt")
    x = torch.randn(3, 3, 10, 12).numpy()
    import numpy as np

    np.savez(tmp_path / "x.npz", input=x)
    out = tmp_path / "out"
    assert cli.main(["--model", str(tmp_path / "tiny.pt"), "--trust-pickle", "--input-shape", "3x3x10x12",
                     "--static-batch", "--inputs", str(tmp_path / "x.npz"), "--opset", "19",
                     "--output-dir", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["export"]["opset"] == 19 and report["export"]["dynamic_batch"] is False
    assert [c["shape"] for c in report["verification"]["outputs"]] == [[3, 4, 4, 5]]  # the .npz batch, once
    import onnx

    model = onnx.load(out / "model.onnx")
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 3
    assert next(o.version for o in model.opset_import if o.domain == "") == 19


def test_unavailable_provider_fails_before_exporting(tmp_path, capsys, scnet50_checkpoint):
    message = errors(tmp_path, capsys, "--model", str(scnet50_checkpoint), "--providers", "cuda")
    assert "does not offer CUDAExecutionProvider" in message


def test_verbose_shows_the_traceback(tmp_path, capsys):
    assert cli.main(["--model", str(tmp_path / "missing.pt"), "-v"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_official_odconv_checkpoint_through_export_py(tmp_path):
    """ODConv's main.py format ({"state_dict": {"module.*": ...}}), --arch, a dynamic-conv model, in a subprocess."""
    from deploykit.models import random_model

    state = random_model("od_resnet18", input_shape=(3, 64, 64)).state_dict()
    torch.save({"epoch": 100, "state_dict": {f"module.{k}": v for k, v in state.items()}, "best_acc": 73.0},
               tmp_path / "od_resnet18.pth.tar")
    out = tmp_path / "out"
    done = run(str(REPO / "export.py"), "--model", str(tmp_path / "od_resnet18.pth.tar"), "--arch", "od_resnet18",
               "--input-shape", "2x3x64x64", "--output-dir", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["export"]["custom_nodes"] == ["deploykit::DynamicConv2d"] and report["verification"]["passed"]


def test_static_batch_lowering_choice(tmp_path):
    """--static-batch folds dynamic convs into standard ops by default; --lowering custom keeps the node."""
    from deploykit.models import random_model

    torch.save(random_model("dy_resnet18", input_shape=(3, 32, 32)), tmp_path / "dy.pt")
    common = ["--model", str(tmp_path / "dy.pt"), "--trust-pickle", "--input-shape", "2x3x32x32", "--static-batch"]
    assert cli.main([*common, "--output-dir", str(tmp_path / "auto")]) == 0
    assert cli.main([*common, "--lowering", "custom", "--output-dir", str(tmp_path / "custom")]) == 0
    auto = json.loads((tmp_path / "auto" / "report.json").read_text())
    custom = json.loads((tmp_path / "custom" / "report.json").read_text())
    assert auto["export"]["custom_nodes"] == [] and custom["export"]["custom_nodes"] == ["deploykit::DynamicConv2d"]
