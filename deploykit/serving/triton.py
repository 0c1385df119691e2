"""Triton Inference Server model repositories for exported models, written all at once or not at all.

    DIR/<name>/config.pbtxt            the onnxruntime backend's configuration
    DIR/<name>/1/model.onnx            the exported model (version 1)
    DIR/<name>_trt/config.pbtxt        the tensorrt backend's configuration     } only with an engine
    DIR/<name>_trt/1/model.plan        the TensorRT engine                      }
    DIR/<name>_trt/<plugin library>    deploykit's plugins, loaded by the server (--backend-config=tensorrt,plugins=)
    DIR/<name>_openvino/config.pbtxt   the openvino backend's configuration     } only with --runtimes ...,openvino
    DIR/<name>_openvino/1/model.xml    the same model as OpenVINO IR (+ model.bin) }
    DIR/README.md                      how to start the server, check it, measure it and send a request

Triton reads only ``config.pbtxt`` and the numeric version folders of a model folder, and only the folders of the
repository, so the plugin library and the README beside them are ignored as models. ``config.pbtxt`` is protobuf
text that deploykit writes itself (deploykit needs no tritonclient at run time); `parse_config` checks a file
against Triton's own schema where ``tritonclient[grpc]`` is installed (the tests do).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx

from deploykit.errors import DeployError
from deploykit.fileio import missing_reason, nearest_existing

CONFIG_FILE = "config.pbtxt"
VERSION = "1"
README_FILE = "README.md"
README_MARKER = "# Triton model repository (written by deploykit)"
CONFIG_MARKER = "# written by deploykit: a later export of this model may replace this folder"
TRT_SUFFIX = "_trt"
OPENVINO_SUFFIX = "_openvino"
# How long the dynamic batcher may hold a request to form a larger batch: a tenth of a millisecond costs a single
# request nothing noticeable, and under load it is enough for concurrent requests to meet.
MAX_QUEUE_DELAY_US = 100
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:<yy.mm>-py3"

_TRITON_TYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16", onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.BFLOAT16: "TYPE_BF16", onnx.TensorProto.BOOL: "TYPE_BOOL", onnx.TensorProto.STRING: "TYPE_STRING",
    onnx.TensorProto.INT8: "TYPE_INT8", onnx.TensorProto.INT16: "TYPE_INT16", onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.UINT16: "TYPE_UINT16",
    onnx.TensorProto.UINT32: "TYPE_UINT32", onnx.TensorProto.UINT64: "TYPE_UINT64",
}
_INSTANCE_KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class _Enum(str):
    """A protobuf enum value, written bare (``TYPE_FP32``) rather than quoted."""


@dataclass(frozen=True)
class _Tensor:
    """One model input or output as Triton sees it: its name, Triton data type and full shape (-1: variable)."""

    name: str
    data_type: str
    dims: tuple[int, ...]
    numpy_dtype: str


def write_triton_repository(repo_dir: str | os.PathLike, name: str, onnx_model: onnx.ModelProto, *,
                            max_batch: int = 8, dynamic_batch: bool | None = None, instance_kind: str = "cpu",
                            threads: int | None = None, engine: bytes | None = None,
                            engine_profile: Mapping[str, Sequence[int]] | None = None,
                            plugin_library: str | os.PathLike | None = None,
                            example_shapes: Mapping[str, Sequence[int]] | None = None,
                            openvino_ir: tuple[bytes, bytes] | None = None) -> Path:
    """Write a Triton model repository serving `onnx_model` (and the TensorRT `engine`) into `repo_dir`.

    Everything is staged in a temporary folder beside `repo_dir` and renamed into place at the end; on any error
    nothing is left behind, not even a `repo_dir` that did not exist before. Models already in `repo_dir` stay, a
    previous ``<name>`` (and ``<name>_trt``) is replaced.

    Args:
        repo_dir: the model repository (created if needed); mounted as ``/models`` in the server's container.
        name: the model's name in Triton (its folder), e.g. the arch.
        onnx_model: the exported model, with inferred shapes (names, types and shapes come from its graph).
        max_batch: Triton's ``max_batch_size`` for a dynamic-batch model: the largest batch the dynamic batcher
            forms. Defaults to 8.
        dynamic_batch: serve with Triton's batching. Defaults to True exactly when the first dimension of every
            input and output is symbolic; True for a model without such a dimension is an error.
        instance_kind: "cpu" or "gpu": where the onnxruntime backend runs the model. Defaults to "cpu".
        threads: onnxruntime intra-op threads per model instance (inter-op 1). Defaults to onnxruntime's choice.
        engine: a serialized TensorRT engine of the same model; adds the ``<name>_trt`` model (GPU).
        engine_profile: the engine's optimisation profile of the model's one input, ``{"min": [...], "opt":
            [...], "max": [...]}`` (the report's ``tensorrt.profile``); required with `engine`.
        plugin_library: deploykit's TensorRT plugin library the engine needs; copied into ``<name>_trt/``.
        example_shapes: full input shapes (batch included) used in the README's request and perf_analyzer lines.
            Defaults to batch 1 and the graph's fixed sizes; needed when a non-batch dimension is symbolic.
        openvino_ir: the same model as OpenVINO IR (``model.xml``, ``model.bin`` bytes: deploykit's ops already
            converted, `deploykit.runtime.openvino.save_ir`, since Triton's OpenVINO backend cannot load deploykit's
            Python conversions); adds the ``<name>_openvino`` model (``backend: "openvino"``, CPU).

    Returns:
        `repo_dir` as a Path.

    Raises:
        DeployError: an argument the model or Triton cannot take, or a repository that cannot be written.
    """
    inputs = [_tensor(value, "input") for value in onnx_model.graph.input]
    outputs = [_tensor(value, "output") for value in onnx_model.graph.output]
    batched = _batched(inputs, outputs, dynamic_batch)
    check_triton_target(repo_dir, name, max_batch=max_batch, instance_kind=instance_kind, threads=threads)
    examples = _example_shapes(inputs, batched, example_shapes)

    onnx_config = _onnx_config(name, inputs, outputs, max_batch if batched else 0, instance_kind, threads)
    # None: a model folder of a previous export that this one no longer has (removed with the rest)
    entries: dict[str, dict[str, bytes | Path] | None] = {
        name: {CONFIG_FILE: _config_text(onnx_config), f"{VERSION}/model.onnx": onnx_model.SerializeToString()},
        name + TRT_SUFFIX: None, name + OPENVINO_SUFFIX: None}
    if openvino_ir is not None:
        xml, weights = openvino_ir
        openvino_config = _openvino_config(name + OPENVINO_SUFFIX, inputs, outputs, max_batch if batched else 0,
                                           threads)
        entries[name + OPENVINO_SUFFIX] = {CONFIG_FILE: _config_text(openvino_config), f"{VERSION}/model.xml": xml,
                                           f"{VERSION}/model.bin": weights}
    trt_name, plugin = None, None
    if engine is not None:
        trt_name = name + TRT_SUFFIX
        plugin = _existing_file(plugin_library, "TensorRT plugin library") if plugin_library is not None else None
        trt_config = _trt_config(trt_name, inputs, outputs, batched, _profile(engine_profile, inputs))
        entries[trt_name] = {CONFIG_FILE: _config_text(trt_config), f"{VERSION}/model.plan": bytes(engine)}
        if plugin is not None:
            entries[trt_name][plugin.name] = plugin
    readme = _readme(name, inputs, outputs, onnx_config, trt_name, plugin, examples, _uses_deform_conv(onnx_model))

    _commit(Path(repo_dir), entries, readme)
    return Path(repo_dir)


def check_triton_target(repo_dir: str | os.PathLike, name: str, *, max_batch: int = 8, instance_kind: str = "cpu",
                        threads: int | None = None) -> None:
    """The cheap checks of `write_triton_repository`, for a pipeline to run before its slow steps: the name, the
    numbers, and whether the repository can be written there. Creates nothing.

    Raises:
        DeployError: the first problem found, in one sentence.
    """
    if not _MODEL_NAME.fullmatch(name) or name == README_FILE:
        raise DeployError(f"{name!r} cannot name a Triton model: use letters, digits, '_', '.' and '-', starting with "
                          f"a letter or digit.")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise DeployError(f"The Triton max_batch_size must be a positive integer, not {max_batch!r}.")
    if instance_kind not in _INSTANCE_KINDS:
        raise DeployError(f"The Triton instance kind must be one of {', '.join(_INSTANCE_KINDS)}, not "
                          f"{instance_kind!r}.")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise DeployError(f"The onnxruntime thread count must be a positive integer, not {threads!r}.")
    repo = Path(repo_dir)
    existing = nearest_existing(repo)
    if not existing.is_dir():
        raise DeployError(f"The Triton repository {repo} cannot be created: {existing} is not a directory.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DeployError(f"The Triton repository {repo} cannot be written: {existing} is not writable.")
    _check_readme_is_ours(repo / README_FILE)
    _check_model_folders_are_ours(repo, name)


def parse_config(text: str):
    """Parse config.pbtxt text with Triton's own schema (``tritonclient[grpc]``); return the ModelConfig message.

    Raises:
        DeployError: tritonclient is not installed, or the text is not a valid Triton model configuration.
    """
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as err:
        raise DeployError("Checking a Triton configuration needs tritonclient: pip install 'tritonclient[grpc]'.") \
            from err
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as err:
        raise DeployError(f"The text is not a valid Triton model configuration: {err}.") from err


def _tensor(value: onnx.ValueInfoProto, kind: str) -> _Tensor:
    """The Triton description of one graph input or output; refuses what Triton cannot describe."""
    if not value.type.HasField("tensor_type"):
        raise DeployError(f"The ONNX {kind} {value.name!r} is not a tensor, which Triton cannot serve.")
    tensor = value.type.tensor_type
    if tensor.elem_type not in _TRITON_TYPES:
        raise DeployError(f"The ONNX {kind} {value.name!r} has element type "
                          f"{onnx.TensorProto.DataType.Name(tensor.elem_type)}, which Triton cannot serve.")
    if not tensor.HasField("shape"):
        raise DeployError(f"The ONNX {kind} {value.name!r} has no shape; run the graph passes (shape inference) "
                          f"before writing a Triton repository.")
    dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
    numpy_dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
    return _Tensor(value.name, _TRITON_TYPES[tensor.elem_type], dims, numpy_dtype)


def _batched(inputs: Sequence[_Tensor], outputs: Sequence[_Tensor], requested: bool | None) -> bool:
    """Whether Triton may batch: it needs dimension 0 to be the batch of every input and output."""
    batchable = all(t.dims and t.dims[0] == -1 for t in (*inputs, *outputs))
    if requested and not batchable:
        fixed = next(t for t in (*inputs, *outputs) if not t.dims or t.dims[0] != -1)
        raise DeployError(f"Triton cannot batch this model: the first dimension of {fixed.name!r} is not a symbolic "
                          f"batch (export with a dynamic batch, or serve it with a static batch).")
    return batchable if requested is None else requested


def _example_shapes(inputs: Sequence[_Tensor], batched: bool,
                    requested: Mapping[str, Sequence[int]] | None) -> dict[str, tuple[int, ...]]:
    """A concrete shape per input for the README's command lines."""
    requested = dict(requested or {})
    unknown = set(requested) - {t.name for t in inputs}
    if unknown:
        raise DeployError(f"example_shapes names {', '.join(sorted(unknown))}, which the model does not take (its "
                          f"inputs: {', '.join(t.name for t in inputs)}).")
    shapes = {}
    for tensor in inputs:
        default = tuple(1 if i == 0 and batched else d for i, d in enumerate(tensor.dims))
        shape = tuple(requested.get(tensor.name, default))
        if len(shape) != len(tensor.dims) or any(d < 1 or (fixed != -1 and d != fixed)
                                                 for d, fixed in zip(shape, tensor.dims)):
            raise DeployError(f"Input {tensor.name!r} of shape {_shape_text(tensor.dims)} needs a concrete example "
                              f"shape in example_shapes, not {_shape_text(shape)}.")
        shapes[tensor.name] = shape
    return shapes


def _profile(profile: Mapping[str, Sequence[int]] | None, inputs: Sequence[_Tensor]) -> dict[str, tuple[int, ...]]:
    """The engine's min/opt/max shapes, checked against the model's one input."""
    if len(inputs) != 1:
        raise DeployError(f"A TensorRT model in the repository needs a model with one input (the engine profile "
                          f"covers one), not {len(inputs)}.")
    if profile is None or any(key not in profile for key in ("min", "opt", "max")):
        raise DeployError("A TensorRT engine needs its optimisation profile, engine_profile={'min': ..., 'opt': ..., "
                          "'max': ...} (the report's tensorrt.profile).")
    shapes = {key: tuple(int(d) for d in profile[key]) for key in ("min", "opt", "max")}
    rank = len(inputs[0].dims)
    if any(len(shape) != rank for shape in shapes.values()) or \
            any(not lo <= opt <= hi for lo, opt, hi in zip(shapes["min"], shapes["opt"], shapes["max"])):
        raise DeployError(f"The engine profile {shapes} does not fit input {inputs[0].name!r} of shape "
                          f"{_shape_text(inputs[0].dims)} (min <= opt <= max, one size per dimension).")
    return shapes


def _existing_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DeployError(f"The {what} {path} {missing_reason(path)}.")
    return path


def _uses_deform_conv(model: onnx.ModelProto) -> bool:
    """Whether ONNX DeformConv runs anywhere in the model (in the graph or a deploykit:: function body)."""
    bodies = [model.graph.node, *(function.node for function in model.functions)]
    return any(node.op_type == "DeformConv" for body in bodies for node in body)


def _onnx_config(name: str, inputs: Sequence[_Tensor], outputs: Sequence[_Tensor], max_batch_size: int,
                 instance_kind: str, threads: int | None) -> dict:
    config = {"name": name, "platform": "onnxruntime_onnx", "backend": "onnxruntime",
              "max_batch_size": max_batch_size, **_io(inputs, outputs, max_batch_size > 0)}
    config.update(_batching(max_batch_size))
    config["instance_group"] = [{"kind": _Enum(_INSTANCE_KINDS[instance_kind]), "count": 1}]
    if threads is not None:
        config["parameters"] = [{"key": key, "value": {"string_value": str(value)}}
                                for key, value in (("intra_op_thread_count", threads), ("inter_op_thread_count", 1))]
    return config


def _openvino_config(name: str, inputs: Sequence[_Tensor], outputs: Sequence[_Tensor], max_batch_size: int,
                     threads: int | None) -> dict:
    """Triton's OpenVINO backend serving the IR on the CPU (its default file name is model.xml)."""
    config = {"name": name, "backend": "openvino", "max_batch_size": max_batch_size,
              **_io(inputs, outputs, max_batch_size > 0)}
    config.update(_batching(max_batch_size))
    config["instance_group"] = [{"kind": _Enum("KIND_CPU"), "count": 1}]
    # float32 as verified: on CPUs with bf16 units OpenVINO would otherwise compute in bf16 (2% off, measured).
    properties = {"INFERENCE_PRECISION_HINT": "f32", **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
    config["parameters"] = [{"key": key, "value": {"string_value": str(value)}} for key, value in properties.items()]
    return config


def _trt_config(name: str, inputs: Sequence[_Tensor], outputs: Sequence[_Tensor], batched: bool,
                profile: Mapping[str, tuple[int, ...]]) -> dict:
    """The engine's configuration: its input sizes come from the profile (-1 where min and max differ)."""
    dims = tuple(lo if lo == hi else -1 for lo, hi in zip(profile["min"], profile["max"]))
    engine_input = _Tensor(inputs[0].name, inputs[0].data_type, (-1, *dims[1:]) if batched else dims,
                           inputs[0].numpy_dtype)
    max_batch_size = profile["max"][0] if batched else 0
    config = {"name": name, "platform": "tensorrt_plan", "backend": "tensorrt", "max_batch_size": max_batch_size,
              **_io([engine_input], outputs, batched)}
    config.update(_batching(max_batch_size))
    config["instance_group"] = [{"kind": _Enum("KIND_GPU"), "count": 1}]
    return config


def _io(inputs: Sequence[_Tensor], outputs: Sequence[_Tensor], batched: bool) -> dict:
    """``input`` and ``output`` entries; with batching, Triton's dims leave the batch dimension out."""
    def entry(tensor: _Tensor) -> dict:
        dims = list(tensor.dims[1:] if batched else tensor.dims)
        described = {"name": tensor.name, "data_type": _Enum(tensor.data_type), "dims": dims or [1]}
        if not dims:  # Triton needs non-empty dims: a per-sample scalar is served as [1] and reshaped to []
            described["reshape"] = {"shape": []}
        return described

    return {"input": [entry(t) for t in inputs], "output": [entry(t) for t in outputs]}


def _batching(max_batch_size: int) -> dict:
    """The dynamic batcher, preferring half and full batches (it waits up to MAX_QUEUE_DELAY_US for them)."""
    if max_batch_size == 0:
        return {}
    preferred = sorted({max(1, max_batch_size // 2), max_batch_size})
    return {"dynamic_batching": {"preferred_batch_size": preferred,
                                 "max_queue_delay_microseconds": MAX_QUEUE_DELAY_US}}


def _pbtxt(message: Mapping, indent: int = 0) -> str:
    """Protobuf text format of a message given as a dict (lists of dicts are repeated messages)."""
    pad = "  " * indent
    lines = []
    for key, value in message.items():
        if isinstance(value, Mapping):
            lines += [f"{pad}{key} {{", _pbtxt(value, indent + 1), f"{pad}}}"]
        elif isinstance(value, list) and value and isinstance(value[0], Mapping):
            items = [f"{pad}  {{\n{_pbtxt(item, indent + 2)}\n{pad}  }}" for item in value]
            lines += [f"{pad}{key} [", ",\n".join(items), f"{pad}]"]
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(item) for item in value)} ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return "\n".join(lines) + ("\n" if indent == 0 else "")


def _scalar(value) -> str:
    if isinstance(value, _Enum):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _shape_text(dims: Sequence[int]) -> str:
    return "x".join("?" if d == -1 else str(d) for d in dims)


def _commit(repo: Path, entries: Mapping[str, Mapping[str, bytes | Path] | None], readme: str) -> None:
    """Stage every model folder and the README, then rename them into `repo`: previous versions are replaced, and
    removed where `entries` maps a folder to None."""
    created = [parent for parent in (repo, *repo.parents) if not parent.exists()]  # innermost first
    staging = None
    placed: list[Path] = []
    replaced: dict[Path, Path] = {}  # final path -> where its previous version waits until the end
    try:
        repo.mkdir(parents=True, exist_ok=True)
        staging = _staging_parent(repo) / f".{repo.name}.deploykit-{os.getpid()}.partial"
        staging.mkdir()
        (staging / ".replaced").mkdir()
        for model, files in entries.items():
            for relative, content in (files or {}).items():
                path = staging / model / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(content, Path):
                    shutil.copyfile(content, path)
                else:
                    path.write_bytes(content)
        (staging / README_FILE).write_text(readme)
        for entry in (*entries, README_FILE):
            final = repo / entry
            if final.exists() or final.is_symlink():
                os.replace(final, staging / ".replaced" / entry)
                replaced[final] = staging / ".replaced" / entry
            if entry == README_FILE or entries[entry] is not None:
                os.replace(staging / entry, final)
                placed.append(final)
    except BaseException as err:  # an interrupt too: leave the repository as it was
        for final in placed:
            _remove(final)
        for final, old in replaced.items():
            os.replace(old, final)
        if staging is not None:
            _remove(staging)
        for directory in created:
            with contextlib.suppress(OSError):  # gone already, or someone else put something in it
                directory.rmdir()
        if isinstance(err, OSError):
            raise DeployError(f"Cannot write the Triton repository {repo}: {err.strerror or err}.") from err
        raise
    _remove(staging)  # with the previous versions in it


def _staging_parent(repo: Path) -> Path:
    """Stage beside the repository, so that a server polling it never sees a half-written model; inside it when
    the repository is a mount point (a rename across file systems is not atomic) or its parent is read-only."""
    parent = repo.parent.resolve()
    if os.access(parent, os.W_OK) and os.stat(parent).st_dev == os.stat(repo).st_dev:
        return parent
    return repo


def _check_readme_is_ours(path: Path) -> None:
    """Refuse to replace a README.md that deploykit did not write (the repository may be someone else's)."""
    try:
        foreign = path.is_file() and not path.read_text(errors="replace").startswith(README_MARKER)
    except OSError as err:
        raise DeployError(f"Cannot read {path}: {err.strerror or err}.") from err
    if foreign:
        raise DeployError(f"{path} exists and was not written by deploykit; remove it or choose another repository "
                          f"directory.")


def _check_model_folders_are_ours(repo: Path, name: str) -> None:
    """Refuse to replace or remove a ``<name>``, ``<name>_trt`` or ``<name>_openvino`` folder that deploykit did not
    write (its config.pbtxt does not start with `CONFIG_MARKER`): it is someone else's model."""
    for folder in (repo / name, repo / (name + TRT_SUFFIX), repo / (name + OPENVINO_SUFFIX)):
        if not (folder.exists() or folder.is_symlink()):
            continue
        config = folder / CONFIG_FILE
        try:
            ours = folder.is_dir() and not folder.is_symlink() and config.is_file() and \
                config.read_text(errors="replace").startswith(CONFIG_MARKER)
        except OSError as err:
            raise DeployError(f"Cannot read {config}: {err.strerror or err}.") from err
        if not ours:
            raise DeployError(f"The Triton repository {repo} already holds {folder.name}, which deploykit did not "
                              f"write; remove it, or choose another --triton-name or repository directory.")


def _config_text(message: Mapping) -> bytes:
    return f"{CONFIG_MARKER}\n{_pbtxt(message)}".encode()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _readme(name: str, inputs: Sequence[_Tensor], outputs: Sequence[_Tensor], onnx_config: Mapping,
            trt_name: str | None, plugin: Path | None, examples: Mapping[str, tuple[int, ...]],
            deform_conv: bool) -> str:
    """How to serve, check, measure and call the repository, with this model's names and shapes filled in."""
    batched = onnx_config["max_batch_size"] > 0
    gpu = trt_name is not None or onnx_config["instance_group"][0]["kind"] == "KIND_GPU"
    signature = ", ".join(f"`{t.name}` {t.data_type} {_shape_text(t.dims)}" for t in inputs)
    results = ", ".join(f"`{t.name}` {t.data_type} {_shape_text(t.dims)}" for t in outputs)
    batching = (f"dynamic batching up to {onnx_config['max_batch_size']} (`?` first dimension)" if batched
                else "no batching by Triton (every request has the full shape)")
    lines = [README_MARKER, "", "Models:", "",
             f"- `{name}`: ONNX Runtime backend, `{name}/1/model.onnx` on "
             f"{onnx_config['instance_group'][0]['kind']}; inputs {signature}; outputs {results}; {batching}."]
    if trt_name is not None:
        lines.append(f"- `{trt_name}`: TensorRT backend, `{trt_name}/1/model.plan` on KIND_GPU, the same inputs and "
                     f"outputs. An engine runs only with the TensorRT version that built it (`report.json`, "
                     f"`tensorrt.version`) on the same GPU architecture"
                     + (f"; it needs deploykit's plugins, `{trt_name}/{plugin.name}`." if plugin else "."))
    if deform_conv:
        lines += ["", "The model uses ONNX `DeformConv`, which ONNX Runtime runs from 1.25 on: pick a Triton release "
                      "whose ONNX Runtime is at least 1.25, or re-export with `--lowering standard`."]
    plugin_flag = f" --backend-config=tensorrt,plugins=/models/{trt_name}/{plugin.name}" if plugin else ""
    lines += ["", "## Start the server", "",
              "Run from this directory (it is mounted as `/models`). Choose `<yy.mm>`, a Triton release, "
              + ("whose TensorRT is the one that built the engine (NVIDIA's Frameworks Support Matrix lists it); "
                 if trt_name else "whose ONNX Runtime reads the model (opset 20, IR 10); ")
              + ("the GPU needs `--gpus=all` and the NVIDIA Container Toolkit." if gpu else "no GPU is needed."), "",
              "```",
              f"docker run --rm{' --gpus=all' if gpu else ''} -p8000:8000 -p8001:8001 -p8002:8002 -v \"$PWD\":/models "
              f"{TRITON_IMAGE} tritonserver --model-repository=/models{plugin_flag}",
              "```"]
    if plugin:
        lines += ["", "`--backend-config=tensorrt,plugins=` loads the plugin library into the TensorRT backend "
                      "(several: separate them with `;`). The alternative is to preload it into the server process; "
                      "it must be built against the container's TensorRT version either way:", "",
                  "```",
                  f"docker run --rm --gpus=all -p8000:8000 -p8001:8001 -p8002:8002 -v \"$PWD\":/models "
                  f"-e LD_PRELOAD=/models/{trt_name}/{plugin.name} {TRITON_IMAGE} tritonserver "
                  f"--model-repository=/models",
                  "```"]
    shape_flags = " ".join(f"--shape {t.name}:{','.join(map(str, examples[t.name][1 if batched else 0:]))}"
                           for t in inputs)
    lines += ["", "## Check it", "",
              "```",
              "curl -sf localhost:8000/v2/health/ready && echo ready",
              f"curl localhost:8000/v2/models/{name}/config",
              "```",
              "", "## Measure it", "",
              "`perf_analyzer` ships in the SDK image (`<yy.mm>-py3-sdk`); `-b N` sends batches of N.", "",
              "```",
              *(f"docker run --rm --net=host {TRITON_IMAGE}-sdk perf_analyzer -m {model} {shape_flags} "
                f"--concurrency-range 1:4" for model in (name, trt_name) if model),
              "```",
              "", "## One request from Python (`pip install 'tritonclient[grpc]'`)", "",
              "```python", _client_snippet(name, inputs, outputs, examples), "```", ""]
    return "\n".join(lines)


def _client_snippet(name: str, inputs: Sequence[_Tensor], outputs: Sequence[_Tensor],
                    examples: Mapping[str, tuple[int, ...]]) -> str:
    feeds = "\n".join(f"    {t.name!r}: rng.standard_normal({examples[t.name]}).astype({t.numpy_dtype!r}),"
                      for t in inputs)
    return "\n".join([
        "import numpy as np",
        "import tritonclient.grpc as grpcclient",
        "from tritonclient.utils import np_to_triton_dtype",
        "",
        'client = grpcclient.InferenceServerClient("localhost:8001")',
        "rng = np.random.default_rng(0)",
        "feeds = {", feeds, "}",
        "inputs = []",
        "for input_name, array in feeds.items():",
        "    inputs.append(grpcclient.InferInput(input_name, list(array.shape), np_to_triton_dtype(array.dtype)))",
        "    inputs[-1].set_data_from_numpy(array)",
        f"result = client.infer({name!r}, inputs)",
        f"for output_name in {[t.name for t in outputs]!r}:",
        "    print(output_name, result.as_numpy(output_name).shape)",
    ])
