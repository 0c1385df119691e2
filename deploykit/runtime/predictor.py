"""`Predictor`: run an exported model from Python, in any runtime (`deploykit.runtime.base`: onnxruntime,
OpenVINO, a TensorRT engine), with checked inputs.

    predictor = Predictor("deploykit-out/scnet50")        # an export directory, or a bare .onnx / .plan file
    y = predictor(x)                                      # what the PyTorch model returned: an array, or the
    y = predictor(image, meta)                            #   tuple / list / dict of arrays (an export directory
                                                          #   records the structure), inputs in forward order
    outputs = predictor.run({"input": x})                 # name -> array, every output

Inputs are checked before they reach the runtime, so a wrong name, dtype, rank or size fails with one sentence
naming it instead of a runtime's stack trace. Inputs are never cast: a float64 array for a float32 model is
refused (a silent cast would hide that the caller computes at another precision and would copy every batch).
Any batch size is accepted: a static-batch model, or an engine whose profile stops below the batch, runs the
batch in chunks, the last one padded with copies of its last row that are dropped from the outputs.

One Predictor may be called from many threads: onnxruntime's ``InferenceSession.run`` is thread-safe and the
session is shared; an OpenVINO infer request and a TensorRT execution context are not, so each calling thread gets
its own (the compiled model or engine is shared).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from deploykit.artifacts import ENGINE_FILE, INT8_MODEL_FILE, MODEL_FILE, REPORT_FILE
from deploykit.errors import DeployError
from deploykit.fileio import missing_reason
from deploykit.runtime import trt
from deploykit.runtime.base import RUNTIMES, TensorInfo, load_runner
from deploykit.signature import fill_template

PRECISIONS = (None, "fp32", "int8")
_SUFFIX_RUNTIMES = {".onnx": "onnxruntime", ".plan": "tensorrt", ".engine": "tensorrt"}
_KINDS = {"onnxruntime": "an ONNX model", "tensorrt": "a TensorRT engine"}
_ONNX_RUNTIMES = ("onnxruntime", "openvino")  # both run the same .onnx file

class Predictor:
    """An exported model ready to run: ``predictor(x)`` or ``predictor.run({name: array})``.

    Args:
        path: an export directory (``model.onnx``, ``report.json``, maybe ``model.plan``) or a ``.onnx`` /
            ``.plan`` file.
        runtime: one of `deploykit.runtime.base.RUNTIMES`: "onnxruntime" or "openvino" (run ``model.onnx``, the
            same file) or "tensorrt" (runs ``model.plan``). Defaults to the file's kind, and to onnxruntime for a
            directory.
        providers: onnxruntime execution providers, e.g. ["cpu"]. Defaults to those of the export's report that
            this onnxruntime build offers, else the best available.
        threads: the runtime's inference threads. Defaults to the runtime's choice.
        hint: OpenVINO's performance hint, "LATENCY" or "THROUGHPUT". Defaults to "LATENCY".
        plugins: deploykit's TensorRT plugin library. Defaults to the report's, else `trt.find_plugin_library`'s.
        precision: which model of an export directory onnxruntime runs: "fp32" (``model.onnx``) or "int8"
            (``model.int8.onnx``, written by ``--quantize int8``). Defaults to "fp32".

    Raises:
        DeployError: a missing or unreadable model, an unknown runtime, or TensorRT asked for but not installed.
    """

    def __init__(self, path: str | os.PathLike, runtime: str | None = None, providers: Sequence[str] | None = None,
                 threads: int | None = None, plugins: str | os.PathLike | None = None,
                 precision: str | None = None, hint: str | None = None) -> None:
        self.runtime, self.path, report = _locate(Path(path), runtime, precision)
        options = {"threads": threads, "hint": hint or "LATENCY"}
        if self.runtime == "onnxruntime":
            options["providers"] = providers or _report_providers(report)
        if self.runtime == "tensorrt":
            options["plugins"] = _plugin_library(plugins, report)
        self._backend = load_runner(self.runtime, self.path, **options)
        self.inputs: list[TensorInfo] = self._backend.inputs
        self.outputs: list[TensorInfo] = self._backend.outputs
        self.providers: list[str] = getattr(self._backend, "providers", [])  # onnxruntime's execution providers
        # (low, high) size per dimension of each input: an engine's optimisation profile, else the file's shapes.
        self._bounds = getattr(self._backend, "bounds", None) or \
            {info.name: [(d, d) if isinstance(d, int) else (0, None) for d in info.shape] for info in self.inputs}
        # What the PyTorch model returned, with output names for its tensors (`deploykit.signature`); a bare file
        # has no report: one output comes back as an array, several as a dict by name.
        names = [info.name for info in self.outputs]
        self.output_structure = report.get("export", {}).get("output_structure") or \
            (names[0] if len(names) == 1 else {"dict": {name: name for name in names}})

    def __call__(self, *inputs: np.ndarray):
        """The model's outputs for `inputs` (one array per model input, in the order of `inputs`), in the
        structure the PyTorch model returned them: an array, or a tuple, list or dict of arrays."""
        if len(inputs) != len(self.inputs):
            expected = ", ".join(info.name for info in self.inputs)
            raise DeployError(f"The model takes {len(self.inputs)} input(s) ({expected}) but {len(inputs)} were "
                              f"given; pass one array per input, or call predictor.run({{name: array, ...}}).")
        return fill_template(self.output_structure, self.run(dict(zip((i.name for i in self.inputs), inputs))))

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every output, by name, for the input arrays in `feeds` (any batch size)."""
        arrays = self._checked(feeds)
        batch = self._backend.batch_range
        names = [info.name for info in self.outputs]
        if batch is None:
            return self._backend.run(arrays)
        size = _common_batch(arrays)
        smallest, largest = batch
        step = largest or size
        parts = []
        for start in range(0, size, step):
            chunk = {name: array[start:start + step] for name, array in arrays.items()}
            rows = min(step, size - start)
            if rows < smallest:
                chunk = {name: _pad_rows(array, smallest) for name, array in chunk.items()}
            outputs = self._backend.run(chunk)
            parts.append([outputs[name][:rows] for name in names])
        if len(parts) == 1:
            return dict(zip(names, parts[0]))
        return {name: np.concatenate([part[i] for part in parts]) for i, name in enumerate(names)}

    def close(self) -> None:
        """Release the runtime's per-thread resources (TensorRT execution contexts); the Predictor is then done."""
        self._backend.close()

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _checked(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The feeds as contiguous arrays, after checking names, dtypes, ranks and sizes against the model."""
        if not isinstance(feeds, Mapping):
            raise DeployError(f"Predictor.run takes a dict of input name -> array, not a {type(feeds).__name__}.")
        expected = ", ".join(repr(info.name) for info in self.inputs)
        known = {info.name: info for info in self.inputs}
        for name in feeds:
            if name not in known:
                raise DeployError(f"The model has no input named {name!r}; its inputs are {expected}.")
        arrays = {}
        for info in self.inputs:
            if info.name not in feeds:
                raise DeployError(f"Input {info.name!r} is missing; the model takes {expected}.")
            array = np.asarray(feeds[info.name])
            if array.dtype != info.dtype:
                raise DeployError(f"Input {info.name!r} has dtype {array.dtype}, but the model takes {info.dtype}; "
                                  f"convert it first (x.astype(np.{info.dtype})), deploykit does not cast inputs.")
            bounds = self._bounds[info.name]
            if array.ndim != len(bounds):
                raise DeployError(f"Input {info.name!r} has {array.ndim} dimensions (shape {_text(array.shape)}), "
                                  f"but the model takes {len(bounds)} ({_text(info.shape)}).")
            for axis, (size, (low, high)) in enumerate(zip(array.shape, bounds)):
                if axis == 0 and self._backend.batch_range is not None:
                    continue  # any batch: run in chunks
                if size < low or (high is not None and size > high):
                    allowed = str(low) if low == high else f"{low} to {high if high is not None else 'any size'}"
                    raise DeployError(f"Input {info.name!r} has size {size} at dimension {axis}, but the model takes "
                                      f"{allowed} there ({_text(info.shape)}).")
            arrays[info.name] = np.ascontiguousarray(array)
        return arrays


def _locate(path: Path, runtime: str | None, precision: str | None = None) -> tuple[str, Path, dict]:
    """The runtime, the model file it runs, and the export's report ({} for a bare file)."""
    if runtime is not None and runtime not in RUNTIMES:
        raise DeployError(f"Unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}.")
    if precision not in PRECISIONS:
        raise DeployError(f"Unknown precision {precision!r}; use one of {', '.join(p for p in PRECISIONS if p)}.")
    if precision == "int8" and (runtime == "tensorrt" or not path.is_dir()):
        raise DeployError("precision='int8' picks the int8 model of an export directory for onnxruntime or "
                          "openvino; pass the directory (or the .onnx file itself, without precision).")
    if path.is_dir():
        runtime = runtime or "onnxruntime"
        model_file = path / (ENGINE_FILE if runtime == "tensorrt" else INT8_MODEL_FILE if precision == "int8"
                             else MODEL_FILE)
        if not model_file.is_file():
            hint = " (export with --engine to build one)" if runtime == "tensorrt" else \
                " (export with --quantize int8 to write one)" if precision == "int8" else ""
            raise DeployError(f"{path} holds no {model_file.name}{hint}, so it is not an export directory for "
                              f"{runtime}.")
        return runtime, model_file, _read_report(path / REPORT_FILE)
    if not path.is_file():
        raise DeployError(f"{path} {missing_reason(path)}.")
    kind = _SUFFIX_RUNTIMES.get(path.suffix.lower())
    if kind is None:
        raise DeployError(f"{path} is neither an export directory nor a .onnx or .plan file.")
    if runtime is not None and (runtime in _ONNX_RUNTIMES) != (kind in _ONNX_RUNTIMES):
        raise DeployError(f"{path} is {_KINDS[kind]}, which runtime={runtime!r} cannot run; pass the export's "
                          f"{ENGINE_FILE if runtime == 'tensorrt' else MODEL_FILE} instead.")
    return runtime or kind, path, {}


def _read_report(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DeployError(f"Cannot read the export report {path}: {err}.") from err
    if not isinstance(report, dict):
        raise DeployError(f"The export report {path} is not a JSON object.")
    return report


def _report_providers(report: dict) -> list[str] | None:
    """The providers the export ran with that this onnxruntime build offers (an export made on a GPU machine may
    be served on a CPU one); None (the best available) if there are none."""
    recorded = (report.get("runtime") or {}).get("providers") or []
    available = ort.get_available_providers()
    return [provider for provider in recorded if provider in available] or None


def _plugin_library(requested: str | os.PathLike | None, report: dict) -> Path | None:
    """`requested`, else the report's library where it still exists, else the usual lookup."""
    recorded = (report.get("tensorrt") or {}).get("plugin_library")
    if requested is None and recorded and Path(recorded).is_file():
        return Path(recorded)
    return trt.find_plugin_library(requested)


def _common_batch(arrays: Mapping[str, np.ndarray]) -> int:
    sizes = {name: array.shape[0] for name, array in arrays.items()}
    if len(set(sizes.values())) > 1:
        raise DeployError(f"The inputs have different batch sizes ({', '.join(f'{n}: {s}' for n, s in sizes.items())}"
                          f"); they must share dimension 0.")
    size = next(iter(sizes.values()))
    if size < 1:
        raise DeployError("The batch is empty; pass at least one row.")
    return size


def _pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
    """`array` grown to `rows` rows with copies of its last row (real data: no zeros that could divide by zero)."""
    return np.concatenate([array, np.repeat(array[-1:], rows - len(array), axis=0)])


def _text(shape: Sequence[int | str | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
