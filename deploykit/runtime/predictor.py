"""`Predictor`: run an exported model from Python, in onnxruntime or as a TensorRT engine, with checked inputs.

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
session is shared; a TensorRT execution context is not, so each calling thread gets its own (the engine is shared).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from deploykit.artifacts import ENGINE_FILE, INT8_MODEL_FILE, MODEL_FILE, REPORT_FILE
from deploykit.errors import DeployError
from deploykit.fileio import missing_reason
from deploykit.log import polygraphy_quiet
from deploykit.runtime import trt
from deploykit.runtime.ort import session_from_onnx
from deploykit.signature import fill_template

RUNTIMES = ("onnxruntime", "tensorrt")
PRECISIONS = (None, "fp32", "int8")
_SUFFIX_RUNTIMES = {".onnx": "onnxruntime", ".plan": "tensorrt", ".engine": "tensorrt"}
_KINDS = {"onnxruntime": "an ONNX model", "tensorrt": "a TensorRT engine"}
_ORT_TYPE_NAMES = {"float": "float32", "double": "float64", "bool": "bool", "string": "object"}
_ORT_ERRORS = tuple(getattr(ort.capi.onnxruntime_pybind11_state, name)
                    for name in ("Fail", "InvalidArgument", "RuntimeException", "NotImplemented"))


@dataclass(frozen=True)
class TensorInfo:
    """One model input or output: its name, NumPy dtype and shape (int sizes; str or None where symbolic)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]


class Predictor:
    """An exported model ready to run: ``predictor(x)`` or ``predictor.run({name: array})``.

    Args:
        path: an export directory (``model.onnx``, ``report.json``, maybe ``model.plan``) or a ``.onnx`` /
            ``.plan`` file.
        runtime: "onnxruntime" or "tensorrt" (runs ``model.plan``). Defaults to the file's kind, and to
            onnxruntime for a directory.
        providers: onnxruntime execution providers, e.g. ["cpu"]. Defaults to those of the export's report that
            this onnxruntime build offers, else the best available.
        threads: onnxruntime intra-op threads. Defaults to onnxruntime's choice.
        plugins: deploykit's TensorRT plugin library. Defaults to the report's, else `trt.find_plugin_library`'s.
        precision: which model of an export directory onnxruntime runs: "fp32" (``model.onnx``) or "int8"
            (``model.int8.onnx``, written by ``--quantize int8``). Defaults to "fp32".

    Raises:
        DeployError: a missing or unreadable model, an unknown runtime, or TensorRT asked for but not installed.
    """

    def __init__(self, path: str | os.PathLike, runtime: str | None = None, providers: Sequence[str] | None = None,
                 threads: int | None = None, plugins: str | os.PathLike | None = None,
                 precision: str | None = None) -> None:
        self.runtime, self.path, report = _locate(Path(path), runtime, precision)
        if self.runtime == "onnxruntime":
            self._backend = _OrtBackend(self.path, providers or _report_providers(report), threads)
        else:
            self._backend = _TrtBackend(self.path, _plugin_library(plugins, report))
        self.inputs: list[TensorInfo] = self._backend.inputs
        self.outputs: list[TensorInfo] = self._backend.outputs
        self.providers: list[str] = self._backend.providers  # onnxruntime's execution providers; [] for TensorRT
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
            return dict(zip(names, self._backend.run(arrays)))
        size = _common_batch(arrays)
        smallest, largest = batch
        step = largest or size
        parts = []
        for start in range(0, size, step):
            chunk = {name: array[start:start + step] for name, array in arrays.items()}
            rows = min(step, size - start)
            if rows < smallest:
                chunk = {name: _pad_rows(array, smallest) for name, array in chunk.items()}
            parts.append([output[:rows] for output in self._backend.run(chunk)])
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
            bounds = self._backend.bounds[info.name]
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


class _OrtBackend:
    """One onnxruntime session, shared by every thread."""

    def __init__(self, model_file: Path, providers: Sequence[str] | None, threads: int | None) -> None:
        try:
            data = model_file.read_bytes()
        except OSError as err:
            raise DeployError(f"Cannot read {model_file}: {err.strerror or err}.") from err
        try:
            self._session = session_from_onnx(data, providers, threads)
        except ort.capi.onnxruntime_pybind11_state.InvalidProtobuf as err:
            raise DeployError(f"{model_file} is not an ONNX model (the file is corrupt or truncated).") from err
        self.providers = self._session.get_providers()
        self.inputs = [_ort_info(value) for value in self._session.get_inputs()]
        self.outputs = [_ort_info(value) for value in self._session.get_outputs()]
        self.bounds = {info.name: [(d, d) if isinstance(d, int) else (0, None) for d in info.shape]
                       for info in self.inputs}
        first = {info.shape[0] if info.shape else None for info in (*self.inputs, *self.outputs)}
        static = len(first) == 1 and isinstance(next(iter(first)), int)
        dynamic = all(info.shape and not isinstance(info.shape[0], int) for info in self.inputs)
        # (smallest, largest) batch one run takes; None: dimension 0 is not a batch, nothing is split
        self.batch_range = (next(iter(first)),) * 2 if static else (1, None) if dynamic else None

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return self._session.run(None, feeds)
        except _ORT_ERRORS as err:
            raise DeployError(f"onnxruntime failed to run the model: {str(err).strip().splitlines()[0]}.") from err

    def close(self) -> None:
        """Nothing per thread to release: the session goes with the Predictor."""


class _TrtBackend:
    """One deserialized TensorRT engine; an execution context (a Polygraphy TrtRunner) per calling thread."""

    def __init__(self, engine_file: Path, plugin_library: Path | None) -> None:
        trt.require_tensorrt(f"Running {engine_file}")
        import tensorrt
        from polygraphy.backend.trt import EngineFromBytes, LoadPlugins

        loader = EngineFromBytes(engine_file.read_bytes())
        if plugin_library is not None:
            loader = LoadPlugins(plugins=[str(plugin_library)], obj=loader)
        try:
            with polygraphy_quiet():
                self._engine = loader()
        except Exception as err:  # Polygraphy reports deserialization failures as PolygraphyException
            raise DeployError(f"TensorRT cannot load the engine {engine_file}: "
                              f"{str(err).strip().splitlines()[0]}.") from err
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        is_input = {name: self._engine.get_tensor_mode(name) == tensorrt.TensorIOMode.INPUT for name in names}
        self.providers: list[str] = []
        self.inputs = [self._info(name) for name in names if is_input[name]]
        self.outputs = [self._info(name) for name in names if not is_input[name]]
        profiles = {info.name: self._engine.get_tensor_profile_shape(info.name, 0) for info in self.inputs}
        self.bounds = {name: list(zip(low, high)) for name, (low, _, high) in profiles.items()}
        batches = {(low[0], high[0]) for low, _, high in profiles.values()}
        self.batch_range = batches.pop() if len(batches) == 1 else None
        self._local = threading.local()
        self._runners = []
        self._lock = threading.Lock()

    def _info(self, name: str) -> TensorInfo:
        import tensorrt

        shape = tuple(d if d >= 0 else None for d in self._engine.get_tensor_shape(name))
        return TensorInfo(name, np.dtype(tensorrt.nptype(self._engine.get_tensor_dtype(name))), shape)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        from polygraphy.backend.trt import TrtRunner

        runner = getattr(self._local, "runner", None)
        if runner is None:
            runner = self._local.runner = TrtRunner(self._engine)
            runner.activate()
            with self._lock:
                self._runners.append(runner)
        outputs = runner.infer(feeds)
        return [np.array(outputs[info.name]) for info in self.outputs]  # copies: the runner reuses its buffers

    def close(self) -> None:
        with self._lock:
            for runner in self._runners:
                runner.deactivate()
            self._runners.clear()


def _locate(path: Path, runtime: str | None, precision: str | None = None) -> tuple[str, Path, dict]:
    """The runtime, the model file it runs, and the export's report ({} for a bare file)."""
    if runtime is not None and runtime not in RUNTIMES:
        raise DeployError(f"Unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}.")
    if precision not in PRECISIONS:
        raise DeployError(f"Unknown precision {precision!r}; use one of {', '.join(p for p in PRECISIONS if p)}.")
    if precision == "int8" and (runtime == "tensorrt" or not path.is_dir()):
        raise DeployError("precision='int8' picks the int8 model of an export directory for onnxruntime; pass the "
                          "directory (or the .onnx file itself, without precision).")
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
    if runtime is not None and runtime != kind:
        raise DeployError(f"{path} is {_KINDS[kind]}, which runtime={runtime!r} cannot run; pass the export's "
                          f"{ENGINE_FILE if runtime == 'tensorrt' else MODEL_FILE} instead.")
    return kind, path, {}


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


def _ort_info(value) -> TensorInfo:
    name = value.type.removeprefix("tensor(").removesuffix(")")
    return TensorInfo(value.name, np.dtype(_ORT_TYPE_NAMES.get(name, name)), tuple(value.shape))


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
