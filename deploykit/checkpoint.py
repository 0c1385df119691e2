"""Reading and writing checkpoints safely.

Three kinds of file are accepted:

* deploykit's own format, a dict ``{"format": "deploykit.checkpoint", "arch", "arch_kwargs", "state_dict", ...}``
  written by `write_checkpoint` (and by ``python -m models NAME -o FILE``);
* an official release's state_dict, bare or wrapped as ``{"state_dict": ...}`` / ``{"model": ...}``, with DDP's
  ``module.`` prefix stripped; the architecture then comes from ``--arch`` (or the file name);
* an OpenMMLab checkpoint (mmdet, mmpretrain): its ``backbone.*`` keys are the model; a classifier's ``head.fc.*``
  becomes ``fc.*``, and a detector's neck and heads are left out, so the backbone is built without its classifier
  (``num_classes=0``: the export outputs the last stage's feature map);
* a PyTorch Lightning checkpoint whose module holds the network as ``self.model`` next to training-only parts
  (margin heads, losses): the ``model.*`` keys are the model;
* a pickled whole ``nn.Module``, only with ``trust_pickle=True``: unpickling runs code from the file.

Everything else is loaded with ``torch.load(weights_only=True)``, which cannot execute code.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deploykit.errors import DeployError
from deploykit.fileio import atomic_path

FORMAT = "deploykit.checkpoint"
FORMAT_VERSION = 1
TRUST_PICKLE_FLAG = "--trust-pickle"

# Wrappers official training scripts put around the state_dict, and the key prefixes of distributed training.
_WRAPPER_KEYS = ("state_dict", "model")
_PREFIXES = ("module.",)
_BACKBONE, _CLASSIFIER = "backbone.", "head.fc."
_LIGHTNING_MODEL = "model."
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL_2_PLUS = b"\x80"


@dataclass
class Checkpoint:
    """What a checkpoint file holds, unwrapped.

    Exactly one of `state_dict` and `module` is set; `arch` is None for a bare state_dict that names none.
    """

    path: Path
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    state_dict: dict[str, torch.Tensor] | None = None
    module: nn.Module | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def load_checkpoint(path: str | os.PathLike, trust_pickle: bool = False) -> Checkpoint:
    """Read `path` into a `Checkpoint`, explaining in one sentence why a file cannot be used.

    Args:
        path: the checkpoint file.
        trust_pickle: allow unpickling arbitrary Python objects (e.g. a whole nn.Module). This executes code
            from the file; only use it for files from a trusted source. Defaults to False.
    """
    path = Path(path)
    if not path.exists():
        raise DeployError(f"Checkpoint {path} does not exist.")
    if not path.is_file():
        raise DeployError(f"Checkpoint {path} is not a file.")
    with path.open("rb") as handle:
        head = handle.read(4)
    if not head.startswith((_ZIP_MAGIC, _PICKLE_PROTOCOL_2_PLUS)):
        hint = " (it looks like an ONNX model; pass the PyTorch checkpoint instead)" if path.suffix == ".onnx" else ""
        raise DeployError(f"{path} is not a PyTorch checkpoint{hint}.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as err:
        if not trust_pickle and "Weights only load failed" in str(err) and "global" in str(err).lower():
            raise DeployError(
                f"{path} holds pickled Python objects (such as a whole nn.Module), and loading them would run code "
                f"from the file; re-run with {TRUST_PICKLE_FLAG} only if you trust its source.") from None
        raise DeployError(f"{path} is corrupt or truncated: it cannot be unpickled ({_first_line(err)}).") from None
    except (RuntimeError, EOFError, ValueError, OSError, AttributeError, ModuleNotFoundError) as err:
        raise DeployError(f"{path} is corrupt or truncated: torch.load failed ({_first_line(err)}).") from None
    return _checkpoint_from_object(path, obj)


def _checkpoint_from_object(path: Path, obj: Any) -> Checkpoint:
    if isinstance(obj, nn.Module):
        return Checkpoint(path, module=obj)
    if not isinstance(obj, Mapping):
        raise DeployError(f"{path} holds a {type(obj).__name__}, not a state_dict or a model.")
    if obj.get("format") == FORMAT:
        metadata = {k: v for k, v in obj.items() if k not in ("state_dict", "arch", "arch_kwargs")}
        return Checkpoint(path, arch=obj["arch"], arch_kwargs=dict(obj.get("arch_kwargs") or {}),
                          state_dict=dict(obj["state_dict"]), metadata=metadata)
    for key in _WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, nn.Module):
            return Checkpoint(path, module=inner)
        if isinstance(inner, Mapping):
            obj = inner
            break
    if not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = ", ".join(list(map(str, obj))[:5]) or "none"
        raise DeployError(f"{path} does not contain a state_dict of tensors (its top-level keys: {keys}).")
    return _without_training_parts(_with_openmmlab_layout(Checkpoint(path, state_dict=strip_prefixes(dict(obj)))))


def strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (DDP's ``module.``) that every key carries."""
    for prefix in _PREFIXES:
        while state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def _with_openmmlab_layout(checkpoint: Checkpoint) -> Checkpoint:
    """Unwrap an OpenMMLab model (``backbone.*`` + ``head.fc.*`` or a detector's neck/heads); others as they are."""
    state_dict = checkpoint.state_dict
    backbone = {k[len(_BACKBONE):]: v for k, v in state_dict.items() if k.startswith(_BACKBONE)}
    if not backbone:
        return checkpoint
    rest = [k for k in state_dict if not k.startswith(_BACKBONE)]
    if rest and all(k.startswith(_CLASSIFIER) for k in rest):
        checkpoint.state_dict = {**backbone, **{"fc." + k[len(_CLASSIFIER):]: state_dict[k] for k in rest}}
    else:
        checkpoint.state_dict = backbone
        checkpoint.arch_kwargs["num_classes"] = 0
        checkpoint.metadata["note"] = (f"backbone of an OpenMMLab checkpoint ({len(rest)} neck/head keys left out): "
                                       f"exported without a classifier, the output is the last stage's feature map")
    return checkpoint


def _without_training_parts(checkpoint: Checkpoint) -> Checkpoint:
    """Keep a Lightning module's ``model.*`` keys when the rest are training-only parts (e.g. a margin head)."""
    state_dict = checkpoint.state_dict
    model = {k[len(_LIGHTNING_MODEL):]: v for k, v in state_dict.items() if k.startswith(_LIGHTNING_MODEL)}
    rest = sorted({k.split(".", 1)[0] for k in state_dict if not k.startswith(_LIGHTNING_MODEL)})
    if model and rest and len(model) > len(state_dict) - len(model):
        checkpoint.state_dict = model
        checkpoint.metadata["note"] = f"the network of a training module (`model.*`; left out: {', '.join(rest)})"
    return checkpoint


def write_checkpoint(path: str | os.PathLike, arch: str, state_dict: Mapping[str, torch.Tensor],
                     arch_kwargs: Mapping[str, Any] | None = None, **metadata: Any) -> Path:
    """Write deploykit's checkpoint format atomically; the result loads with ``weights_only=True``."""
    from deploykit import __version__

    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "arch": arch,
               "arch_kwargs": dict(arch_kwargs or {}), "state_dict": dict(state_dict),
               "created_by": f"deploykit {__version__}", "torch_version": str(torch.__version__), **metadata}
    path = Path(path)
    with atomic_path(path) as temporary:
        torch.save(payload, temporary)
    return path


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0].rstrip(".") if text else type(err).__name__
