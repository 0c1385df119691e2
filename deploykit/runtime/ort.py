"""onnxruntime sessions for exported models, and `OrtRunner`, onnxruntime behind deploykit's runtime interface
(`deploykit.runtime.base`).

By default the session uses the best execution providers this onnxruntime build offers, in the order TensorRT,
CUDA, CPU (``onnxruntime-gpu`` offers the first two; the plain wheel only CPU). The report records the providers
the session actually runs with.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from deploykit.errors import DeployError
from deploykit.memory import out_of_memory
from deploykit.runtime.base import TensorInfo, batch_range

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_SHORT_NAMES = {"trt": "TensorrtExecutionProvider", "tensorrt": "TensorrtExecutionProvider",
                "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
# Wheels that all install the same `onnxruntime` module: with two of them, each overwrites the other's files.
ONNXRUNTIME_WHEELS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml")


@functools.cache
def check_one_onnxruntime() -> None:
    """Refuse an install with two onnxruntime wheels (e.g. the base dependency plus onnxruntime-gpu), whose mixed
    files load whichever provider library was written last."""
    installed = []
    for wheel in ONNXRUNTIME_WHEELS:
        try:
            importlib.metadata.version(wheel)
            installed.append(wheel)
        except importlib.metadata.PackageNotFoundError:
            pass
    if len(installed) > 1:
        keep = next((wheel for wheel in installed if wheel != "onnxruntime"), installed[-1])
        raise DeployError(f"{', '.join(installed)} are installed together and overwrite each other's files: run "
                          f"pip uninstall -y {' '.join(installed)} && pip install {keep}.")


def resolve_providers(requested: Sequence[str] | None = None) -> list[str]:
    """Provider names for a session: `requested` (short names like "cpu" allowed) or the best available.

    Args:
        requested: e.g. ["cuda", "cpu"]. Defaults to every available provider among TensorRT, CUDA, CPU.
    """
    check_one_onnxruntime()
    available = ort.get_available_providers()
    if not requested:
        return [p for p in PREFERRED_PROVIDERS if p in available]
    providers = [_SHORT_NAMES.get(name.lower(), name) for name in requested]
    missing = [p for p in providers if p not in available]
    if missing:
        raise DeployError(f"This onnxruntime build does not offer {', '.join(missing)} (available: "
                          f"{', '.join(available)}).")
    return providers


def session_from_onnx(model: onnx.ModelProto | bytes, providers: Sequence[str] | None = None,
                      threads: int | None = None) -> ort.InferenceSession:
    """An InferenceSession with all graph optimisations.

    Args:
        model: the model (ModelProto or serialized bytes).
        providers: see `resolve_providers`. Defaults to the best available.
        threads: intra-op threads. Defaults to onnxruntime's choice (one per physical core).
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    try:
        return ort.InferenceSession(data, options, providers=resolve_providers(providers))
    except (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.NotImplemented,
            ort.capi.onnxruntime_pybind11_state.InvalidGraph, RuntimeError) as err:
        raise DeployError(f"onnxruntime {ort.__version__} cannot load the exported model: "
                          f"{str(err).strip().splitlines()[0]}.") from err


_ORT_TYPE_NAMES = {"float": "float32", "double": "float64", "bool": "bool", "string": "object"}
_RUN_ERRORS = tuple(getattr(ort.capi.onnxruntime_pybind11_state, name)
                    for name in ("Fail", "InvalidArgument", "RuntimeException", "NotImplemented"))


class OrtRunner:
    """An onnxruntime session of an ONNX model (ModelProto, bytes or file), shared by every calling thread
    (``InferenceSession.run`` is thread-safe)."""

    name = "onnxruntime"
    OPTIONS = ("providers", "threads")

    def __init__(self, model: onnx.ModelProto | bytes | str | os.PathLike, providers: Sequence[str] | None = None,
                 threads: int | None = None) -> None:
        if isinstance(model, (str, os.PathLike)):
            try:
                model = Path(model).read_bytes()
            except OSError as err:
                raise DeployError(f"Cannot read {model}: {err.strerror or err}.") from err
        try:
            self.session = session_from_onnx(model, providers, threads)
        except ort.capi.onnxruntime_pybind11_state.InvalidProtobuf as err:
            raise DeployError("The file is not an ONNX model (it is corrupt or truncated).") from err
        self.threads = threads
        self.providers: list[str] = self.session.get_providers()
        self.inputs = [_info(value) for value in self.session.get_inputs()]
        self.outputs = [_info(value) for value in self.session.get_outputs()]
        self.batch_range = batch_range(self.inputs, self.outputs)

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            values = self.session.run(None, dict(feed))
        except _RUN_ERRORS as err:
            if out_of_memory(err, "onnxruntime") is not None:
                raise  # the caller says what ran out of memory (`deploykit.memory.memory_errors`)
            raise DeployError(f"onnxruntime failed to run the model: {str(err).strip().splitlines()[0]}.") from err
        return dict(zip((info.name for info in self.outputs), values))

    def describe(self) -> dict[str, Any]:
        return {"runtime": self.name, "version": ort.__version__, "providers": self.providers,
                "threads": self.threads}

    def close(self) -> None:
        """Nothing per thread to release: the session goes with the runner."""


def _info(value) -> TensorInfo:
    """TensorInfo of an onnxruntime NodeArg ("tensor(float)" -> float32; symbolic sizes as their names)."""
    element = value.type.removeprefix("tensor(").removesuffix(")")
    return TensorInfo(value.name, np.dtype(_ORT_TYPE_NAMES.get(element, element)), tuple(value.shape))
