"""OpenVINO (CPU) for exported models: the same ``.onnx`` file onnxruntime runs, read as it is.

OpenVINO's ONNX frontend neither reads ONNX model-local functions (so the ``deploykit::`` nodes' standard-op
bodies are invisible to it) nor converts ONNX ``DeformConv``. deploykit therefore registers ONNX-frontend
conversion extensions that map its nodes, and DeformConv, onto native OpenVINO ops (the conversions live with their
ops: ``to_openvino`` in ``deploykit/ops/``). Everything else in the file is standard ONNX and imports as it is.
``openvino`` is imported only here and only when used, so deploykit installs and runs without it.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx

from deploykit.errors import DeployError
from deploykit.export.custom_op import DOMAIN
from deploykit.ops import deform_conv2d, dynamic_conv2d
from deploykit.runtime.base import TensorInfo, batch_range

DEVICE = "CPU"
HINTS = ("LATENCY", "THROUGHPUT")
# (ONNX domain, op_type) -> conversion of one node (openvino.frontend.NodeContext -> the node's outputs).
CONVERSIONS: Mapping[tuple[str, str], Callable[[Any], list]] = {
    (DOMAIN, dynamic_conv2d.OP_TYPE): dynamic_conv2d.to_openvino,
    (DOMAIN, dynamic_conv2d.QDQ_OP_TYPE): dynamic_conv2d.qdq_to_openvino,  # the int8 file (--quantize int8)
    (DOMAIN, deform_conv2d.OP_TYPE): deform_conv2d.to_openvino,
    ("", "DeformConv"): deform_conv2d.to_openvino,  # the node's body; some files carry it directly
}


def require_openvino() -> ModuleType:
    """The ``openvino`` module, or a DeployError saying in one sentence how to install it."""
    try:
        import openvino
    except ImportError as err:
        raise DeployError("OpenVINO is not installed; pip install 'deploykit[openvino]'.") from err
    return openvino


@functools.cache
def core() -> Any:
    """One ``openvino.Core`` for the process, with deploykit's ONNX-frontend conversions registered (they must be
    added before a model is read, and adding them twice to one Core would register them twice)."""
    openvino = require_openvino()
    from openvino.frontend.onnx import ConversionExtension

    ov_core = openvino.Core()
    for (domain, op_type), conversion in CONVERSIONS.items():
        ov_core.add_extension(ConversionExtension(op_type, domain, conversion))
    return ov_core


def read_model(model: onnx.ModelProto | str | os.PathLike) -> Any:
    """An ``openvino.Model`` from an ONNX ModelProto or ``.onnx`` path, as it is (dynamic dimensions kept)."""
    if isinstance(model, onnx.ModelProto):
        source, data = "the model", model.SerializeToString()
    else:
        path = Path(model)
        if not path.is_file():
            raise DeployError(f"The ONNX file {path} does not exist.")
        source, data = str(path), path.read_bytes()
    ov_core = core()
    try:
        return ov_core.read_model(data, b"")
    except RuntimeError as err:
        raise DeployError(f"OpenVINO {version()} cannot read {source}: {_first_failure(err)}.") from err


def compile_model(model: Any, hint: str = "LATENCY", threads: int | None = None) -> Any:
    """An ``openvino.CompiledModel`` for the CPU.

    Args:
        model: an ``openvino.Model`` (see `read_model`).
        hint: "LATENCY" (one stream: one request at a time as fast as possible) or "THROUGHPUT" (several streams
            for concurrent requests, e.g. ``openvino.AsyncInferQueue``).
        threads: inference threads. Defaults to OpenVINO's choice (the physical cores).

    The precision is pinned to f32: on CPUs with bfloat16 support (AVX-512 BF16, AMX) OpenVINO otherwise runs
    float32 models in bfloat16 (about 1% of the output range off), which is not the model that was verified.
    """
    hint = hint.upper()
    if hint not in HINTS:
        raise DeployError(f"OpenVINO performance hint {hint!r} is unknown; choose one of {', '.join(HINTS)}.")
    config = {"PERFORMANCE_HINT": hint, "INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    try:
        return core().compile_model(model, DEVICE, config)
    except RuntimeError as err:
        raise DeployError(f"OpenVINO {version()} cannot compile the model for {DEVICE}: "
                          f"{_first_failure(err)}.") from err


def save_ir(model: onnx.ModelProto | str | os.PathLike, xml_path: str | os.PathLike) -> Path:
    """Write the converted model as OpenVINO IR (``.xml`` + ``.bin`` beside it) and return the ``.xml`` path.

    Where deploykit's Python conversions cannot be registered (Triton's OpenVINO backend reads files in C++), the
    IR carries the already converted native ops, so a bare OpenVINO reads it. Weights stay float32 (no
    compression), so the IR computes what the ONNX file computes.
    """
    openvino = require_openvino()
    xml_path = Path(xml_path)
    openvino.save_model(read_model(model), xml_path, compress_to_fp16=False)
    return xml_path


def ir_bytes(model: onnx.ModelProto | str | os.PathLike) -> tuple[bytes, bytes]:
    """The model as OpenVINO IR, (``model.xml``, ``model.bin``) bytes, for writers that stage files themselves
    (a Triton repository)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="deploykit-ir-") as folder:
        xml = save_ir(model, Path(folder) / "model.xml")
        return xml.read_bytes(), xml.with_suffix(".bin").read_bytes()


def version() -> str:
    """The installed OpenVINO release, e.g. "2026.4.1"."""
    return importlib.metadata.version("openvino")


def _first_failure(err: RuntimeError) -> str:
    """The most specific line of an OpenVINO error (its messages carry the C++ check chain first)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    detail = [line for line in lines if not line.startswith(("Exception from", "Check ", "FrontEnd API failed"))]
    return (detail or lines or ["unknown error"])[0].rstrip(".")


def _tensor_info(port: Any) -> TensorInfo:
    """TensorInfo of a compiled model's input or output port (None for dynamic sizes)."""
    shape = tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())
    return TensorInfo(port.get_any_name(), np.dtype(port.get_element_type().to_dtype()), shape)


class OpenVinoRunner:
    """An ONNX file compiled by OpenVINO for the CPU: load, run a feed, describe yourself.

    Args:
        model: an ONNX ModelProto or ``.onnx`` path, read as it is (see `read_model`).
        hint: the performance hint, "LATENCY" or "THROUGHPUT" (see `compile_model`).
        threads: inference threads. Defaults to OpenVINO's choice.

    `run` uses one infer request per calling thread, so one runner may be called from several threads at once.
    """

    name = "openvino"
    OPTIONS = ("hint", "threads")
    require = staticmethod(require_openvino)

    def __init__(self, model: onnx.ModelProto | str | os.PathLike, hint: str = "LATENCY",
                 threads: int | None = None) -> None:
        self.hint = hint.upper()
        self.threads = threads
        self.compiled = compile_model(read_model(model), hint, threads)
        self.inputs: list[TensorInfo] = [_tensor_info(port) for port in self.compiled.inputs]
        self.outputs: list[TensorInfo] = [_tensor_info(port) for port in self.compiled.outputs]
        self.batch_range = batch_range(self.inputs, self.outputs)
        self._local = threading.local()

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The outputs by name for `feed` (every input by name, arrays of the input's dtype, any size the file's
        dynamic dimensions allow; never cast)."""
        self._check(feed)
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        try:
            results = request.infer({name: np.ascontiguousarray(array) for name, array in feed.items()})
        except RuntimeError as err:
            raise DeployError(f"OpenVINO could not run the model: {_first_failure(err)}.") from err
        return {info.name: np.array(results[port]) for info, port in zip(self.outputs, self.compiled.outputs)}

    def describe(self) -> dict[str, Any]:
        """What runs the model, for reports: runtime, version, device, hint, threads and the conversions used."""
        return {"runtime": self.name, "version": version(), "device": DEVICE, "hint": self.hint,
                "threads": self.compiled.get_property("INFERENCE_NUM_THREADS"),
                "streams": self.compiled.get_property("NUM_STREAMS"),
                "conversions": [f"{domain or 'ai.onnx'}::{op_type}" for domain, op_type in CONVERSIONS]}

    def close(self) -> None:
        """Release the compiled model (its memory and threads)."""
        self.compiled = self._local = None

    def _check(self, feed: Mapping[str, np.ndarray]) -> None:
        names = [info.name for info in self.inputs]
        if sorted(feed) != sorted(names):
            raise DeployError(f"The feed has inputs {sorted(feed)}; the model takes {names}.")
        for info in self.inputs:
            array = feed[info.name]
            if array.dtype != info.dtype:
                raise DeployError(f"Input {info.name!r} is {array.dtype}; the model takes {info.dtype} (cast it "
                                  f"before calling).")
            fixed = [(axis, size) for axis, size in enumerate(info.shape) if size is not None]
            if array.ndim != len(info.shape) or any(array.shape[axis] != size for axis, size in fixed):
                raise DeployError(f"Input {info.name!r} has shape {list(array.shape)}; the model takes "
                                  f"{['?' if size is None else size for size in info.shape]}.")
