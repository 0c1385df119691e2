"""One small interface for every runtime deploykit runs an exported model in (Polygraphy's runners, in spirit).

A runtime is a class in its own file under ``deploykit/runtime/`` that loads a model and then

* ``inputs`` / ``outputs``: `TensorInfo` of each (name, NumPy dtype, shape with None where symbolic);
* ``batch_range``: the (smallest, largest) batch one call takes, largest None for any; None when dimension 0 is
  not a batch;
* ``run(feed) -> {output name: array}``: one call, every input by name, never cast;
* ``describe() -> dict``: what runs it, for reports (runtime, version, device, settings);
* ``close()``: release what it holds.

`load_runner` is the only place that knows the runtimes (`RUNNERS`): verification, the `Predictor`, Triton and the
benchmarks take any of them by name, and a fourth runtime is one new file plus one line here.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import onnx

from deploykit.errors import DeployError

# runtime name -> "module:class" of its runner, imported only when asked for (TensorRT and OpenVINO are optional).
RUNNERS: Mapping[str, str] = {
    "onnxruntime": "deploykit.runtime.ort:OrtRunner",
    "openvino": "deploykit.runtime.openvino:OpenVinoRunner",
    "tensorrt": "deploykit.runtime.trt:TensorRtRunner",
}
RUNTIMES = tuple(RUNNERS)


@dataclass(frozen=True)
class TensorInfo:
    """One model input or output: its name, NumPy dtype and shape (int sizes; str or None where symbolic)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]


class Runner(Protocol):
    """What every runtime's runner provides (see the module docstring)."""

    name: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    batch_range: tuple[int, int | None] | None

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


def load_runner(runtime: str, model: onnx.ModelProto | bytes | str | os.PathLike, **options: Any) -> Runner:
    """The runner of `runtime` for `model` (an ONNX model or file; a TensorRT engine file for "tensorrt").

    Options are the runtime's own: ``providers``, ``threads`` (onnxruntime), ``hint``, ``threads`` (openvino),
    ``plugins`` (tensorrt); options a runtime does not take are ignored, so one call serves every runtime.
    """
    if runtime not in RUNNERS:
        raise DeployError(f"Unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}.")
    module, name = RUNNERS[runtime].split(":")
    runner = getattr(importlib.import_module(module), name)
    accepted = runner.OPTIONS
    return runner(model, **{key: value for key, value in options.items() if key in accepted})


def require_runtime(runtime: str) -> None:
    """Fail in one sentence, before any slow step, when `runtime` is not installed (its runner's ``require``)."""
    if runtime not in RUNNERS:
        raise DeployError(f"Unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}.")
    module, name = RUNNERS[runtime].split(":")
    require = getattr(getattr(importlib.import_module(module), name), "require", None)
    if require is not None:
        require()


def parse_runtimes(names: Sequence[str]) -> list[str]:
    """Runtime names, checked, in order, each once."""
    unknown = [name for name in names if name not in RUNNERS]
    if unknown or not names:
        raise DeployError(f"--runtimes {','.join(names)!r} names {'no runtime' if not names else unknown[0]!r}; use "
                          f"one or more of {', '.join(RUNTIMES)}, comma-separated.")
    return list(dict.fromkeys(names))


def batch_range(inputs: Sequence[TensorInfo], outputs: Sequence[TensorInfo]) -> tuple[int, int | None] | None:
    """(smallest, largest) batch one call of a model with these inputs and outputs takes: the fixed batch of a
    static-batch model, (1, None) for a dynamic one; None when dimension 0 is not a batch (nothing is split)."""
    first = {info.shape[0] if info.shape else None for info in (*inputs, *outputs)}
    if len(first) == 1 and isinstance(next(iter(first)), int):
        return (next(iter(first)),) * 2
    if all(info.shape and not isinstance(info.shape[0], int) for info in inputs):
        return 1, None
    return None
