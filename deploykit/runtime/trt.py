"""TensorRT engines for exported models, built and run through Polygraphy's TensorRT backend.

``tensorrt`` is imported only when an engine is built, so deploykit installs and runs without it; asking for an
engine without it fails with one sentence (`require_tensorrt`). The ``deploykit::`` nodes of an exported model run
as deploykit's plugins (``plugins/``, built into ``libdeploykit_plugins.so``): the nodes carry
``plugin_namespace="deploykit"``, so TensorRT >= 10.7 takes the registered plugin instead of the node's ONNX
function body. The library registers its creators when it is loaded (Polygraphy ``--plugins``, trtexec
``--staticPlugins``, ``LD_PRELOAD``).
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from polygraphy.comparator import Comparator, RunResults

from deploykit.errors import DeployError
from deploykit.fileio import missing_reason
from deploykit.log import polygraphy_quiet
from deploykit.runtime.base import TensorInfo
from deploykit.runtime.kernels import PLUGINS_DIR

TRT_RUNNER = "tensorrt"
MIN_TENSORRT = (10, 7)
PLUGIN_LIBRARY_ENV = "DEPLOYKIT_PLUGINS"
DEFAULT_PLUGIN_LIBRARY = PLUGINS_DIR / "build" / "libdeploykit_plugins.so"


def require_tensorrt(purpose: str = "Building a TensorRT engine") -> str:
    """TensorRT's version, or a DeployError saying in one sentence what is missing for `purpose`."""
    if importlib.util.find_spec("tensorrt") is None:
        raise DeployError(f"{purpose} needs TensorRT, which is not installed here: install TensorRT "
                          f"{MIN_TENSORRT[0]}.{MIN_TENSORRT[1]} or newer (the `tensorrt` Python package) on a machine "
                          "with an NVIDIA GPU.")
    try:
        import tensorrt
    except (ImportError, OSError) as err:
        raise DeployError(f"TensorRT is installed but does not load: {str(err).strip().splitlines()[0]}.") from err
    version = tuple(int(part) for part in tensorrt.__version__.split(".")[:2])
    if version < MIN_TENSORRT:
        raise DeployError(f"TensorRT {tensorrt.__version__} is too old: deploykit's plugins need "
                          f"{MIN_TENSORRT[0]}.{MIN_TENSORRT[1]} or newer (IPluginV3, plugin_namespace precedence).")
    return tensorrt.__version__


def find_plugin_library(requested: str | os.PathLike | None = None) -> Path | None:
    """The plugin library to load: `requested`, else $DEPLOYKIT_PLUGINS, else plugins/build/ of a source checkout
    (where ``cmake -S plugins -B plugins/build && cmake --build plugins/build`` puts it); None if none exists."""
    for candidate, origin in ((requested, "--plugins"), (os.environ.get(PLUGIN_LIBRARY_ENV), PLUGIN_LIBRARY_ENV)):
        if candidate:
            path = Path(candidate)
            if not path.is_file():
                raise DeployError(f"The plugin library {path} (from {origin}) {missing_reason(path)}.")
            return path.resolve()
    return DEFAULT_PLUGIN_LIBRARY if DEFAULT_PLUGIN_LIBRARY.is_file() else None


@dataclass(frozen=True)
class EngineShapes:
    """The optimisation profile of the model's one input: the smallest, the tuned-for and the largest shape."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    @classmethod
    def spanning(cls, shapes: Sequence[Sequence[int]], dynamic_batch: bool, min_spatial: int | None = None,
                 min_shape: Sequence[int] | None = None, max_shape: Sequence[int] | None = None) -> EngineShapes:
        """A profile tuned for the first of `shapes` (the verification inputs) that takes all of them: from batch 1
        (and, with a dynamic spatial size, from `min_spatial` x `min_spatial`) up to the largest of each dimension;
        exactly the first shape when the batch is static. `min_shape`/`max_shape` widen it (--min-shape,
        --max-shape); a dimension the file fixes must keep its size."""
        opt = tuple(shapes[0])
        if not dynamic_batch:
            return cls(opt, opt, opt)
        dynamic = {0} | ({2, 3} if min_spatial is not None else set())
        low = tuple(1 if d == 0 else min_spatial if d in dynamic else size for d, size in enumerate(opt))
        high = tuple(max(shape[d] for shape in shapes) for d in range(len(opt)))
        for given, name in ((min_shape, "--min-shape"), (max_shape, "--max-shape")):
            if given is None:
                continue
            given = tuple(given)
            fixed = [d for d in range(len(opt)) if d not in dynamic and (len(given) != len(opt) or given[d] != opt[d])]
            if len(given) != len(opt) or fixed:
                raise DeployError(f"{name} {'x'.join(map(str, given))} must have the input's rank {len(opt)} and "
                                  f"keep its fixed dimensions ({'x'.join(map(str, opt))} with "
                                  f"{'batch, height and width' if min_spatial else 'only the batch'} free).")
        low, high = tuple(min_shape or low), tuple(max_shape or high)
        smallest = low if min_spatial is None else (1, opt[1], min_spatial, min_spatial)
        if any(lo < floor for lo, floor in zip(low, smallest)) or any(lo > hi for lo, hi in zip(low, high)) or \
                any(not lo <= s <= hi for shape in shapes for lo, s, hi in zip(low, shape, high)):
            raise DeployError(f"The TensorRT profile {'x'.join(map(str, low))} to {'x'.join(map(str, high))} must "
                              f"contain every verification shape and start at {'x'.join(map(str, smallest))} or "
                              f"above.")
        return cls(low, opt, high)


def build_engine(model: bytes, input_name: str, shapes: EngineShapes, fp16: bool = False,
                 plugin_library: Path | None = None) -> bytes:
    """Parse the serialized ONNX model, load the plugin library, and build a serialized engine for `shapes`."""
    require_tensorrt()
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, LoadPlugins, NetworkFromOnnxBytes, Profile

    network = NetworkFromOnnxBytes(model)
    if plugin_library is not None:
        network = LoadPlugins(plugins=[str(plugin_library)], obj=network)
    profile = Profile().add(input_name, min=shapes.min, opt=shapes.opt, max=shapes.max)
    config = CreateConfig(fp16=fp16, profiles=[profile])
    try:
        with polygraphy_quiet():
            return bytes(EngineBytesFromNetwork(network, config=config)())
    except Exception as err:  # Polygraphy reports parser and builder failures as PolygraphyException
        raise DeployError(f"TensorRT could not build the engine: {str(err).strip().splitlines()[0]}.") from err


def trt_results(engine: bytes, feeds: Sequence[dict[str, np.ndarray]],
                plugin_library: Path | None = None) -> RunResults:
    """Run a serialized engine through Polygraphy's TrtRunner on each feed."""
    from polygraphy.backend.trt import EngineFromBytes, LoadPlugins, TrtRunner

    loader = EngineFromBytes(engine)
    if plugin_library is not None:
        loader = LoadPlugins(plugins=[str(plugin_library)], obj=loader)
    with polygraphy_quiet():
        return Comparator.run([TrtRunner(loader, name=TRT_RUNNER)], data_loader=list(feeds))


def _shape(shape: Sequence[int], separator: str) -> str:
    return separator.join(str(d) for d in shape)


def polygraphy_trt_command(model: str, inputs: str, outputs: str, input_name: str, shapes: EngineShapes, fp16: bool,
                           plugin_library: Path | None, atol: float, rtol: float) -> str:
    """The ``polygraphy run`` line that rebuilds the engine and replays its comparison with PyTorch."""
    parts = ["polygraphy run", shlex.quote(model), "--trt"]
    parts += ["--fp16"] if fp16 else []
    parts += ["--plugins", shlex.quote(str(plugin_library))] if plugin_library else []
    parts += [f"--trt-min-shapes {input_name}:[{_shape(shapes.min, ',')}]",
              f"--trt-opt-shapes {input_name}:[{_shape(shapes.opt, ',')}]",
              f"--trt-max-shapes {input_name}:[{_shape(shapes.max, ',')}]",
              f"--load-inputs {shlex.quote(inputs)} --load-outputs {shlex.quote(outputs)}",
              f"--atol {atol:.6g} --rtol {rtol:g}"]
    return " ".join(parts)


def trtexec_command(model: str, engine: str, input_name: str, shapes: EngineShapes, fp16: bool,
                    plugin_library: Path | None) -> str:
    """The trtexec line that builds the same engine."""
    parts = ["trtexec", f"--onnx={shlex.quote(model)}"]
    parts += [f"--staticPlugins={shlex.quote(str(plugin_library))}"] if plugin_library else []
    parts += [f"--minShapes={input_name}:{_shape(shapes.min, 'x')}", f"--optShapes={input_name}:{_shape(shapes.opt, 'x')}",
              f"--maxShapes={input_name}:{_shape(shapes.max, 'x')}"]
    parts += ["--fp16"] if fp16 else []
    parts += [f"--saveEngine={shlex.quote(engine)}"]
    return " ".join(parts)


class TensorRtRunner:
    """A deserialized TensorRT engine (file or bytes) behind deploykit's runtime interface
    (`deploykit.runtime.base`); an execution context (a Polygraphy TrtRunner) per calling thread, since a context
    is not thread-safe (the engine is shared)."""

    name = TRT_RUNNER
    OPTIONS = ("plugins",)

    def __init__(self, engine: bytes | str | os.PathLike, plugins: str | os.PathLike | None = None) -> None:
        what = "the engine" if isinstance(engine, bytes) else str(engine)
        require_tensorrt(f"Running {what}")
        import tensorrt
        from polygraphy.backend.trt import EngineFromBytes, LoadPlugins

        data = engine if isinstance(engine, bytes) else Path(engine).read_bytes()
        loader = EngineFromBytes(data)
        self.plugins = Path(plugins) if plugins is not None else None
        if plugins is not None:
            loader = LoadPlugins(plugins=[str(plugins)], obj=loader)
        try:
            with polygraphy_quiet():
                self._engine = loader()
        except Exception as err:  # Polygraphy reports deserialization failures as PolygraphyException
            raise DeployError(f"TensorRT cannot load {what}: {str(err).strip().splitlines()[0]}.") from err
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
        self._contexts = []
        self._lock = threading.Lock()

    def _info(self, name: str) -> TensorInfo:
        import tensorrt

        shape = tuple(d if d >= 0 else None for d in self._engine.get_tensor_shape(name))
        return TensorInfo(name, np.dtype(tensorrt.nptype(self._engine.get_tensor_dtype(name))), shape)

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        from polygraphy.backend.trt import TrtRunner

        context = getattr(self._local, "context", None)
        if context is None:
            context = self._local.context = TrtRunner(self._engine)
            context.activate()
            with self._lock:
                self._contexts.append(context)
        outputs = context.infer(dict(feed))
        return {info.name: np.array(outputs[info.name]) for info in self.outputs}  # copies: buffers are reused

    def describe(self) -> dict:
        import tensorrt

        return {"runtime": self.name, "version": tensorrt.__version__,
                "plugins": str(self.plugins) if self.plugins else None}

    def close(self) -> None:
        with self._lock:
            for context in self._contexts:
                context.deactivate()
            self._contexts.clear()
