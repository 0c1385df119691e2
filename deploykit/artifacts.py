"""The files a run leaves in its output directory, all or nothing.

    model.onnx           the deployable model (single file, weights inline)
    inputs.json          the verification inputs, Polygraphy's JSON format (list of feed dicts)
    torch_outputs.json   PyTorch's outputs on them, a Polygraphy RunResults (runner "pytorch")
    report.json          versions, configuration, graph statistics, per-output errors, pass/fail, timings
    model.plan           the TensorRT engine, when one was asked for (``--engine``)

Every file is first written under a temporary name and renamed into place only after all of them were
written, so an error or an interrupt never leaves a half-written or inconsistent set.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
from polygraphy.comparator import RunResults
from polygraphy.json import save_json

from deploykit.errors import DeployError
from deploykit.log import polygraphy_quiet

MODEL_FILE = "model.onnx"
INPUTS_FILE = "inputs.json"
TORCH_OUTPUTS_FILE = "torch_outputs.json"
REPORT_FILE = "report.json"
ENGINE_FILE = "model.plan"

_VERSIONED_PACKAGES = ("torch", "onnx", "onnxscript", "onnx-ir", "onnxruntime", "onnx-graphsurgeon", "polygraphy",
                       "numpy")


def versions() -> dict[str, str]:
    """Versions of deploykit, Python and every package that shapes the exported file or its check."""
    from deploykit import __version__

    found = {"deploykit": __version__, "python": platform.python_version()}
    for package in _VERSIONED_PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def write_artifacts(output_dir: Path, model: onnx.ModelProto, feeds: Sequence[dict[str, np.ndarray]],
                    torch_outputs: RunResults, report: dict, engine: bytes | None = None) -> dict[str, Path]:
    """Write the artifacts into `output_dir` atomically as a set; return their final paths."""
    writers: dict[str, Callable[[Path], None]] = {
        MODEL_FILE: lambda path: onnx.save_model(model, path),
        INPUTS_FILE: lambda path: save_json(list(feeds), str(path)),
        TORCH_OUTPUTS_FILE: lambda path: torch_outputs.save(str(path)),
        REPORT_FILE: lambda path: path.write_text(json.dumps(report, indent=2, default=_json_default) + "\n"),
    }
    if engine is not None:
        writers[ENGINE_FILE] = lambda path: path.write_bytes(engine)
    staged: dict[Path, Path] = {}
    try:
        with polygraphy_quiet():
            for name, write in writers.items():
                final = output_dir / name
                temporary = output_dir / f".{name}.{os.getpid()}.partial"
                staged[temporary] = final
                write(temporary)
        for temporary, final in staged.items():
            os.replace(temporary, final)
    except OSError as err:
        raise DeployError(f"Cannot write the artifacts to {output_dir}: {err.strerror or err}.") from err
    finally:
        for temporary in staged:
            temporary.unlink(missing_ok=True)
    return {name: output_dir / name for name in writers}


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
