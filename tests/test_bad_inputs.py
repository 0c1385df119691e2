"""The bad-input catalogue (docs/bad-inputs.md): every case exits 2 with one `error: ...` sentence on stderr, no
traceback (unless -v), and leaves the file system exactly as it was: no output directory (not even an empty one),
no temporary file, no ``deploykit-out/`` in the working directory.

Each case builds its input under the test's tmp_path, which is also the working directory, so the default output
directory would appear there. The checkpoints the cases share are made once per module, elsewhere.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import onnx
from polygraphy.comparator import RunResults

from deploykit import cli
from deploykit.checkpoint import write_checkpoint
from deploykit.errors import DeployError

REPO = Path(__file__).resolve().parents[1]


def tiny_module() -> nn.Module:
    """Standard layers only, so a subprocess can unpickle it (with --trust-pickle); exports in about a second."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, stride=2)).eval()


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints outside any case's tmp_path: od_resnet18 (deploykit format), its bare state_dict, scnet50, a
    trusted-pickle module, a state_dict with NaN weights, and an image."""
    from PIL import Image

    from deploykit.models import build_model

    root = tmp_path_factory.mktemp("shared")
    od = build_model("od_resnet18").state_dict()
    paths = {"od": write_checkpoint(root / "od.pt", "od_resnet18", od),
             "scnet50": write_checkpoint(root / "scnet50.pt", "scnet50", build_model("scnet50").state_dict())}
    torch.save(od, root / "bare.pth")
    paths["bare"] = root / "bare.pth"
    torch.save(tiny_module(), root / "tiny.pt")
    paths["tiny"] = root / "tiny.pt"
    nan = dict(od)
    nan["fc.weight"] = nan["fc.weight"].clone()
    nan["fc.weight"][0, :3] = float("nan")
    paths["nan"] = write_checkpoint(root / "nan.pt", "od_resnet18", nan)
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(root / "grey.png")
    paths["image"] = root / "grey.png"
    return paths


def save_state(path: Path, edit: Callable[[dict], None], shared) -> Path:
    state = dict(torch.load(shared["bare"], weights_only=True))
    edit(state)
    torch.save(state, path)
    return path


def npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def read_only(monkeypatch, directory: Path) -> None:
    """Tests run as root, who may write anywhere: make os.access say no for `directory`."""
    real = os.access
    monkeypatch.setattr(os, "access",
                        lambda p, mode, *a, **k: False if Path(p) == directory else real(p, mode, *a, **k))


def no_space(monkeypatch) -> None:
    """The disk fills up while model.onnx is written: half a file, then ENOSPC."""
    import onnx

    def full(model, path, *args, **kwargs):
        Path(path).write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(onnx, "save_model", full)


def mkdir_denied(monkeypatch) -> None:
    """The output directory's parent becomes unwritable between the early check and the write."""
    def denied(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    monkeypatch.setattr(Path, "mkdir", denied)


@dataclass
class Case:
    id: str
    argv: Callable  # (tmp_path, shared, monkeypatch) -> list of CLI arguments; may create files under tmp_path
    expected: str  # a fragment of the error sentence


TINY = ["--trust-pickle", "--input-shape", "1x3x8x8"]

CASES = [
    # --model: files that are not checkpoints
    Case("missing_file", lambda t, s, m: ["--model", str(t / "nope.pt")], "does not exist"),
    Case("empty_file", lambda t, s, m: ["--model", str(_write(t / "empty.pt", b""))], "is empty (0 bytes)"),
    Case("truncated", lambda t, s, m: ["--model", str(_write(t / "od.pt", s["od"].read_bytes()[:3_000_000]))],
         "is corrupt or truncated"),
    Case("gzip", lambda t, s, m: ["--model", str(_write(t / "od.pt.gz", gzip.compress(s["tiny"].read_bytes())))],
         "is gzip-compressed"),
    Case("zip_not_torch", lambda t, s, m: ["--model", str(_zip(t / "weights.pt", {"readme.txt": b"hi"}))],
         "is a zip archive but not a PyTorch checkpoint"),
    Case("zip_around_checkpoint", lambda t, s, m: ["--model", str(_zip(t / "release.zip",
                                                                       {"od.pth": s["tiny"].read_bytes()}))],
         "extract it and pass the checkpoint to --model"),
    Case("text_file", lambda t, s, m: ["--model", str(_write(t / "notes.txt", b"not a checkpoint\n"))],
         "is not a PyTorch checkpoint"),
    Case("onnx_file", lambda t, s, m: ["--model", str(_write(t / "model.onnx", b"\x08\x07\x12\x07pytorch"))],
         "looks like an ONNX model"),
    Case("directory", lambda t, s, m: ["--model", str(_mkdir(t / "ckpt"))], "is not a file but a directory"),
    Case("safetensors_bad_json", lambda t, s, m: ["--model", str(_write(
        t / "w.safetensors", (20).to_bytes(8, "little") + b"{not json" * 3))],
         "header is corrupt"),
    Case("safetensors_header_too_long", lambda t, s, m: ["--model", str(_write(
        t / "w.safetensors", (10 ** 9).to_bytes(8, "little") + b'{"a": 1}'))], "header is corrupt"),
    Case("safetensors_truncated", lambda t, s, m: ["--model", str(_truncated_safetensors(t / "w.safetensors"))],
         "is not a valid safetensors file"),
    Case("pickled_module_untrusted", lambda t, s, m: ["--model", str(s["tiny"])], "--trust-pickle"),
    Case("no_tensors", lambda t, s, m: ["--model", str(_torch_save(t / "c.pt", {"epoch": 3, "lr": 0.1}))],
         "does not contain a state_dict"),
    # --arch and the state_dict
    Case("bare_state_dict_no_arch", lambda t, s, m: ["--model", str(s["bare"])], "pass --arch"),
    Case("unknown_arch", lambda t, s, m: ["--model", str(s["bare"]), "--arch", "resnet9000"],
         "Unknown architecture 'resnet9000'"),
    Case("arch_contradicts", lambda t, s, m: ["--model", str(s["od"]), "--arch", "scnet50"],
         "contradicts the checkpoint"),
    Case("missing_keys", lambda t, s, m: ["--model", str(save_state(t / "w.pth", lambda d: d.pop("fc.bias"), s)),
                                          "--arch", "od_resnet18"], "1 missing (fc.bias)"),
    Case("unexpected_keys", lambda t, s, m: ["--model", str(save_state(
        t / "w.pth", lambda d: d.update({"fc.extra": torch.zeros(1)}), s)), "--arch", "od_resnet18"],
         "1 unexpected (fc.extra)"),
    Case("misshaped_keys", lambda t, s, m: ["--model", str(save_state(
        t / "w.pth", lambda d: d.update({"fc.bias": torch.zeros(10)}), s)), "--arch", "od_resnet18"],
         "fc.bias (10,) vs (1000,)"),
    Case("nan_weights", lambda t, s, m: ["--model", str(s["nan"])],
         "non-finite weights in 1 tensor(s) (fc.weight: 3 NaN)"),
    Case("inf_weights", lambda t, s, m: ["--model", str(save_state(
        t / "w.pth", lambda d: d.update({"conv1.weight": d["conv1.weight"].clone().fill_(float("inf"))}), s)),
        "--arch", "od_resnet18"], "conv1.weight: 9408 inf"),
    Case("integer_weights", lambda t, s, m: ["--model", str(save_state(
        t / "w.pth", lambda d: d.update({"fc.weight": d["fc.weight"].round().to(torch.int8)}), s)),
        "--arch", "od_resnet18"], "integer tensors where the model has float weights (fc.weight (int8))"),
    # --input-shape
    Case("scnet_too_small", lambda t, s, m: ["--model", str(s["scnet50"]), "--input-shape", "1x3x64x64"],
         "scnet50 cannot take an input of shape 1x3x64x64: SCConv pools by 4 at 1/32 of the input, so inputs must "
         "be at least 128x128"),
    Case("malformed_input_shape", lambda t, s, m: ["--model", str(s["od"]), "--input-shape", "1x3xbig"],
         "is not of the form 1x3x224x224"),
    Case("zero_input_shape", lambda t, s, m: ["--model", str(s["od"]), "--input-shape", "0x3x32x32"],
         "every dimension must be >= 1"),
    # --inputs
    Case("inputs_wrong_shape", lambda t, s, m: ["--model", str(s["tiny"]), *TINY, "--inputs", str(npz(
        t / "x.npz", input=np.zeros((1, 3, 32, 32), np.float32)))], "has shape 1x3x32x32 but the export takes 1x3x8x8"),
    Case("inputs_wrong_dtype", lambda t, s, m: ["--model", str(s["tiny"]), *TINY, "--inputs", str(npz(
        t / "x.npz", input=np.zeros((1, 3, 8, 8), np.int64)))], "has dtype int64"),
    Case("inputs_nan", lambda t, s, m: ["--model", str(s["tiny"]), *TINY, "--inputs", str(npz(
        t / "x.npz", input=np.full((1, 3, 8, 8), np.nan, np.float32)))], "192 NaN or infinite value(s)"),
    Case("inputs_several_arrays", lambda t, s, m: ["--model", str(s["tiny"]), *TINY, "--inputs", str(npz(
        t / "x.npz", a=np.zeros(3), b=np.zeros(3)))], "holds a, b, but the model's input(s) are 'input'"),
    Case("inputs_not_npz", lambda t, s, m: ["--model", str(s["tiny"]), *TINY, "--inputs",
                                            str(_write(t / "x.npz", b"hello"))],
         "is not a readable .npz file"),
    Case("inputs_missing", lambda t, s, m: ["--model", str(s["tiny"]), *TINY, "--inputs", str(t / "x.npz")],
         "--inputs " + "{tmp}/x.npz does not exist"),
    # --images
    Case("images_not_an_image", lambda t, s, m: ["--model", str(s["tiny"]), *TINY, "--images", str(_write(t / "cat.jpg",
                                                                                                  b"not a jpeg"))],
         "is not a readable image"),
    Case("images_missing", lambda t, s, m: ["--model", str(s["tiny"]), *TINY, "--images", str(t / "photos")],
         "does not exist"),
    # --output-dir
    Case("output_under_a_file", lambda t, s, m: ["--model", str(s["tiny"]), *TINY, "-o",
                                                 str(_write(t / "f", b"") / "out")],
         "is not writable: {tmp}/f is a file"),
    Case("output_read_only", lambda t, s, m: [read_only(m, t / "ro"), "--model", str(s["tiny"]), *TINY, "-o",
                                              str(_mkdir(t / "ro"))][1:], "is not writable: permission denied"),
    Case("output_no_space", lambda t, s, m: [no_space(m), "--model", str(s["tiny"]), *TINY, "-o", str(t / "out")][1:],
         "No space left on device (free some space or choose another --output-dir)"),
    Case("output_mkdir_denied", lambda t, s, m: [mkdir_denied(m), "--model", str(s["tiny"]), *TINY, "-o",
                                                 str(t / "new" / "out")][1:], "Cannot create the output directory"),
    Case("triton_repo_under_a_file", lambda t, s, m: ["--model", str(s["tiny"]), *TINY, "--triton-repo",
                                                      str(_write(t / "f", b"") / "repo")], "is not a directory"),
    # options
    Case("unsupported_opset", lambda t, s, m: ["--model", str(s["od"]), "--opset", "17"],
         "--opset 17 is not supported"),
    Case("static_batch_dynamic_spatial", lambda t, s, m: ["--model", str(s["od"]), "--static-batch",
                                                          "--dynamic-spatial"], "drop --static-batch"),
    Case("fp16_without_engine", lambda t, s, m: ["--model", str(s["od"]), "--fp16"], "ask for one with --engine"),
    Case("inputs_and_images", lambda t, s, m: ["--model", str(s["od"]), "--inputs", "x.npz", "--images", "y.png"],
         "pass one of them"),
    Case("triton_name_without_repo", lambda t, s, m: ["--model", str(s["od"]), "--triton-name", "m"],
         "name it with --triton-repo"),
    Case("seed_with_inputs", lambda t, s, m: ["--model", str(s["od"]), "--seed", "3", "--inputs", "x.npz"],
         "drop --seed"),
    Case("mean_without_images", lambda t, s, m: ["--model", str(s["od"]), "--mean", "0.5,0.5,0.5"],
         "pass the images too"),
    Case("zero_threads", lambda t, s, m: ["--model", str(s["od"]), "--threads", "0"], "--threads must be at least 1"),
    Case("missing_model_option", lambda t, s, m: ["--arch", "scnet50"],
         "No model given: pass --model (a checkpoint), or --arch path/to/net.py:factory"),
    Case("unavailable_provider", lambda t, s, m: ["--model", str(s["tiny"]), *TINY, "--providers", "cuda"],
         "does not offer CUDAExecutionProvider"),
    # issue 19: files of the user's that bear the artifacts' names
    Case("output_holds_user_files", lambda t, s, m: ["--model", str(s["tiny"]), *TINY, "-o", str(user_files(
        t / "mydir", "report.json", "model.plan"))], "already holds report.json, model.plan, which the last deploykit "
                                                     "run there did not write"),
    Case("output_dot_user_inputs", lambda t, s, m: [user_files(t, "inputs.json"), "--model", str(s["tiny"]), *TINY,
                                                    "-o", "."][1:], "Output directory . already holds inputs.json"),
    Case("output_symlinked_artifact", lambda t, s, m: ["--model", str(s["tiny"]), *TINY, "-o", str(_symlink(
        _mkdir(t / "out") / "model.onnx", _write(t / "mine.onnx", b"the user's model")).parent)],
         "already holds model.onnx"),
    Case("output_user_lock_file", lambda t, s, m: ["--model", str(s["tiny"]), *TINY, "-o", str(user_files(
        t / "out", ".deploykit.lock"))], "already holds .deploykit.lock"),
    Case("triton_foreign_model_folder", lambda t, s, m: ["--model", str(s["tiny"]), *TINY, "--triton-repo", str(
        user_files(t / "repo" / "Sequential", "config.pbtxt").parent)],  # named after the pickled model's class
         "already holds Sequential, which deploykit did not write"),
    # issue 19: images
    Case("images_float_out_of_range", lambda t, s, m: ["--model", str(s["tiny"]), *TINY, "--images", str(
        _float_image(t / "depth.tiff"))], "holds floating-point pixels from 0 to 1000"),
    Case("images_too_large", lambda t, s, m: [m.setattr("PIL.Image.MAX_IMAGE_PIXELS", 100), "--model", str(s["tiny"]),
                                              *TINY, "--images", str(s["image"])][1:],
         "is too large to read safely (Image size (1600 pixels) exceeds limit of 200 pixels"),
    # issue 19: numbers
    Case("rtol_inf", lambda t, s, m: ["--model", str(s["od"]), "--rtol", "inf"], "--rtol must be a number from"),
    Case("atol_inf", lambda t, s, m: ["--model", str(s["od"]), "--atol", "inf"], "--atol must be a positive finite"),
    Case("rtol_too_large", lambda t, s, m: ["--model", str(s["od"]), "--rtol", "5"], "got 5.0"),
    Case("rtol_zero", lambda t, s, m: ["--model", str(s["od"]), "--rtol", "0"], "(float32's resolution)"),
    Case("atol_zero", lambda t, s, m: ["--model", str(s["od"]), "--atol", "0"], "got 0.0"),
    Case("atol_too_large", lambda t, s, m: ["--model", str(s["tiny"]), *TINY, "--atol", "1e30"],
         "--atol 1e+30 is more than a tenth of the outputs' largest magnitude"),
    Case("atol_below_resolution", lambda t, s, m: ["--model", str(s["tiny"]), *TINY, "--atol", "1e-30"],
         "--atol 1e-30 is below float32's resolution of the outputs' largest magnitude"),
    Case("seed_too_large", lambda t, s, m: ["--model", str(s["od"]), "--seed", "99999999999999999999999"],
         "--seed must be an integer from 0 to 18446744073709551615"),
    Case("seed_negative", lambda t, s, m: ["--model", str(s["od"]), "--seed", "-5"], "got -5"),
    Case("checkpoint_newer_format", lambda t, s, m: ["--model", str(_edited_checkpoint(
        t / "c.pt", format_version=99))], "format version 99, which this deploykit (format version 1) cannot read; "
                                          "upgrade deploykit"),
    Case("checkpoint_bad_input_shape", lambda t, s, m: ["--model", str(_edited_checkpoint(
        t / "c.pt", input_shape=[3, 0, -5]))], "its input_shape [3, 0, -5] is not a list of positive sizes"),
    Case("mean_0_255_scale", lambda t, s, m: ["--model", str(s["tiny"]), *TINY, "--images", str(s["image"]), "--mean",
                                              "123.7,116.3,103.5"], "(on the 0-255 scale: divide by 255)"),
    Case("providers_empty", lambda t, s, m: ["--model", str(s["tiny"]), *TINY, "--providers", ""],
         "names an empty provider"),
    # issue 19: memory
    Case("out_of_memory", lambda t, s, m: [m.setattr("deploykit.verify.run_torch", _allocator_fails),
                                           "--model", str(s["tiny"]), *TINY][1:],
         "on inputs of shape 1x3x8x8 ran out of memory (one allocation of 12.0 GiB failed; "),
    Case("ort_out_of_memory", lambda t, s, m: [m.setattr("deploykit.runtime.ort.session_from_onnx", _arena_fails),
                                               "--model", str(s["tiny"]), *TINY][1:],
         "Running the exported model in onnxruntime on inputs of shape 1x3x8x8 ran out of memory (one allocation of "
         "64.0 GiB failed; "),
    Case("memory_estimate_random_inputs", lambda t, s, m: [
        m.setattr("deploykit.memory.available_bytes", lambda: 1000), "--model", str(s["tiny"]), *TINY][1:],
         "Making random inputs of shape 1x3x8x8 needs at least 1.5 KiB of memory, more than the 1000 bytes available"),
    Case("memory_estimate", lambda t, s, m: [
        m.setattr("deploykit.memory.available_bytes", lambda: 1000), "--model", str(s["tiny"]), *TINY, "--inputs",
        str(npz(t / "x.npz", input=np.random.default_rng(0).standard_normal((1, 3, 8, 8), dtype=np.float32)))][1:],
         "Running the model in PyTorch on inputs of shape 1x3x8x8 needs at least 8.2 KiB of memory, more than the "
         "1000 bytes available"),
    # issue 19: words
    Case("symlink_loop", lambda t, s, m: ["--model", str(_symlink(t / "a.pt", _symlink(t / "b.pt", t / "a.pt")))],
         "a.pt is a symbolic link loop"),
    Case("broken_symlink", lambda t, s, m: ["--model", str(_symlink(t / "a.pt", t / "gone.pt"))],
         "is a symbolic link to {tmp}/gone.pt, which does not exist"),
    Case("checkpoint_arch_field_wrong", lambda t, s, m: ["--model", str(write_checkpoint(
        t / "c.pt", "od_resnet18", tiny_module().state_dict()))], "the checkpoint's own arch field names od_resnet18"),
    Case("inputs_batch_zero", lambda t, s, m: ["--model", str(s["tiny"]), *TINY, "--inputs", str(npz(
        t / "x.npz", input=np.zeros((0, 3, 8, 8), np.float32)))], "has shape 0x3x8x8, which holds no sample"),
    Case("inputs_beyond_float32", lambda t, s, m: ["--model", str(s["tiny"]), *TINY, "--inputs", str(npz(
        t / "x.npz", input=np.full((1, 3, 8, 8), 1e300)))], "192 float64 value(s) beyond float32's range"),
    Case("inputs_scalar", lambda t, s, m: ["--model", str(s["tiny"]), *TINY, "--inputs", str(npz(
        t / "x.npz", input=np.float32(0.5)))], "The input in --inputs {tmp}/x.npz is a scalar, which holds no sample"),
    Case("max_batch_too_large", lambda t, s, m: ["--model", str(s["tiny"]), *TINY, "--triton-repo", str(t / "repo"),
                                                 "--max-batch", "99999999999"],
         "max_batch must be from 1 to 2147483647 (Triton's and TensorRT's 32-bit limit), got 99999999999"),
    Case("input_shape_negative_separate", lambda t, s, m: ["--model", str(s["od"]), "--input-shape", "-1x3x224x224"],
         "Input shape '-1x3x224x224' is invalid: every dimension must be >= 1"),
]


def user_files(directory: Path, *names: str) -> Path:
    """`directory` (created) holding the user's own files of these names, each with its own bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / name).write_bytes(f"the user's own {name}\n".encode())
    return directory


def _symlink(link: Path, target: Path) -> Path:
    link.symlink_to(target)
    return link


def _float_image(path: Path) -> Path:
    from PIL import Image

    Image.fromarray(np.linspace(0, 1000, 400, dtype=np.float32).reshape(20, 20)).save(path)  # mode "F"
    return path


def _edited_checkpoint(path: Path, **fields) -> Path:
    """A deploykit checkpoint of the tiny module, with fields as written by someone else."""
    return write_checkpoint(path, "od_resnet18", tiny_module().state_dict(), **fields)


def _allocator_fails(*args, **kwargs):
    raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you "
                       "tried to allocate 12884901888 bytes. Error code 12 (Cannot allocate memory)")


def _arena_fails(model, providers=None, threads=None):
    """An onnxruntime session whose arena cannot allocate, raising what onnxruntime raises then."""
    import onnxruntime
    from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException

    data = model.SerializeToString() if hasattr(model, "SerializeToString") else model
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])  # the real one, unpatched

    class Session:
        def __getattr__(self, name):
            return getattr(session, name)

        def run(self, *args, **kwargs):
            raise RuntimeException("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while "
                                   "running Conv node. Status Message: bfc_arena.cc:376 Failed to allocate memory for "
                                   "requested buffer of size 68719476736")

    return Session()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _torch_save(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


def _truncated_safetensors(path: Path) -> Path:
    from safetensors.torch import save

    data = save({"conv.weight": torch.randn(16, 3, 3, 3)})
    return _write(path, data[: len(data) - 100])


def tree(root: Path) -> list[str]:
    """Every path under `root`, hidden ones included."""
    found = []
    for directory, dirs, files in os.walk(root):
        found += [os.path.relpath(os.path.join(directory, name), root) for name in dirs + files]
    return sorted(found)


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its bytes (None for a directory or a symbolic link): nothing may change."""
    return {name: None if (root / name).is_dir() or (root / name).is_symlink() else (root / name).read_bytes()
            for name in tree(root)}


def test_the_catalogue_is_large_enough_and_documented():
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)
    doc = (REPO / "docs" / "bad-inputs.md").read_text()
    undocumented = [c.id for c in CASES if f"`{c.id}`" not in doc]
    assert not undocumented, f"cases missing from docs/bad-inputs.md: {undocumented}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tmp_path, shared, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = case.argv(tmp_path, shared, monkeypatch)
    before = snapshot(tmp_path)
    try:
        status = cli.main(argv)
    except SystemExit as exit_:  # argparse's own usage errors
        status = exit_.code
    monkeypatch.undo()  # os.access, Path.mkdir, onnx.save_model back before looking at the tree
    stderr = capsys.readouterr().err
    assert status == 2, stderr
    assert "Traceback" not in stderr
    message = stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and message.endswith("."), message
    assert not re.search(r"\.\s+[A-Z]", message), f"more than one sentence: {message}"
    assert case.expected.replace("{tmp}", str(tmp_path)) in message, message
    assert snapshot(tmp_path) == before, "a bad input left files or directories behind, or changed the user's"
    assert not (tmp_path / "deploykit-out").exists()


def contents(directory: Path) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


def test_user_files_bearing_the_artifacts_names_are_never_touched(tmp_path, shared, capsys, monkeypatch):
    """Only the files the last run wrote (listed with their SHA-256 in its report.json, unchanged since) are ever
    replaced or removed; the user's own files of those names are refused before the slow steps and under the
    write's lock, or replaced with --overwrite."""
    from deploykit import artifacts

    monkeypatch.chdir(tmp_path)
    out = user_files(tmp_path / "out", *artifacts.ARTIFACT_FILES)
    theirs = contents(out)
    argv = ["--model", str(shared["tiny"]), *TINY, "-o", str(out)]
    assert cli.main(argv) == 2
    refused = capsys.readouterr().err
    assert "already holds model.onnx, inputs.json, torch_outputs.json, report.json, model.plan" in refused
    assert contents(out) == theirs
    with pytest.raises(DeployError, match="already holds"):  # the check under the lock, for files that came late
        artifacts.write_artifacts(out, onnx.ModelProto(), [], RunResults(), {})
    assert contents(out) == theirs

    assert cli.main([*argv, "--overwrite"]) == 0  # opted in: replaced, and the user's model.plan removed
    report = json.loads((out / "report.json").read_text())
    assert sorted(os.listdir(out)) == sorted(["model.onnx", "inputs.json", "torch_outputs.json", "report.json"])
    assert report["config"]["overwrite"] is True and set(report["artifacts"]) == {"model.onnx", "inputs.json",
                                                                                 "torch_outputs.json"}
    assert cli.main(argv) == 0  # the last run's own files are replaced without --overwrite
    (out / "model.onnx").write_bytes(b"the user's edit")
    edited = contents(out)
    assert cli.main(argv) == 2
    assert "already holds model.onnx, which the last deploykit run there did not write (or which changed since)" in \
        capsys.readouterr().err
    assert contents(out) == edited


def test_verbose_adds_the_traceback(tmp_path, capsys):
    (tmp_path / "empty.pt").write_bytes(b"")
    assert cli.main(["--model", str(tmp_path / "empty.pt"), "-v"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")


@pytest.mark.parametrize("case", ["gzip", "nan_weights"])
def test_bad_input_through_export_py(case, tmp_path, shared):
    """The real entry point, in a subprocess: exit 2, one line of error, no traceback, nothing written."""
    argv = next(c for c in CASES if c.id == case).argv(tmp_path, shared, None)
    before = tree(tmp_path)
    done = subprocess.run([sys.executable, str(REPO / "export.py"), *argv], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == done.stderr.strip().splitlines()[-1]
    assert tree(tmp_path) == before


def test_catalogue_messages(shared, tmp_path_factory, capsys, monkeypatch):
    """Not a check: `pytest tests/test_bad_inputs.py::test_catalogue_messages -s` prints each case's sentence as
    JSON (paths shortened), which is what docs/bad-inputs.md shows."""
    if not os.environ.get("DEPLOYKIT_PRINT_CATALOGUE"):
        pytest.skip("set DEPLOYKIT_PRINT_CATALOGUE=1 to print the catalogue's messages")
    messages = {}
    for case in CASES:
        tmp = tmp_path_factory.mktemp(case.id)
        with monkeypatch.context() as patch:
            patch.chdir(tmp)
            try:
                cli.main(case.argv(tmp, shared, patch))
            except SystemExit:
                pass
        err = capsys.readouterr().err.strip().splitlines()[-1]
        for name, path in shared.items():
            err = err.replace(str(path), path.name)
        messages[case.id] = err.replace(str(tmp) + "/", "")
    with capsys.disabled():
        print(json.dumps(messages, indent=1))
