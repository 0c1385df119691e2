"""More checkpoint formats: safetensors (chosen by content, official layouts unwrapped) and float16/bfloat16
state_dicts (cast to float32), each exporting with a passed verdict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from deploykit import cli
from deploykit.checkpoint import load_checkpoint


def tiny_state_dict() -> dict[str, torch.Tensor]:
    return {"conv.weight": torch.randn(4, 3, 3, 3), "conv.bias": torch.randn(4)}


@pytest.mark.parametrize("layout, keys", [
    ("bare", {"conv.weight", "conv.bias"}),
    ("ddp", {"conv.weight", "conv.bias"}),  # module.conv.weight
    ("openmmlab", {"conv.weight", "fc.weight"}),  # backbone.conv.weight + head.fc.weight
    ("lightning", {"conv.weight", "conv.bias"}),  # model.* next to a training-only head
])
def test_safetensors_layouts_are_unwrapped(tmp_path, layout, keys):
    state = tiny_state_dict()
    flat = {
        "bare": state,
        "ddp": {f"module.{k}": v for k, v in state.items()},
        "openmmlab": {"backbone.conv.weight": state["conv.weight"], "head.fc.weight": torch.randn(5, 4)},
        "lightning": {**{f"model.{k}": v for k, v in state.items()}, "margin.weight": torch.randn(2)},
    }[layout]
    save_file(flat, tmp_path / "w.safetensors", metadata={"format": "pt"})
    checkpoint = load_checkpoint(tmp_path / "w.safetensors")
    assert set(checkpoint.state_dict) == keys and checkpoint.metadata["source"] == "safetensors"


def test_safetensors_is_chosen_by_content_not_suffix(tmp_path):
    state = tiny_state_dict()
    save_file(state, tmp_path / "pytorch_model.bin")  # a misleading suffix
    checkpoint = load_checkpoint(tmp_path / "pytorch_model.bin")
    assert all(torch.equal(checkpoint.state_dict[k], v) for k, v in state.items())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_are_cast_to_float32(tmp_path, dtype):
    state = {k: v.to(dtype) for k, v in tiny_state_dict().items()}
    state["bn.num_batches_tracked"] = torch.tensor(3)  # integers stay integers
    torch.save(state, tmp_path / "w.pth")
    checkpoint = load_checkpoint(tmp_path / "w.pth")
    name = str(dtype).removeprefix("torch.")
    assert checkpoint.metadata["cast"] == f"cast 2 {name} tensors to float32"
    assert checkpoint.state_dict["conv.weight"].dtype == torch.float32
    assert checkpoint.state_dict["bn.num_batches_tracked"].dtype == torch.int64


@pytest.fixture(scope="module")
def od_state() -> dict[str, torch.Tensor]:
    from deploykit.models import build_model

    return build_model("od_resnet18").state_dict()


def export(tmp_path: Path, path: Path, capsys) -> tuple[dict, str]:
    out = tmp_path / "out"
    status = cli.main(["--model", str(path), "--arch", "od_resnet18", "--input-shape", "1x3x32x32",
                       "--static-batch", "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert status == 0, err
    return json.loads((out / "report.json").read_text()), err


def test_official_layout_safetensors_exports_and_passes(tmp_path, capsys, od_state):
    """ODConv's release layout (DDP ``module.`` prefixes) as a safetensors file, with its ``__metadata__``."""
    save_file({f"module.{k}": v.contiguous() for k, v in od_state.items()}, tmp_path / "od_resnet18.safetensors",
              metadata={"format": "pt", "epoch": "100"})
    report, _ = export(tmp_path, tmp_path / "od_resnet18.safetensors", capsys)
    assert report["verdict"] == "passed" and report["model"]["arch"] == "od_resnet18"


@pytest.mark.parametrize("dtype, container", [(torch.float16, "pth"), (torch.bfloat16, "safetensors")])
def test_half_precision_state_dict_exports_and_passes(tmp_path, capsys, od_state, dtype, container):
    half = {k: v.to(dtype) if v.is_floating_point() else v for k, v in od_state.items()}
    path = tmp_path / f"od_resnet18.{container}"
    if container == "safetensors":
        save_file({k: v.contiguous() for k, v in half.items()}, path)
    else:
        torch.save({"state_dict": half}, path)
    report, err = export(tmp_path, path, capsys)
    floats = sum(v.is_floating_point() for v in od_state.values())
    assert f"  cast {floats} {str(dtype).removeprefix('torch.')} tensors to float32" in err.splitlines()
    assert report["verdict"] == "passed"
