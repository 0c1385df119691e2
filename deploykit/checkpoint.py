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
* a pickled whole ``nn.Module``, only with ``trust_pickle=True``: unpickling runs code from the file;
* a ``.safetensors`` file (recognised by its content: an 8-byte little-endian header length, then the header's
  JSON), a flat state_dict unwrapped like the others (``module.``, OpenMMLab, Lightning); it never runs code.

Everything else is loaded with ``torch.load(weights_only=True)``, which cannot execute code. float16 and bfloat16
weights are cast to float32 (``metadata["cast"]`` says how many). Empty, gzip-compressed, truncated files and zips
that are not checkpoints are refused with one sentence.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deploykit.errors import DeployError, first_line
from deploykit.fileio import atomic_path, missing_reason

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
_GZIP_MAGIC = b"\x1f\x8b"
_SNIFF_BYTES = 16
_HALF_DTYPES = (torch.float16, torch.bfloat16)  # loaded as float32: the export and its check run in float32


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
    # The state_dict as saved (wrappers and ``module.`` stripped), before the OpenMMLab and Lightning layouts are
    # read into a zoo model's keys: what a user's own model (``--arch file.py:factory``) loads.
    as_saved: dict[str, torch.Tensor] | None = None


def load_checkpoint(path: str | os.PathLike, trust_pickle: bool = False) -> Checkpoint:
    """Read `path` into a `Checkpoint`, explaining in one sentence why a file cannot be used.

    Args:
        path: the checkpoint file.
        trust_pickle: allow unpickling arbitrary Python objects (e.g. a whole nn.Module). This executes code
            from the file; only use it for files from a trusted source. Defaults to False.
    """
    path = Path(path)
    if not path.exists():
        raise DeployError(f"Checkpoint {path} {missing_reason(path)}.")
    if not path.is_file():
        kind = "a directory" if path.is_dir() else "a special file"
        raise DeployError(f"Checkpoint {path} is not a file but {kind}; pass the checkpoint file itself to --model.")
    try:
        with path.open("rb") as handle:
            head = handle.read(_SNIFF_BYTES)
        size = path.stat().st_size
    except OSError as err:
        raise DeployError(f"Checkpoint {path} cannot be read: {err.strerror or err}; check its permissions.") from None
    if not head:
        raise DeployError(f"Checkpoint {path} is empty (0 bytes); the download or save was interrupted, so fetch "
                          f"or save it again.")
    if path.suffix == ".safetensors" or _looks_like_safetensors(head):
        tensors, metadata = _load_safetensors(path, size)
        if metadata.get("format") == FORMAT:  # written by write_checkpoint: the arch and the rest are in its metadata
            return _checkpoint_from_object(path, _deploykit_fields(path, metadata, tensors))
        return _checkpoint_from_object(path, tensors, source="safetensors")
    if head.startswith(_GZIP_MAGIC):
        raise DeployError(f"{path} is gzip-compressed, not a PyTorch checkpoint; decompress it first (gunzip -k) "
                          f"and pass the result to --model.")
    if head.startswith(_ZIP_MAGIC):
        _check_torch_zip(path)
    elif not head.startswith(_PICKLE_PROTOCOL_2_PLUS):
        hint = " (it looks like an ONNX model; pass the PyTorch checkpoint instead)" if path.suffix == ".onnx" else \
            " (pass a .pt/.pth file written by torch.save, or a .safetensors file)"
        raise DeployError(f"{path} is not a PyTorch checkpoint{hint}.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as err:
        if not trust_pickle and "Weights only load failed" in str(err) and "global" in str(err).lower():
            raise DeployError(
                f"{path} holds pickled Python objects (such as a whole nn.Module), and loading them would run code "
                f"from the file; re-run with {TRUST_PICKLE_FLAG} only if you trust its source.") from None
        raise DeployError(f"{path} is corrupt or truncated: it cannot be unpickled ({first_line(err)}); fetch or "
                          f"save it again.") from None
    except (ModuleNotFoundError, AttributeError) as err:
        if trust_pickle and _missing_class(err):
            raise DeployError(f"{path} holds a pickled model whose class cannot be imported here ({_missing_class(err)});"
                              f" its module must be importable: run from the folder that holds it or add that folder "
                              f"to PYTHONPATH (or save a state_dict and build the model with --arch file.py:factory)."
                              ) from None
        raise DeployError(f"{path} is corrupt or truncated: torch.load failed ({first_line(err)}); fetch or save "
                          f"it again.") from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise DeployError(f"{path} is corrupt or truncated: torch.load failed ({first_line(err)}); fetch or save "
                          f"it again.") from None
    return _checkpoint_from_object(path, obj)


def _checkpoint_from_object(path: Path, obj: Any, source: str = "torch") -> Checkpoint:
    if isinstance(obj, nn.Module):
        return Checkpoint(path, module=obj)
    if not isinstance(obj, Mapping):
        raise DeployError(f"{path} holds a {type(obj).__name__}, not a state_dict or a model.")
    if obj.get("format") == FORMAT:
        _check_deploykit_fields(path, obj)
        metadata = {k: v for k, v in obj.items() if k not in ("state_dict", "arch", "arch_kwargs")}
        return _as_float32(Checkpoint(path, arch=obj["arch"], arch_kwargs=dict(obj.get("arch_kwargs") or {}),
                                      state_dict=dict(obj["state_dict"]), metadata=metadata))
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
    checkpoint = _as_float32(Checkpoint(path, state_dict=strip_prefixes(dict(obj))))
    checkpoint.as_saved = dict(checkpoint.state_dict)
    if source != "torch":
        checkpoint.metadata["source"] = source
    return _without_training_parts(_with_openmmlab_layout(checkpoint))


def _check_deploykit_fields(path: Path, obj: Mapping) -> None:
    """A deploykit checkpoint's fields must be what `write_checkpoint` writes: a newer format, or a damaged or
    hand-edited field, is refused rather than half understood."""
    version = obj.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise DeployError(f"{path} is a deploykit checkpoint of format version {version!r}, which this deploykit "
                          f"(format version {FORMAT_VERSION}) cannot read; "
                          f"{'upgrade deploykit' if newer else 'save it again with write_checkpoint'}.")
    shape = obj.get("input_shape")
    problems = [
        (not isinstance(obj.get("arch"), str) or not obj["arch"], f"its arch is {obj.get('arch')!r}, not a name"),
        (not isinstance(obj.get("arch_kwargs") or {}, Mapping), "its arch_kwargs is not a dict"),
        (not isinstance(obj.get("state_dict"), Mapping), "it has no state_dict"),
        (shape is not None and not (isinstance(shape, (list, tuple)) and shape
                                    and all(isinstance(d, int) and d >= 1 for d in shape)),
         f"its input_shape {shape!r} is not a list of positive sizes"),
    ]
    for broken, what in problems:
        if broken:
            raise DeployError(f"{path} is a damaged deploykit checkpoint: {what}; save it again with "
                              f"write_checkpoint (python -m models NAME -o FILE for a zoo model).")


def weights_hint(checkpoint: Checkpoint, requested_arch: str | None) -> str:
    """What to check when the weights do not fit the architecture, by where the architecture came from."""
    if requested_arch is not None:
        return "check --arch, or that the checkpoint is for this architecture"
    if checkpoint.arch is not None:
        return (f"the checkpoint's own arch field names {checkpoint.arch}, so it was saved with the wrong arch or "
                f"is damaged; save it again")
    return "the architecture was taken from the file name; pass the right one with --arch"


def _looks_like_safetensors(head: bytes) -> bool:
    """A safetensors file starts with its header's length (8 bytes, little-endian) and the header's JSON."""
    return len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") >= 2


def _load_safetensors(path: Path, size: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A flat state_dict and the string metadata of a safetensors file (which holds nothing else: loading it never
    runs code)."""
    try:
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file
    except ImportError:
        raise DeployError(f"{path} is a safetensors file, which needs the safetensors package; install it "
                          f"(pip install 'safetensors>=0.4').") from None
    with path.open("rb") as handle:
        head = handle.read(9)
    length = int.from_bytes(head[:8], "little") if len(head) >= 8 else None
    if length is None or head[8:9] != b"{" or length > size - 8:
        what = "shorter than its header" if length is not None and length > size - 8 and head[8:9] == b"{" \
            else "not a safetensors header"
        raise DeployError(f"{path} is not a valid safetensors file: its header is corrupt ({what}); fetch or save "
                          f"it again.")
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
        return load_file(path, device="cpu"), metadata
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as err:
        reason = first_line(err)
        if "incomplete" in reason or "not fully covered" in reason:
            raise DeployError(f"{path} is not a valid safetensors file: it is truncated ({reason}); fetch or save it "
                              f"again.") from None
        part = "header" if "header" in reason.lower() or "json" in reason.lower() else "content"
        raise DeployError(f"{path} is not a valid safetensors file: its {part} is corrupt ({reason}); fetch or save "
                          f"it again.") from None


def _deploykit_fields(path: Path, metadata: Mapping[str, str], tensors: dict[str, torch.Tensor]) -> dict:
    """The deploykit checkpoint dict of a safetensors file `write_checkpoint` wrote (its fields JSON-encoded)."""
    try:
        fields = {key: json.loads(value) for key, value in metadata.items() if key != "format"}
    except ValueError as err:
        raise DeployError(f"{path} is a damaged deploykit checkpoint: its metadata is not JSON ({first_line(err)}); "
                          f"save it again.") from None
    return {**fields, "format": FORMAT, "state_dict": tensors}


def _check_torch_zip(path: Path) -> None:
    """A zip that torch.load would choke on: say what it is instead (an archive around a checkpoint, or nothing
    of torch's)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        raise DeployError(f"{path} is corrupt or truncated: it starts like a zip archive (PyTorch's format) but its "
                          f"directory cannot be read; fetch or save it again.") from None
    if any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
        return
    inner = [name for name in names if name.endswith((".pt", ".pth", ".bin", ".ckpt", ".tar", ".safetensors"))]
    if inner:
        raise DeployError(f"{path} is a zip archive holding {', '.join(inner[:3])}, not a PyTorch checkpoint; "
                          f"extract it and pass the checkpoint to --model.")
    raise DeployError(f"{path} is a zip archive but not a PyTorch checkpoint (it has no data.pkl); pass a file "
                      f"written by torch.save.")


def _as_float32(checkpoint: Checkpoint) -> Checkpoint:
    """Cast float16 and bfloat16 weights to float32 (the export and its check run in float32), noting how many."""
    counts: dict[str, int] = {}
    state_dict = checkpoint.state_dict
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor) and value.dtype in _HALF_DTYPES:
            dtype = str(value.dtype).removeprefix("torch.")
            counts[dtype] = counts.get(dtype, 0) + 1
            state_dict[key] = value.float()
    if counts:
        parts = [f"{n} {dtype}" for dtype, n in counts.items()]
        checkpoint.metadata["cast"] = f"cast {' and '.join(parts)} tensors to float32"
    return checkpoint


def check_weights(model: nn.Module, checkpoint: Checkpoint | None = None, shown: int = 3) -> None:
    """Refuse weights that cannot give a meaningful export: NaN or infinite values, and integer tensors in the
    checkpoint where the model has float weights (`load_state_dict` would silently cast them)."""
    source = "The model" if checkpoint is None or checkpoint.path == Path("<module>") else \
        f"The checkpoint {checkpoint.path}"
    expected = model.state_dict()
    if checkpoint is not None and checkpoint.state_dict is not None:
        integer = [f"{k} ({str(v.dtype).removeprefix('torch.')})" for k, v in checkpoint.state_dict.items()
                   if isinstance(v, torch.Tensor) and not (v.is_floating_point() or v.is_complex())
                   and k in expected and expected[k].is_floating_point()]
        if integer:
            more = f" and {len(integer) - shown} more" if len(integer) > shown else ""
            raise DeployError(f"{source} has integer tensors where the model has float weights "
                              f"({', '.join(integer[:shown])}{more}); pass a float checkpoint (a quantised one cannot "
                              f"be exported as is).")
    bad = []
    for key, value in expected.items():
        if value.is_floating_point():
            nan, inf = int(torch.isnan(value).sum()), int(torch.isinf(value).sum())
            if nan or inf:
                counts = ", ".join(f"{n} {what}" for n, what in ((nan, "NaN"), (inf, "inf")) if n)
                bad.append(f"{key}: {counts}")
    if bad:
        more = f" and {len(bad) - shown} more" if len(bad) > shown else ""
        raise DeployError(f"{source} has non-finite weights in {len(bad)} tensor(s) ({'; '.join(bad[:shown])}{more}); "
                          f"the training run diverged or the file is damaged, so export an earlier, finite "
                          f"checkpoint.")


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
    """Write deploykit's checkpoint format atomically; the result loads with ``weights_only=True``. A
    ``.safetensors`` path gets a real safetensors file, the fields (arch, arch_kwargs, ...) JSON-encoded in its
    metadata, so that `load_checkpoint` finds the architecture in it."""
    from deploykit import __version__

    fields = {"format_version": FORMAT_VERSION, "arch": arch, "arch_kwargs": dict(arch_kwargs or {}),
              "created_by": f"deploykit {__version__}", "torch_version": str(torch.__version__), **metadata}
    path = Path(path)
    with atomic_path(path) as temporary:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            tensors = {key: value.detach().clone().contiguous() for key, value in state_dict.items()}  # unshared
            save_file(tensors, temporary, metadata={"format": FORMAT, **{k: json.dumps(v) for k, v in fields.items()}})
        else:
            torch.save({"format": FORMAT, **fields, "state_dict": dict(state_dict)}, temporary)
    return path


def _missing_class(err: BaseException) -> str | None:
    """What unpickling could not import: "module 'x' is missing" or "'x' has no class 'Y'"; None otherwise."""
    if isinstance(err, ModuleNotFoundError) and err.name:
        return f"module {err.name!r} is missing"
    text = str(err)
    if isinstance(err, AttributeError) and "Can't get attribute" in text:
        return text.split("Can't get attribute", 1)[1].strip().rstrip(">").replace(" on <module", " in module")
    return None
