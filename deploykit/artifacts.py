"""The files a run leaves in its output directory, all or nothing.

    model.onnx           the deployable model (single file, weights inline)
    inputs.json          the verification inputs, Polygraphy's JSON format (list of feed dicts)
    torch_outputs.json   PyTorch's outputs on them, a Polygraphy RunResults (runner "pytorch")
    report.json          versions, configuration, graph statistics, per-output errors, pass/fail, timings
    model.plan           the TensorRT engine, when one was asked for (``--engine``)
    model.int8.onnx      the int8 (QDQ) model, when one was asked for (``--quantize int8``)

Every file is first written under a temporary name and renamed into place only after all of them were
written, so an error or an interrupt never leaves a half-written or inconsistent set. Only files that the previous
run wrote there (listed with their SHA-256 in its report.json, and unchanged since) are ever replaced or removed;
a directory holding other files of these names is refused (`check_output_dir`) unless the user opts in
(``--overwrite``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
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
from deploykit.fileio import LOCK_FILE, check_writable_dir, output_directory, partial_name
from deploykit.log import polygraphy_quiet

MODEL_FILE = "model.onnx"
INPUTS_FILE = "inputs.json"
TORCH_OUTPUTS_FILE = "torch_outputs.json"
REPORT_FILE = "report.json"
ENGINE_FILE = "model.plan"
INT8_MODEL_FILE = "model.int8.onnx"
ARTIFACT_FILES = (MODEL_FILE, INPUTS_FILE, TORCH_OUTPUTS_FILE, REPORT_FILE, ENGINE_FILE, INT8_MODEL_FILE)

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


def check_output_dir(directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """Prove before any slow step that the artifacts can be written to `directory` without touching a file that
    deploykit did not write there (`foreign_files`); with `overwrite`, such files may be replaced."""
    directory = check_writable_dir(directory)
    _refuse_foreign_files(directory, overwrite)
    return directory


def foreign_files(directory: Path) -> list[str]:
    """The files in `directory` that bear an artifact's name but are not the last run's artifacts: not listed with
    their SHA-256 in its report.json, changed since, or not regular files (a user's file, or a symbolic link); and
    a ``.deploykit.lock`` that is not an empty file."""
    present = [name for name in ARTIFACT_FILES if (directory / name).exists() or (directory / name).is_symlink()]
    owned = _last_run_files(directory) if present else set()
    foreign = [name for name in present if name not in owned]
    lock = directory / LOCK_FILE  # deploykit's lock file is empty (a killed run may leave it); the write removes it
    if lock.is_symlink() or lock.exists() and not (lock.is_file() and lock.stat().st_size == 0):
        foreign.append(LOCK_FILE)
    return foreign


def _last_run_files(directory: Path) -> set[str]:
    """The names of the files the last run wrote to `directory` that are still as it wrote them."""
    report_path = directory / REPORT_FILE
    if report_path.is_symlink() or not report_path.is_file():
        return set()
    try:
        listed = json.loads(report_path.read_text()).get("artifacts")
    except (OSError, ValueError, AttributeError):  # unreadable, not JSON, not a JSON object: not deploykit's
        return set()
    if not isinstance(listed, dict):
        return set()
    owned = {REPORT_FILE}
    for name, entry in listed.items():
        path = directory / str(name)
        if name in ARTIFACT_FILES and isinstance(entry, dict) and path.is_file() and not path.is_symlink() \
                and _digest(path) == {"bytes": entry.get("bytes"), "sha256": entry.get("sha256")}:
            owned.add(name)
    return owned


def _refuse_foreign_files(directory: Path, overwrite: bool) -> None:
    foreign = [] if overwrite else foreign_files(directory)
    if foreign:
        them = "them" if len(foreign) > 1 else "it"
        raise DeployError(f"Output directory {directory} already holds {', '.join(foreign)}, which the last deploykit "
                          f"run there did not write (or which changed since); move {them} away, choose another "
                          f"--output-dir, or pass --overwrite to replace {them}.")


def write_artifacts(output_dir: Path, model: onnx.ModelProto, feeds: Sequence[dict[str, np.ndarray]],
                    torch_outputs: RunResults, report: dict, engine: bytes | None = None,
                    int8_model: onnx.ModelProto | None = None, overwrite: bool = False) -> dict[str, Path]:
    """Write the artifacts into `output_dir` atomically as a set; return their final paths.

    `output_dir` is created here (not before): if anything fails or the run is interrupted, the previous set (if
    any) is left as it was, no temporary file stays behind, and a directory this call created is removed again.
    The write holds the directory's lock (`deploykit.fileio.output_directory`), so two runs writing the same
    directory end with one complete set, never a mix. The report records each file's size and SHA-256
    (``artifacts``), which proves which model.onnx etc. it belongs to. A ``model.plan`` (``model.int8.onnx``) of a
    previous run is removed when this run has no engine (int8 model). Files of these names that the previous run did
    not write are refused (checked again under the lock), or replaced with `overwrite`."""
    writers: dict[str, Callable[[Path], None]] = {
        MODEL_FILE: lambda path: onnx.save_model(model, path),
        INPUTS_FILE: lambda path: save_json(list(feeds), str(path)),
        TORCH_OUTPUTS_FILE: lambda path: torch_outputs.save(str(path)),
    }
    if engine is not None:
        writers[ENGINE_FILE] = lambda path: path.write_bytes(engine)
    if int8_model is not None:
        writers[INT8_MODEL_FILE] = lambda path: onnx.save_model(int8_model, path)
    writers[REPORT_FILE] = lambda path: path.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    with output_directory(output_dir):
        _refuse_foreign_files(output_dir, overwrite)
        stale = [name for name, made in ((ENGINE_FILE, engine), (INT8_MODEL_FILE, int8_model)) if made is None]
        _commit(output_dir, writers, report, stale=stale)
    return {name: output_dir / name for name in writers}


def _commit(output_dir: Path, writers: dict[str, Callable[[Path], None]], report: dict, stale: list[str]) -> None:
    """Stage every file under a temporary name, then rename them into place (report.json last); on any failure,
    an interrupt included, put the previous files back and remove every temporary."""
    staged: dict[str, Path] = {}
    previous: dict[Path, Path] = {}  # final path -> its previous version, kept aside until the set is complete
    placed: list[Path] = []
    done = False
    try:
        with polygraphy_quiet():
            for name, write in writers.items():
                if name == REPORT_FILE:
                    report["artifacts"] = {n: _digest(path) for n, path in staged.items()}
                staged[name] = output_dir / partial_name(name)
                write(staged[name])
        for name in (*stale, *staged):
            final = output_dir / name
            if final.exists() or final.is_symlink():
                previous[final] = output_dir / partial_name(name + ".previous")
                os.replace(final, previous[final])
            if name in staged:
                os.replace(staged[name], final)
                placed.append(final)
        done = True
    except BaseException as err:
        if not done:
            for final in placed:
                final.unlink(missing_ok=True)
            for final, old in previous.items():
                with contextlib.suppress(OSError):
                    os.replace(old, final)
        if isinstance(err, OSError):
            hint = " (free some space or choose another --output-dir)" if err.errno == errno.ENOSPC else ""
            raise DeployError(f"Cannot write the artifacts to {output_dir}: {err.strerror or err}{hint}.") from err
        raise
    finally:
        for path in (*staged.values(), *previous.values()):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)


def _digest(path: Path) -> dict:
    sha256 = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha256.update(block)
    return {"bytes": path.stat().st_size, "sha256": sha256.hexdigest()}


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
