"""The export pipeline, top to bottom: checkpoint -> model -> ONNX -> passes -> onnxruntime -> comparison -> files.

`export_model` is the Python API; ``export.py`` only turns command-line arguments into an `ExportConfig`.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deploykit import artifacts
from deploykit.checkpoint import Checkpoint, load_checkpoint
from deploykit.config import ExportConfig
from deploykit.errors import DeployError, VerificationFailed
from deploykit.export.onnx import DEFAULT_OPSET, onnx_from_model
from deploykit.export.passes import run_passes
from deploykit.fileio import ensure_writable_dir
from deploykit.inputs import structured_noise
from deploykit.log import LOGGER, stage
from deploykit.models import MODELS, build_model, model_spec
from deploykit.runtime import trt
from deploykit.runtime.ort import resolve_providers, session_from_onnx
from deploykit.verify import FP16_RTOL, Verification, compare, onnxrt_results, polygraphy_command, torch_results

INPUT_NAME = "input"
OUTPUT_NAME = "output"


@dataclass
class ExportResult:
    """What a run produced: the verdict, the artifact paths and the report written to report.json."""

    passed: bool
    output_dir: Path
    files: dict[str, Path]
    report: dict


def export_model(config: ExportConfig, raise_on_mismatch: bool = False) -> ExportResult:
    """Export, verify and save one model.

    Args:
        config: what to export; see `ExportConfig`.
        raise_on_mismatch: raise `VerificationFailed` (after writing the artifacts) if the deployed model does
            not match PyTorch. Defaults to False: check ``result.passed``.

    Raises:
        DeployError: a problem with the input (bad checkpoint, unknown arch, shape, unwritable directory, ...);
            nothing is written then.
    """
    timings: dict[str, float] = {}
    started = time.perf_counter()
    trt_version, plugin_library = None, None
    if config.engine:  # fail before any slow step when TensorRT or the plugin library is missing
        trt_version = trt.require_tensorrt()
        plugin_library = trt.find_plugin_library(config.plugins)

    if isinstance(config.model, nn.Module):
        checkpoint = Checkpoint(path=Path("<module>"), module=config.model)
    else:
        with stage(f"Loading checkpoint {config.model}", timings, "load_checkpoint"):
            checkpoint = load_checkpoint(config.model, trust_pickle=config.trust_pickle)
    arch = _resolve_arch(checkpoint, config.arch)
    if "note" in checkpoint.metadata:
        LOGGER.info("  loaded the %s", checkpoint.metadata["note"])
    output_dir = ensure_writable_dir(config.output_dir or Path("deploykit-out") / (arch or "model"))

    with stage(f"Building {arch or type(checkpoint.module).__name__}", timings, "build_model"):
        model = checkpoint.module.eval() if checkpoint.module is not None else \
            build_model(arch, checkpoint.arch_kwargs, checkpoint.state_dict)
    providers = resolve_providers(config.providers)  # fail before the slow export if one is unavailable
    input_shape = _resolve_input_shape(config.input_shape, arch)
    dynamic_batch = True if config.dynamic_batch is None else config.dynamic_batch
    feeds = _make_feeds(config, input_shape, dynamic_batch)

    with stage("Running PyTorch", timings, "torch_run"):
        try:
            reference = torch_results(model, feeds, [OUTPUT_NAME])
        except (RuntimeError, ValueError) as err:
            shape = "x".join(map(str, feeds[0][INPUT_NAME].shape))
            raise DeployError(f"{arch or 'The model'} cannot take an input of shape {shape}: "
                              f"{str(err).strip().splitlines()[0].rstrip('.')}.") from err

    opset = config.opset or DEFAULT_OPSET
    batch_kind = "dynamic" if dynamic_batch else "static"
    with stage(f"Exporting ONNX (opset {opset}, {batch_kind} batch)", timings, "export"):
        onnx_model = onnx_from_model(model, torch.from_numpy(feeds[0][INPUT_NAME]), opset=opset,
                                     dynamic_batch=dynamic_batch, input_names=[INPUT_NAME],
                                     output_names=[OUTPUT_NAME], lowering=config.lowering,
                                     verbose=config.verbose)
    with stage("Graph passes (constant folding, shape inference, checks)", timings, "passes"):
        onnx_model, pass_report = run_passes(onnx_model)
    LOGGER.info("  folding: %d -> %d nodes, %d -> %d parameters in initializers", pass_report.before.nodes,
                pass_report.after.nodes, pass_report.before.parameters, pass_report.after.parameters)

    with stage("Running onnxruntime", timings, "onnxruntime"):
        session = session_from_onnx(onnx_model, providers, config.threads)
        candidate = onnxrt_results(session, feeds)
    verification = compare(candidate, reference, rtol=config.rtol, atol=config.atol)

    report = {
        "versions": artifacts.versions(),
        "config": _config_summary(config, arch, input_shape, dynamic_batch, opset),
        "model": {"arch": arch, "checkpoint": str(checkpoint.path),
                  "parameters": sum(p.numel() for p in model.parameters())},
        "export": {"opset": opset, "ir_version": onnx_model.ir_version, "dynamic_batch": dynamic_batch,
                   "custom_nodes": sorted({f"{n.domain}::{n.op_type}" for n in onnx_model.graph.node if n.domain}),
                   "passes": pass_report.as_dict()},
        "runtime": {"name": "onnxruntime", "providers": session.get_providers()},
        "verification": verification.as_dict(),
        "reproduce": polygraphy_command(artifacts.MODEL_FILE, artifacts.INPUTS_FILE,
                                        artifacts.TORCH_OUTPUTS_FILE, verification),
        "timings_s": timings,
    }
    checks = {f"onnxruntime ({session.get_providers()[0]})": verification}
    engine = None
    if config.engine:
        engine, report["tensorrt"], checks["TensorRT"] = _engine_and_check(
            config, onnx_model, feeds, reference, input_shape, dynamic_batch, trt_version, plugin_library, timings)

    with stage(f"Writing artifacts to {output_dir}", timings, "write"):
        timings["total"] = round(time.perf_counter() - started, 4)
        files = artifacts.write_artifacts(output_dir, onnx_model, feeds, reference, report, engine)

    for runtime, check in checks.items():
        worst = check.worst
        LOGGER.info("%s: %s vs PyTorch, worst output %r: max abs err %.3g, rel to range %.3g (rtol %g, atol %.3g)",
                    "PASSED" if check.passed else "FAILED", runtime, worst.name, worst.max_abs, worst.rel_to_range,
                    worst.rtol, worst.atol)
    result = ExportResult(all(check.passed for check in checks.values()), output_dir, files, report)
    if raise_on_mismatch and not result.passed:
        failed = ", ".join(runtime for runtime, check in checks.items() if not check.passed)
        raise VerificationFailed(f"The {failed} outputs differ from PyTorch beyond tolerance; see "
                                 f"{files['report.json']}.")
    return result


def _engine_and_check(config: ExportConfig, onnx_model, feeds, reference, input_shape: tuple[int, ...],
                      dynamic_batch: bool, trt_version: str, plugin_library: Path | None,
                      timings: dict[str, float]) -> tuple[bytes, dict, Verification]:
    """Build the TensorRT engine of the exported model, run it on the verification inputs, compare with PyTorch."""
    custom_nodes = sorted({n.op_type for n in onnx_model.graph.node if n.domain == "deploykit"})
    if custom_nodes and plugin_library is None:
        raise DeployError(f"The model has deploykit::{', deploykit::'.join(custom_nodes)} nodes but no plugin library "
                          f"was found: build plugins/ with CMake (README, 'TensorRT') and pass --plugins or set "
                          f"{trt.PLUGIN_LIBRARY_ENV}.")
    batches = [feed[INPUT_NAME].shape[0] for feed in feeds] + ([config.max_batch] if config.max_batch else [])
    shapes = trt.EngineShapes.for_batches((batches[0], *input_shape[1:]), batches, dynamic_batch)
    precision = "FP16" if config.fp16 else "FP32"
    with stage(f"Building the TensorRT engine ({precision}, batch {shapes.min[0]}-{shapes.max[0]})", timings,
               "trt_build"):
        engine = trt.build_engine(onnx_model.SerializeToString(), INPUT_NAME, shapes, config.fp16, plugin_library)
    with stage("Running TensorRT", timings, "tensorrt"):
        candidate = trt.trt_results(engine, feeds, plugin_library)
    rtol = FP16_RTOL if config.fp16 and config.rtol is None else config.rtol
    verification = compare(candidate, reference, rtol=rtol, atol=config.atol)
    atol = max(check.atol for check in verification.outputs)
    section = {
        "version": trt_version, "fp16": config.fp16,
        "plugin_library": str(plugin_library) if plugin_library else None,
        "profile": {"min": list(shapes.min), "opt": list(shapes.opt), "max": list(shapes.max)},
        "verification": verification.as_dict(),
        "reproduce": trt.polygraphy_trt_command(artifacts.MODEL_FILE, artifacts.INPUTS_FILE,
                                                artifacts.TORCH_OUTPUTS_FILE, INPUT_NAME, shapes, config.fp16,
                                                plugin_library, atol, verification.outputs[0].rtol),
        "trtexec": trt.trtexec_command(artifacts.MODEL_FILE, artifacts.ENGINE_FILE, INPUT_NAME, shapes, config.fp16,
                                       plugin_library),
    }
    return engine, section, verification


def _resolve_arch(checkpoint: Checkpoint, requested: str | None) -> str | None:
    """The architecture to build: --arch, else the checkpoint's, else the file name if it names a zoo model."""
    if requested is not None:
        model_spec(requested)  # unknown names fail here, listing the known ones
        if checkpoint.arch is not None and checkpoint.arch != requested:
            raise DeployError(f"--arch {requested} contradicts the checkpoint, which was saved for {checkpoint.arch}.")
        return requested
    if checkpoint.arch is not None or checkpoint.module is not None:
        return checkpoint.arch
    guess = re.sub(r"-[0-9a-f]{6,}$", "", checkpoint.path.stem)  # official names: scnet50-dc6a7e87.pth
    if guess in MODELS:
        LOGGER.info("  architecture %s taken from the file name (pass --arch to override)", guess)
        return guess
    raise DeployError(f"{checkpoint.path} is a bare state_dict that names no architecture; pass --arch (one of: "
                      f"{', '.join(sorted(MODELS))}).")


def _resolve_input_shape(requested: tuple[int, ...] | None, arch: str | None) -> tuple[int, ...]:
    if requested is not None:
        spec = model_spec(arch) if arch is not None else None
        if spec is not None and spec.fixed_size and tuple(requested[1:]) != spec.input_shape:
            size = "x".join(map(str, spec.input_shape))
            raise DeployError(f"{arch} takes only {size} inputs (its per-pixel weights are learned at that "
                              f"resolution), not {'x'.join(map(str, requested[1:]))}; only the batch may change.")
        return requested
    if arch is None:
        raise DeployError("The model is not a zoo architecture, so its input shape is unknown; pass --input-shape.")
    return (1, *model_spec(arch).input_shape)


def _make_feeds(config: ExportConfig, input_shape: tuple[int, ...], dynamic_batch: bool) -> list[dict[str, np.ndarray]]:
    """Verification inputs: the user's .npz, or seeded random images (`structured_noise`; normal noise for inputs
    that are not image-shaped) at the requested batch and, when the batch is dynamic, at one more batch size, so
    the check also proves that one file serves several batch sizes."""
    if config.inputs is not None:
        return [{INPUT_NAME: _load_npz_input(config.inputs)}]
    generator = torch.Generator().manual_seed(0 if config.seed is None else config.seed)
    batches = [input_shape[0], input_shape[0] + 1] if dynamic_batch else [input_shape[0]]
    if len(input_shape) == 4:
        return [{INPUT_NAME: structured_noise(b, input_shape[1:], generator).numpy()} for b in batches]
    return [{INPUT_NAME: torch.randn((b, *input_shape[1:]), generator=generator).numpy()} for b in batches]


def _load_npz_input(path: Path) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = dict(data)
    except (OSError, ValueError) as err:
        raise DeployError(f"Cannot read inputs from {path}: {err}.") from None
    if INPUT_NAME in arrays:
        array = arrays[INPUT_NAME]
    elif len(arrays) == 1:
        array = next(iter(arrays.values()))
    else:
        raise DeployError(f"{path} holds arrays {', '.join(arrays)}; name the model input {INPUT_NAME!r}.")
    if not np.issubdtype(array.dtype, np.floating):
        raise DeployError(f"The input in {path} has dtype {array.dtype}; a floating-point array is needed.")
    return np.ascontiguousarray(array, dtype=np.float32)


def _config_summary(config: ExportConfig, arch: str | None, input_shape: tuple[int, ...], dynamic_batch: bool,
                    opset: int) -> dict:
    summary = {f.name: getattr(config, f.name) for f in fields(config) if f.name != "model"}
    summary.update(model=str(config.model) if not isinstance(config.model, nn.Module) else type(config.model).__name__,
                   arch=arch, input_shape=list(input_shape), dynamic_batch=dynamic_batch, opset=opset,
                   lowering=config.lowering or "auto",
                   output_dir=str(config.output_dir) if config.output_dir else None,
                   inputs=str(config.inputs) if config.inputs else None)
    return summary
