"""Checkpoint reading: every accepted wrapper, and one clear sentence for every file that cannot be used."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deploykit.checkpoint import TRUST_PICKLE_FLAG, load_checkpoint, write_checkpoint
from deploykit.errors import DeployError
from deploykit.models import build_model


def tiny_state_dict() -> dict[str, torch.Tensor]:
    return {"conv.weight": torch.randn(4, 3, 3, 3), "conv.bias": torch.randn(4)}


def test_own_format_round_trips_and_loads_weights_only(tmp_path):
    state = tiny_state_dict()
    path = write_checkpoint(tmp_path / "c.pt", "scnet50", state, {"num_classes": 10}, seed=7)
    raw = torch.load(path, weights_only=True)  # must never need pickled code
    assert raw["format"] == "deploykit.checkpoint"
    checkpoint = load_checkpoint(path)
    assert (checkpoint.arch, checkpoint.arch_kwargs, checkpoint.metadata["seed"]) == ("scnet50", {"num_classes": 10}, 7)
    assert all(torch.equal(checkpoint.state_dict[k], v) for k, v in state.items())


@pytest.mark.parametrize("wrapper", ["bare", "state_dict", "model", "ddp_state_dict"])
def test_official_wrappers_are_stripped(tmp_path, wrapper):
    state = tiny_state_dict()
    payload = {
        "bare": state,
        "state_dict": {"state_dict": state, "epoch": 3},
        "model": {"model": state},
        "ddp_state_dict": {"state_dict": {f"module.{k}": v for k, v in state.items()}, "best_acc": 0.5},
    }[wrapper]
    torch.save(payload, tmp_path / "c.pth")
    checkpoint = load_checkpoint(tmp_path / "c.pth")
    assert checkpoint.arch is None and sorted(checkpoint.state_dict) == sorted(state)


def test_pickled_module_is_refused_unless_trusted(tmp_path):
    torch.save(nn.Sequential(nn.Conv2d(3, 4, 3)), tmp_path / "m.pt")
    with pytest.raises(DeployError, match=TRUST_PICKLE_FLAG) as err:
        load_checkpoint(tmp_path / "m.pt")
    assert "run code" in str(err.value)
    assert isinstance(load_checkpoint(tmp_path / "m.pt", trust_pickle=True).module, nn.Sequential)


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("directory", "is not a file"),
    ("text", "is not a PyTorch checkpoint"),
    ("onnx", "looks like an ONNX model"),
    ("truncated", "corrupt or truncated"),
    ("no_tensors", "does not contain a state_dict"),
])
def test_unusable_files_get_one_sentence(tmp_path, case, message):
    path = tmp_path / ("model.onnx" if case == "onnx" else "c.pt")
    if case == "directory":
        path.mkdir()
    elif case in ("text", "onnx"):
        path.write_bytes(b"\x08\x07\x12\x07pytorch" if case == "onnx" else b"hello, not a checkpoint\n")
    elif case == "truncated":
        torch.save(tiny_state_dict(), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif case == "no_tensors":
        torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(DeployError, match=message) as err:
        load_checkpoint(path)
    assert str(err.value).endswith(".") and "\n" not in str(err.value)


def test_state_dict_mismatch_names_a_few_keys_of_each_kind():
    state = build_model("scnet50").state_dict()
    state.pop("fc.bias")
    state["fc.extra"] = torch.zeros(1)
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    with pytest.raises(DeployError) as err:
        build_model("scnet50", state_dict=state)
    message = str(err.value)
    assert "1 missing (fc.bias)" in message and "1 unexpected (fc.extra)" in message
    assert "conv1.weight (64, 3, 3, 3) vs (64, 3, 7, 7)" in message


def test_wrong_architecture_lists_counts_not_every_key():
    state = build_model("scnet50").state_dict()
    with pytest.raises(DeployError, match=r"missing \(layer3\.6\.conv1_a\.weight, .* and \d+ more\)"):
        build_model("scnet101", state_dict=state)


def test_unknown_arch_lists_known_ones():
    with pytest.raises(DeployError, match="known architectures: ") as err:
        build_model("resnet9000")
    assert all(name in str(err.value) for name in ("scnet50_v1d", "od_resnet50_4x", "tf_efficientnet_cc_b0_4e"))
