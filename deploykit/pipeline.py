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
from deploykit.checkpoint import Checkpoint, check_weights, load_checkpoint, weights_hint
from deploykit.config import ExportConfig
from deploykit.conversion import Conversion, convert
from deploykit.errors import DeployError, VerificationFailed, first_line
from deploykit.export.onnx import DEFAULT_OPSET, check_exported_dims, onnx_from_model
from deploykit.export.passes import run_passes
from deploykit.fileio import missing_reason
from deploykit.images import IMAGENET, image_batches, image_files, load_images
from deploykit.inputs import batch_sizes, checked_input, structured_noise
from deploykit.localize import first_divergence
from deploykit.log import LOGGER, progress, stage
from deploykit.models import MODELS, arch_from_file_name, build_model, check_dynamic_spatial, model_spec
from deploykit.nn import OffsetInputDeformConv2d
from deploykit.quantize import log_int8_verdict, quantize_and_check, verify_int8
from deploykit.runtime import trt
from deploykit.runtime.base import load_runner, require_runtime
from deploykit.runtime.ort import resolve_providers
from deploykit.serving.triton import check_triton_target, write_triton_repository
from deploykit.signature import flatten_outputs, input_names, output_template, resolve_output_names
from deploykit.user_code import build_user_model, factory_name, is_factory
from deploykit.verify import (FAILED, FP16_RTOL, INSTABILITY_FACTOR, PASSED, TorchReference, Verification,
                              check_absolute_tolerance, combined_verdict, compare, polygraphy_command, runner_results,
                              torch_reference)

CALIBRATION_BATCH = 8


@dataclass
class ExportResult:
    """What a run produced: the verdict, the artifact paths and the report written to report.json.

    `verdict` is "passed", "failed" or "inconclusive" (every input was unstable for the network in float32; see
    `deploykit.verify`), the worst over the onnxruntime and TensorRT checks."""

    verdict: str
    output_dir: Path
    files: dict[str, Path]
    report: dict

    @property
    def passed(self) -> bool:
        return self.verdict == PASSED


def export_model(config: ExportConfig, raise_on_mismatch: bool = False) -> ExportResult:
    """Export, verify and save one model.

    Args:
        config: what to export; see `ExportConfig`.
        raise_on_mismatch: raise `VerificationFailed` (after writing the artifacts) if the verdict is "failed".
            Defaults to False: check ``result.verdict``.

    Raises:
        DeployError: a problem with the input (bad checkpoint, unknown arch, shape, unwritable directory, ...);
            nothing is written then.
    """
    with progress(config.progress, config.verbose):
        return _export(config, raise_on_mismatch)


def _export(config: ExportConfig, raise_on_mismatch: bool) -> ExportResult:
    timings: dict[str, float] = {}
    started = time.perf_counter()
    trt_version, plugin_library = None, None
    for runtime in _other_runtimes(config):  # fail before any slow step when a runtime is not installed
        require_runtime(runtime)
    if config.engine:  # fail before any slow step when TensorRT or the plugin library is missing
        trt_version = trt.require_tensorrt()
        plugin_library = trt.find_plugin_library(config.plugins)
    missing = [str(path) for path in config.calibration or () if not Path(path).exists()]
    if missing:  # before the fp32 export and its check, not after them
        raise DeployError(f"--calibration {', '.join(missing)}: no such file or directory.")

    checkpoint = _load(config, timings)
    factory = config.arch if is_factory(config.arch) else None
    arch = None if factory else _resolve_arch(checkpoint, config.arch)
    name = _model_name(config, arch, checkpoint)
    if checkpoint is not None and "note" in checkpoint.metadata:
        LOGGER.info("  loaded the %s", checkpoint.metadata["note"])
    if checkpoint is not None and "cast" in checkpoint.metadata:
        LOGGER.info("  %s", checkpoint.metadata["cast"])
    if config.triton_repo is not None:  # a bad name or an unwritable repository fails before the slow steps
        check_triton_target(config.triton_repo, _triton_name(config, name), **_triton_options(config))

    if config.out_indices is not None and (arch is None or not model_spec(arch).feature_levels):
        backbones = ", ".join(sorted(n for n, spec in MODELS.items() if spec.feature_levels))
        raise DeployError(f"--out-indices selects the stages a zoo detection backbone ({backbones}) returns; "
                          f"{name} is not one, so return the feature maps from its own forward instead.")
    # A size the model cannot take fails before the build.
    input_shapes = _resolve_input_shapes(config.input_shape, arch)
    if config.engine and len(input_shapes) > 1:
        raise DeployError("--engine builds TensorRT engines of one-input models only; this model takes "
                          f"{len(input_shapes)} inputs, so verify it in onnxruntime (drop --engine).")
    with stage(f"Building {name}", timings, "build_model"):
        original = _build(config, arch, checkpoint)
    check_weights(original, checkpoint)
    conversion = _convert(original) if arch is None else None  # zoo models are deploykit's own modules
    model = conversion.model if conversion is not None else original
    providers = resolve_providers(config.providers)  # fail before the slow export if one is unavailable
    dynamic_batch = True if config.dynamic_batch is None else config.dynamic_batch
    opset = config.opset or DEFAULT_OPSET
    min_spatial = _spatial_floor(config, arch, model, input_shapes[0], opset) if config.dynamic_spatial else None
    shapes = _verification_shapes(input_shapes, dynamic_batch, min_spatial, arch is not None)
    names = input_names(original, len(input_shapes))
    feeds = _make_feeds(config, arch, names, shapes)
    sources = _input_sources(config, feeds, shapes)
    # Checked now, created only when the artifacts are written: a run that fails before leaves no directory.
    output_dir = artifacts.check_output_dir(config.output_dir or Path("deploykit-out") / name, config.overwrite)

    with stage("Running PyTorch (float32, and float64 as the reference)", timings, "torch_run"):
        reference_model, reference_note = _reference_model(original, model, feeds[0], conversion)
        outputs = _output_signature(reference_model, feeds[0], name, config.output_names, names)
        reference = _torch_reference(reference_model, feeds, outputs.names, name)
    check_absolute_tolerance(config.atol, reference)

    dims = "dynamic batch and size" if min_spatial else "dynamic batch" if dynamic_batch else "static batch"
    with stage(f"Exporting ONNX (opset {opset}, {dims})", timings, "export"):
        onnx_model = onnx_from_model(model, tuple(torch.from_numpy(a) for a in feeds[0].values()), opset=opset,
                                     dynamic_batch=dynamic_batch, dynamic_spatial=config.dynamic_spatial,
                                     min_spatial=min_spatial, input_names=names, output_names=outputs.names,
                                     lowering=config.lowering, verbose=config.verbose)
    check_exported_dims(onnx_model, model, feeds[0], dynamic_batch, config.dynamic_spatial)
    with stage("Graph passes (constant folding, shape inference, checks)", timings, "passes"):
        onnx_model, pass_report = run_passes(onnx_model)
    LOGGER.info("  folding: %d -> %d nodes, %d -> %d parameters in initializers", pass_report.before.nodes,
                pass_report.after.nodes, pass_report.before.parameters, pass_report.after.parameters)

    if reference.fallback_reason:
        LOGGER.info("  float32 reference only: %s", reference.fallback_reason)
    with stage("Running onnxruntime", timings, "onnxruntime"):
        runner = load_runner("onnxruntime", onnx_model, providers=providers, threads=config.threads)
        candidate = runner_results(runner, feeds)
    verification = compare(candidate, reference, rtol=config.rtol, atol=config.atol)
    if verification.verdict == FAILED:
        with stage("Localising the first divergence", timings, "localize"):
            _localize(verification, reference_model, onnx_model, feeds, reference, providers, config.threads)

    report = {
        "versions": artifacts.versions(),
        "config": _config_summary(config, arch, input_shapes, dynamic_batch, opset, output_dir),
        "model": {"arch": arch, "name": name, "factory": factory,
                  "class": f"{type(model).__module__}.{type(model).__qualname__}",
                  "checkpoint": str(checkpoint.path) if checkpoint is not None else None,
                  "parameters": sum(p.numel() for p in model.parameters())},
        "export": {"opset": opset, "ir_version": onnx_model.ir_version, "dynamic_batch": dynamic_batch,
                   "inputs": names, "outputs": outputs.names, "output_structure": outputs.template,
                   "dynamic_spatial": {"min_size": min_spatial,
                                       "verified_shapes": [_shapes_summary([a.shape for a in f.values()])
                                                           for f in feeds]}
                   if min_spatial else None,
                   "custom_nodes": sorted({f"{n.domain}::{n.op_type}" for n in onnx_model.graph.node if n.domain}),
                   "passes": pass_report.as_dict()},
        "runtime": {"name": "onnxruntime", "providers": runner.providers, "version": runner.describe()["version"]},
        "conversion": {**conversion.as_dict(), "reference": "converted" if reference_note else "original",
                       "reference_note": reference_note} if conversion is not None else None,
        "verification": verification.as_dict(),
        "input_sources": sources,
        "reproduce": polygraphy_command(artifacts.MODEL_FILE, artifacts.INPUTS_FILE,
                                        artifacts.TORCH_OUTPUTS_FILE, verification),
        "verdict": verification.verdict,
        "timings_s": timings,
    }
    checks = {f"onnxruntime ({runner.providers[0]})": verification}
    for runtime in _other_runtimes(config):
        report[runtime], checks[runtime] = _runtime_check(runtime, onnx_model, feeds, reference, config, timings)
    engine = None
    if config.engine:
        engine, report["tensorrt"], checks["TensorRT"] = _engine_and_check(
            config, onnx_model, feeds, reference, dynamic_batch, min_spatial, trt_version, plugin_library, timings)
    verdicts = [check.verdict for check in checks.values()]
    int8_model = None
    if config.quantize:
        with stage("Quantizing to int8 and checking it on the verification inputs", timings, "quantize"):
            int8_model, report["quantization"] = quantize_and_check(
                onnx_model, reference_model, _calibration_feeds(config, arch, names, input_shapes), feeds,
                config.keep_float or (), [str(p) for p in config.calibration], providers, config.threads)
        verdicts.append(report["quantization"]["verification"]["verdict"])
        for runtime in _other_runtimes(config):
            report["quantization"][runtime] = _int8_runtime_check(runtime, int8_model, feeds, reference, config)
            verdicts.append(report["quantization"][runtime].get("verdict", PASSED))
    verdict = combined_verdict(verdicts)
    report["verdict"] = verdict
    for runtime, check in checks.items():
        _log_verdict(runtime, check, sources if config.inputs or config.images else None)
    if int8_model is not None:
        log_int8_verdict(report["quantization"])
    if config.triton_repo is not None:
        served = int8_model if config.triton_precision == "int8" else onnx_model
        report["triton"] = _triton_repository(config, name, verdict, served, dynamic_batch,
                                              dict(zip(names, input_shapes)), engine, report.get("tensorrt"),
                                              plugin_library)

    with stage(f"Writing artifacts to {output_dir}", timings, "write"):
        timings["total"] = round(time.perf_counter() - started, 4)
        files = artifacts.write_artifacts(output_dir, onnx_model, feeds, reference.saved_results(), report, engine,
                                          int8_model, overwrite=config.overwrite)
    result = ExportResult(verdict, output_dir, files, report)
    if raise_on_mismatch and verdict == FAILED:
        failed = ", ".join(runtime for runtime, check in checks.items() if check.verdict == FAILED)
        raise VerificationFailed(f"The {failed} outputs differ from PyTorch beyond tolerance; see "
                                 f"{files['report.json']}.")
    return result


def _triton_name(config: ExportConfig, name: str) -> str:
    return config.triton_name or name


def _triton_options(config: ExportConfig) -> dict:
    return {"max_batch": config.max_batch or 8, "instance_kind": config.triton_instance or "cpu",
            "threads": config.threads}


def _triton_repository(config: ExportConfig, model_name: str, verdict: str, onnx_model, dynamic_batch: bool,
                       input_shapes: dict[str, tuple[int, ...]], engine: bytes | None, tensorrt: dict | None,
                       plugin_library: Path | None) -> dict:
    """Hand the verified model to Triton; a failed or inconclusive check writes no repository unless forced.
    Returns the report's ``triton`` section."""
    name = _triton_name(config, model_name)
    section = {"repository": str(config.triton_repo), "name": name, "written": False}
    if verdict != PASSED and not config.force:
        LOGGER.info("Triton repository not written: the verification %s (pass --force to write it anyway)",
                    "failed" if verdict == FAILED else "was inconclusive")
        return section
    with stage(f"Writing the Triton model repository {config.triton_repo} (model {name!r})"):
        openvino_ir = None
        if "openvino" in (config.runtimes or ()):  # Triton's OpenVINO backend reads IR, deploykit's ops converted
            from deploykit.runtime.openvino import ir_bytes

            openvino_ir = ir_bytes(onnx_model)
        write_triton_repository(config.triton_repo, name, onnx_model, dynamic_batch=dynamic_batch, engine=engine,
                                engine_profile=tensorrt["profile"] if engine is not None else None,
                                plugin_library=plugin_library if engine is not None else None,
                                example_shapes=input_shapes, openvino_ir=openvino_ir, **_triton_options(config))
    LOGGER.info("  serve it: see %s", Path(config.triton_repo) / "README.md")
    models = [name, *([f"{name}_trt"] if engine is not None else []),
              *([f"{name}_openvino"] if openvino_ir is not None else [])]
    return {**section, "written": True, "models": models, "forced": verdict != PASSED}


def _other_runtimes(config: ExportConfig) -> list[str]:
    """The runtimes verified besides onnxruntime (always verified: the replay line and the first-divergence search
    run there) and TensorRT (`--engine` builds and checks its engine)."""
    return [runtime for runtime in config.runtimes or () if runtime not in ("onnxruntime", "tensorrt")]


def _runtime_check(runtime: str, onnx_model, feeds, reference: TorchReference, config: ExportConfig,
                   timings: dict[str, float]) -> tuple[dict, Verification]:
    """Run the same file in another runtime and judge it by the same rule; returns its report section."""
    with stage(f"Running {runtime}", timings, runtime):
        runner = load_runner(runtime, onnx_model, threads=config.threads, hint="LATENCY")
        try:
            verification = compare(runner_results(runner, feeds), reference, rtol=config.rtol, atol=config.atol)
            described = runner.describe()
        finally:
            runner.close()
    section = {"runtime": described, "verification": verification.as_dict(),
               "replay_note": f"polygraphy has no {runtime} runner: replay with deploykit.runtime.Predictor(dir, "
                              f"runtime={runtime!r}) on inputs.json against torch_outputs.json"}
    return section, verification


def _int8_runtime_check(runtime: str, int8_model, feeds, reference: TorchReference, config: ExportConfig) -> dict:
    """The int8 file in another runtime, judged like onnxruntime's (`deploykit.quantize.verify_int8`); a file that
    runtime cannot read (e.g. an op it has no conversion for) is reported as not run, with the reason, and does not
    change the verdict: the fp32 file was verified there."""
    try:
        runner = load_runner(runtime, int8_model, threads=config.threads, hint="LATENCY")
    except DeployError as err:
        ops = sorted({f"{n.domain}::{n.op_type}" for n in int8_model.graph.node if n.domain})
        note = f"{str(err).rstrip('.')} (the int8 file's custom ops: {', '.join(ops) or 'none'})"
        LOGGER.info("  int8 in %s not run: %s", runtime, note)
        return {"run": False, "note": note}
    try:
        verification = verify_int8([runner.run(feed) for feed in feeds], reference.float32)
    finally:
        runner.close()
    LOGGER.info("%s", verification.describe().replace("int8 onnxruntime", f"int8 {runtime}"))
    return {"run": True, **verification.as_dict()}


def _log_verdict(runtime: str, check: Verification, sources: list[list[str]] | None) -> None:
    """One line per check: the verdict, the worst sample (and the user's file it came from) against its bound, and
    why when inconclusive."""
    worst = check.worst
    pytorch = f", PyTorch float32 {worst.e_ref:.2g}" if worst.e_ref is not None else ""
    counts = ", ".join(f"{n} {status}" for status, n in check.counts.items() if n)
    source = f" ({sources[worst.iteration][worst.sample]})" if sources else ""
    LOGGER.info("%s: %s vs PyTorch %s, %s samples; worst: output %r sample %d of batch %d%s at %.2g of its range "
                "(bound %.2g%s)", check.verdict.upper(), runtime, check.reference, counts, worst.output, worst.sample,
                worst.iteration, source, worst.e_dep, worst.bound, pytorch)
    if check.verdict == "inconclusive":
        LOGGER.info("  every input is unstable for this network in float32 at this tolerance (PyTorch's own float32 "
                    "output is more than %g tolerances from float64), so no float32 runtime can be checked on it: "
                    "verify on other inputs (--images, --inputs, --seed) or loosen --rtol/--atol", INSTABILITY_FACTOR)
    failed = list(dict.fromkeys(s.output for s in check.samples if s.status == FAILED))
    if len({s.output for s in check.samples}) > 1 and failed:
        LOGGER.info("  failed outputs: %s", ", ".join(failed))
    if check.first_divergence:
        LOGGER.info("  %s", check.first_divergence["summary"])


def _localize(verification: Verification, model: nn.Module, onnx_model, feeds, reference: TorchReference,
              providers, threads) -> None:
    """Name the first module whose exported output is out of tolerance, on the worst failed sample."""
    failed = [s for s in verification.samples if s.status == FAILED]
    worst = max(failed, key=lambda s: s.e_dep / s.bound)
    divergence = first_divergence(model, onnx_model, feeds[worst.iteration], worst.iteration, worst.sample,
                                  verification.tolerance, float64=reference.float64 is not None,
                                  providers=providers, threads=threads, output=worst.output)
    if divergence is None:
        verification.first_divergence = {"module": None, "summary": "first divergence: no single module's output "
                                         "is out of tolerance (the exported graph carries no module metadata there)"}
        return
    verification.first_divergence = {**divergence.as_dict(), "summary": divergence.describe()}


def _engine_and_check(config: ExportConfig, onnx_model, feeds, reference, dynamic_batch: bool,
                      min_spatial: int | None, trt_version: str, plugin_library: Path | None,
                      timings: dict[str, float]) -> tuple[bytes, dict, Verification]:
    """Build the TensorRT engine of the exported model, run it on the verification inputs, compare with PyTorch."""
    custom_nodes = sorted({n.op_type for n in onnx_model.graph.node if n.domain == "deploykit"})
    if custom_nodes and plugin_library is None:
        raise DeployError(f"The model has deploykit::{', deploykit::'.join(custom_nodes)} nodes but no plugin library "
                          f"was found: build plugins/ with CMake (docs/tensorrt.md) and pass --plugins or set "
                          f"{trt.PLUGIN_LIBRARY_ENV}.")
    input_name, = feeds[0]  # engines are built for one-input models only
    verified = [feed[input_name].shape for feed in feeds]
    largest = [(config.max_batch, *verified[0][1:])] if config.max_batch else []
    shapes = trt.EngineShapes.spanning(verified + largest, dynamic_batch, min_spatial, config.min_shape,
                                       config.max_shape)
    precision = "FP16" if config.fp16 else "FP32"
    span = "x".join(map(str, shapes.min)) + " to " + "x".join(map(str, shapes.max))
    with stage(f"Building the TensorRT engine ({precision}, inputs {span})", timings, "trt_build"):
        engine = trt.build_engine(onnx_model.SerializeToString(), input_name, shapes, config.fp16, plugin_library)
    with stage("Running TensorRT", timings, "tensorrt"):
        candidate = trt.trt_results(engine, feeds, plugin_library)
    rtol = FP16_RTOL if config.fp16 and config.rtol is None else config.rtol
    verification = compare(candidate, reference, rtol=rtol, atol=config.atol)
    atol = max(check.atol for check in verification.outputs)
    section = {
        "version": trt_version, "fp16": config.fp16,
        "plugin_library": str(plugin_library) if plugin_library else None,
        "profile": {"min": list(shapes.min), "opt": list(shapes.opt), "max": list(shapes.max)},
        "conversion": {**conversion.as_dict(), "reference": "converted" if reference_note else "original",
                       "reference_note": reference_note} if conversion is not None else None,
        "verification": verification.as_dict(),
        "reproduce": trt.polygraphy_trt_command(artifacts.MODEL_FILE, artifacts.INPUTS_FILE,
                                                artifacts.TORCH_OUTPUTS_FILE, input_name, shapes, config.fp16,
                                                plugin_library, atol, verification.outputs[0].rtol),
        "trtexec": trt.trtexec_command(artifacts.MODEL_FILE, artifacts.ENGINE_FILE, input_name, shapes, config.fp16,
                                       plugin_library),
    }
    return engine, section, verification


def _load(config: ExportConfig, timings: dict[str, float]) -> Checkpoint | None:
    """The checkpoint to build from: a module given as is, a file, or none (a factory that makes its own weights)."""
    if isinstance(config.model, nn.Module):
        return Checkpoint(path=Path("<module>"), module=config.model)
    if config.model is None:
        return None
    with stage(f"Loading checkpoint {config.model}", timings, "load_checkpoint"):
        return load_checkpoint(config.model, trust_pickle=config.trust_pickle)


def _build(config: ExportConfig, arch: str | None, checkpoint: Checkpoint | None) -> nn.Module:
    if is_factory(config.arch):
        return build_user_model(config.arch, checkpoint)
    if checkpoint.module is not None:
        return checkpoint.module.eval()
    levels = {"out_indices": config.out_indices} if config.out_indices is not None else {}
    return build_model(arch, {**checkpoint.arch_kwargs, **levels}, checkpoint.state_dict,
                       hint=weights_hint(checkpoint, config.arch))


def _convert(model: nn.Module) -> Conversion:
    """The model with its official and third-party conv layers swapped for deploykit's (`deploykit.conversion`),
    each swap logged; the original stays as it is, the verification's reference."""
    conversion = convert(model)
    for swap in conversion.swaps:
        LOGGER.info("  converted %s: %s -> %s", swap.path or "(the model)", swap.source, swap.target)
    for layer in conversion.left_alone:
        LOGGER.info("  left as it is: %s (%s): %s", layer.path or "(the model)", layer.source, layer.reason)
    return conversion


def _reference_model(original: nn.Module, converted: nn.Module, feed: dict[str, np.ndarray],
                     conversion: Conversion | None) -> tuple[nn.Module, str | None]:
    """The model the verification compares with: the user's own, as given, when it runs here; else (e.g. mmcv's
    layers without mmcv's compiled ops) the converted model, with the reason."""
    if conversion is None or not conversion.swaps:
        return original, None
    try:
        _on_first_sample(original, feed)
    except Exception as err:  # whatever the user's layers raise: the converted model is the reference then
        try:
            _on_first_sample(converted, feed)
        except Exception:  # the converted model fails too: the user's own error is the one to report
            return original, None
        note = f"the model as given cannot run here ({type(err).__name__}: {first_line(err)}), so the converted " \
               f"model is the reference: the conversion itself is not proven by this check"
        LOGGER.info("  %s", note)
        return converted, note
    return original, None


def _on_first_sample(model: nn.Module, feed: dict[str, np.ndarray]):
    """The model's result on the first sample of `feed` (a cheap probe of what it takes and returns)."""
    with torch.inference_mode():
        return model(*(torch.from_numpy(a[:1]) for a in feed.values()))


def _model_name(config: ExportConfig, arch: str | None, checkpoint: Checkpoint | None) -> str:
    """What the default output directory and Triton model are called: the zoo arch, the factory's name, or the
    class of a module given as is."""
    if is_factory(config.arch):
        return factory_name(config.arch)
    # A class name may start with "_" or hold characters a Triton model name cannot (`check_triton_target`).
    return arch or re.sub(r"[^0-9A-Za-z_.\-]", "_", type(checkpoint.module).__name__).lstrip("_.-") or "model"


def _resolve_arch(checkpoint: Checkpoint, requested: str | None) -> str | None:
    """The architecture to build: --arch, else the checkpoint's, else the file name if it names a zoo model."""
    if requested is not None:
        model_spec(requested)  # unknown names fail here, listing the known ones
        if checkpoint.arch is not None and checkpoint.arch != requested:
            raise DeployError(f"--arch {requested} contradicts the checkpoint, which was saved for {checkpoint.arch}.")
        return requested
    if checkpoint.arch is not None or checkpoint.module is not None:
        return checkpoint.arch
    guess = arch_from_file_name(checkpoint.path)
    if guess is not None:
        LOGGER.info("  architecture %s taken from the file name (pass --arch to override)", guess)
        return guess
    raise DeployError(f"{checkpoint.path} is a bare state_dict that names no architecture; pass --arch: a zoo "
                      f"model ({', '.join(sorted(MODELS))}) or your own, as path/to/net.py:factory.")


def _resolve_input_shapes(requested: tuple[int, ...] | list[tuple[int, ...]] | None,
                          arch: str | None) -> list[tuple[int, ...]]:
    """One full shape per model input: the requested ones (a zoo model refuses sizes it cannot take), else batch 1
    at the zoo model's native size."""
    if requested is None:
        if arch is None:
            raise DeployError("The model is not a zoo architecture, so its input shape is unknown; pass --input-shape "
                              "(once per input for a model with several).")
        return [(1, *model_spec(arch).input_shape)]
    shapes = [tuple(requested)] if requested and isinstance(requested[0], int) else [tuple(s) for s in requested]
    spec = model_spec(arch) if arch is not None else None
    if spec is None:
        return shapes
    if len(shapes) != 1:
        raise DeployError(f"{arch} takes one input, but --input-shape was given {len(shapes)} times.")
    shape = shapes[0]
    if spec.fixed_size and tuple(shape[1:]) != spec.input_shape:
        size = "x".join(map(str, spec.input_shape))
        raise DeployError(f"{arch} takes only {size} inputs (its per-pixel weights are learned at that "
                          f"resolution), not {'x'.join(map(str, shape[1:]))}; only the batch may change.")
    reason = spec.min_size_reason
    if reason and len(shape) == 4 and min(shape[2:]) < spec.min_size:
        raise DeployError(f"{arch} cannot take an input of shape {'x'.join(map(str, shape))}: {reason}; "
                          f"pass a larger --input-shape.")
    return shapes


def _spatial_floor(config: ExportConfig, arch: str | None, model: nn.Module, input_shape: tuple[int, ...],
                   opset: int) -> int:
    """The smallest height and width the dynamic-spatial file must accept; refuses models that cannot have one."""
    if len(input_shape) != 4:
        raise DeployError(f"--dynamic-spatial needs an image input (N, C, H, W), not "
                          f"{'x'.join(map(str, input_shape))}.")
    deformable = any(isinstance(m, OffsetInputDeformConv2d) for m in model.modules())  # the pack forms too
    if deformable and (opset < 19 or config.lowering == "standard"):
        raise DeployError("--dynamic-spatial needs deformable convs as ONNX DeformConv (opset >= 19, lowering auto "
                          "or custom): their standard-op fallback bakes the feature-map size into Reshapes.")
    floor = check_dynamic_spatial(arch) if arch is not None else min(32, *input_shape[2:])
    if min(input_shape[2:]) < floor:
        raise DeployError(f"{arch or 'The model'} takes inputs of at least {floor}x{floor}, not "
                          f"{'x'.join(map(str, input_shape[2:]))}.")
    return floor


def _verification_shapes(input_shapes: list[tuple[int, ...]], dynamic_batch: bool, min_spatial: int | None,
                         known_floor: bool) -> list[list[tuple[int, ...]]]:
    """The input shapes of each verification feed: the requested ones and, when the batch is dynamic, one more batch
    size, so the check proves that one file serves several; with a dynamic spatial size that second feed's image
    inputs also have another size (H - 32, else H + 32 when that would go below the model's smallest size or it is
    unknown; W + 32)."""
    if not dynamic_batch:
        return [input_shapes]
    if min_spatial is None:
        return [input_shapes, [(shape[0] + 1, *shape[1:]) for shape in input_shapes]]
    height = input_shapes[0][2]
    height = height - 32 if known_floor and height - 32 >= min_spatial else height + 32
    return [input_shapes, [(shape[0] + 1, shape[1], height, shape[3] + 32) if len(shape) == 4 else
                           (shape[0] + 1, *shape[1:]) for shape in input_shapes]]


def _make_feeds(config: ExportConfig, arch: str | None, names: list[str],
                shapes: list[list[tuple[int, ...]]]) -> list[dict[str, np.ndarray]]:
    """Verification inputs, one feed per entry of `shapes`: the user's .npz (one feed as given), the user's images,
    or seeded random images (`structured_noise`; normal noise for inputs that are not image-shaped)."""
    if config.inputs is not None:
        arrays = _load_npz_inputs(config.inputs, names)
        for name, expected in zip(names, shapes[0]):
            _check_npz_shape(config, name, arrays[name], expected, dynamic_batch=len(shapes) > 1)
        if config.dynamic_spatial:
            LOGGER.info("  --inputs has one size: the dynamic height and width are verified at that size only")
        batches = {name: batch_sizes(array, dynamic_batch=len(shapes) > 1) for name, array in arrays.items()}
        return [{name: batches[name][index] for name in names} for index in range(len(batches[names[0]]))]
    if config.images is not None:
        if len(names) > 1:
            raise DeployError(f"--images verifies models with one image input; this one takes {len(names)} "
                              f"({', '.join(names)}), so pass them as an .npz with --inputs.")
        return _image_feeds(config, arch, names[0], [s[0] for s in shapes])
    generator = torch.Generator().manual_seed(0 if config.seed is None else config.seed)
    return [{name: (structured_noise(shape[0], shape[1:], generator) if len(shape) == 4
                    else torch.randn(shape, generator=generator)).numpy()
             for name, shape in zip(names, feed_shapes)} for feed_shapes in shapes]


def _image_feeds(config: ExportConfig, arch: str | None, name: str,
                 shapes: list[tuple[int, ...]]) -> list[dict[str, np.ndarray]]:
    """The user's images, preprocessed as the model expects, in the batches of `image_batches`."""
    if len(shapes[0]) != 4:
        raise DeployError(f"--images needs an image input (N, C, H, W); the model's input shape is "
                          f"{'x'.join(map(str, shapes[0]))}.")
    preprocessing = (model_spec(arch).preprocessing if arch is not None else IMAGENET).with_statistics(config.mean,
                                                                                                      config.std)
    files = image_files(config.images)
    if len(shapes) == 1 and len(files) != shapes[0][0]:
        raise DeployError(f"--static-batch exports batch {shapes[0][0]} but --images gave {len(files)} image(s); "
                          f"pass --input-shape {len(files)}x{'x'.join(map(str, shapes[0][1:]))} or drop "
                          f"--static-batch.")
    with stage(f"Reading {len(files)} image(s) ({preprocessing})"):
        batches = image_batches(files, shapes)
        for index, batch in enumerate(batches):
            LOGGER.info("  batch %d: %s", index, ", ".join(map(str, batch)))
        return [{name: load_images(batch, shape[1:], preprocessing)} for batch, shape in zip(batches, shapes)]


def _input_sources(config: ExportConfig, feeds: list[dict[str, np.ndarray]], shapes) -> list[list[str]]:
    """Where each sample of each verification batch came from, for the report and the verdict line."""
    if config.images is not None:
        first_input = [feed_shapes[0] for feed_shapes in shapes]
        return [[str(path) for path in batch] for batch in image_batches(image_files(config.images), first_input)]
    origin = f"{config.inputs} sample" if config.inputs is not None else f"structured noise (seed {config.seed or 0})"
    given = len(next(iter(feeds[0].values())))  # a second batch repeats the user's first sample
    return [[f"{origin} {row % given}" for row in range(len(next(iter(feed.values()))))] for feed in feeds]


def _calibration_feeds(config: ExportConfig, arch: str | None, names: list[str],
                       shapes: list[tuple[int, ...]]) -> list[dict[str, np.ndarray]]:
    """The --calibration inputs, read like --images (image files, directories; one-input image models) and --inputs
    (.npz files, one array per input), in batches of at most `CALIBRATION_BATCH` at the verification inputs' sizes."""
    npz = [Path(p) for p in config.calibration if Path(p).suffix.lower() == ".npz"]
    images = [p for p in config.calibration if Path(p).suffix.lower() != ".npz"]
    if images and len(names) > 1:
        raise DeployError(f"--calibration images calibrate models with one image input; this one takes "
                          f"{len(names)} ({', '.join(names)}), so pass .npz files with one array per input.")
    parts = [_load_npz_inputs(path, names) for path in npz]
    for path, arrays in zip(npz, parts):
        for name, shape in zip(names, shapes):
            if arrays[name].shape[1:] != tuple(shape[1:]):
                raise DeployError(f"--calibration {path} holds {name!r} of shape "
                                  f"{'x'.join(map(str, arrays[name].shape))}; the model takes "
                                  f"Nx{'x'.join(map(str, shape[1:]))}.")
    if images:
        preprocessing = (model_spec(arch).preprocessing if arch is not None else IMAGENET).with_statistics(
            config.mean, config.std)
        parts.append({names[0]: load_images(images, shapes[0][1:], preprocessing)})
    batch = {name: np.concatenate([part[name] for part in parts]) for name in names}
    total = len(batch[names[0]])
    return [{name: array[i:i + CALIBRATION_BATCH] for name, array in batch.items()}
            for i in range(0, total, CALIBRATION_BATCH)]


def _load_npz_inputs(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    """One array per model input from an .npz: by the inputs' names, or (numpy.savez's positional ``arr_0``,
    ``arr_1`` ...) in the inputs' order; a one-input model takes the file's only array whatever its name."""
    example = f"numpy.savez(path, {', '.join(f'{n}=...' for n in names)})"
    if not path.is_file():
        raise DeployError(f"--inputs {path} {'is not a file' if path.exists() else missing_reason(path)}; pass an .npz "
                          f"file saved with {example}.")
    try:
        with open(path, "rb") as handle:
            head = handle.read(6)
        if head == b"\x93NUMPY":
            raise ValueError("it is a single .npy array, not an .npz archive")
        if not head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
            raise ValueError("it is not a zip archive")
        with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as data:
            arrays = dict(data)
    except (OSError, ValueError, EOFError, AttributeError, TypeError) as err:
        reason = str(err).strip().splitlines()[0].rstrip(".") if str(err).strip() else type(err).__name__
        raise DeployError(f"--inputs {path} is not a readable .npz file ({reason}); save the input with "
                          f"{example}.") from None
    except Exception as err:  # zipfile.BadZipFile and other formats numpy cannot parse
        raise DeployError(f"--inputs {path} is not a readable .npz file ({type(err).__name__}); save the input "
                          f"with {example}.") from None
    if not arrays:
        raise DeployError(f"--inputs {path} holds no array; save the input with {example}.")
    if all(name in arrays for name in names):
        chosen = {name: arrays[name] for name in names}
    elif len(names) == 1 and len(arrays) == 1:
        chosen = {names[0]: next(iter(arrays.values()))}
    elif sorted(arrays) == [f"arr_{i}" for i in range(len(names))]:
        chosen = {name: arrays[f"arr_{i}"] for i, name in enumerate(names)}
    else:
        wanted = ", ".join(repr(n) for n in names)
        raise DeployError(f"--inputs {path} holds {', '.join(arrays)}, but the model's input(s) are {wanted}; save "
                          f"one array per input under those names ({example}).")
    for name, array in chosen.items():
        if not np.issubdtype(array.dtype, np.floating):
            raise DeployError(f"The input {name!r} in --inputs {path} has dtype {array.dtype}; save a floating-point "
                              f"array (float32).")
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise DeployError(f"The input {name!r} in --inputs {path} has {bad} NaN or infinite value(s); save finite "
                              f"numbers.")
    return {name: checked_input(array, f"--inputs {path}" if len(names) == 1 else f"--inputs {path} ({name!r})")
            for name, array in chosen.items()}


def _check_npz_shape(config: ExportConfig, name: str, array: np.ndarray, expected: tuple[int, ...],
                     dynamic_batch: bool) -> None:
    """Each .npz input must have the model's input shape: the batch may differ with a dynamic batch, height and
    width with a dynamic spatial size."""
    free = {0} if dynamic_batch else set()
    if config.dynamic_spatial:
        free |= {2, 3}
    if array.ndim == len(expected) and all(a == e or i in free for i, (a, e) in enumerate(zip(array.shape, expected))):
        return
    got, want = "x".join(map(str, array.shape)), "x".join(map(str, expected))
    batch = " (any batch)" if dynamic_batch else ""
    raise DeployError(f"The input {name!r} in --inputs {config.inputs} has shape {got} but the export takes "
                      f"{want}{batch}; save an array of that shape or pass --input-shape {got}.")


@dataclass
class OutputSignature:
    """The model's outputs as the file names them, and the structure the forward returns them in."""

    names: list[str]
    template: object  # `deploykit.signature.output_template`


def _output_signature(model: nn.Module, feed: dict[str, np.ndarray], name: str, requested: list[str] | None,
                      inputs: list[str]) -> OutputSignature:
    """Run the model once on the first sample of `feed` to learn what it returns."""
    result = _run_or_explain(lambda: _on_first_sample(model, feed), feed, name)
    flat = flatten_outputs(result, where=name)
    names = resolve_output_names([n for n, _ in flat], requested)
    clash = sorted(set(names) & set(inputs))
    if clash:
        raise DeployError(f"{name}'s output(s) {', '.join(clash)} would have the name of an input, which ONNX "
                          f"forbids; name the outputs with --output-names.")
    return OutputSignature(names, output_template(result, names))


def _torch_reference(model: nn.Module, feeds: list[dict[str, np.ndarray]], output_names: list[str],
                     name: str) -> TorchReference:
    return _run_or_explain(lambda: torch_reference(model, feeds, output_names), feeds[0], name)


def _run_or_explain(run, feed: dict[str, np.ndarray], name: str):
    """`run()`; PyTorch's errors on the verification input become one sentence naming the input's shape."""
    try:
        return run()
    except (RuntimeError, ValueError) as err:
        shapes = ", ".join("x".join(map(str, a.shape)) for a in feed.values())
        what = "an input" if len(feed) == 1 else "inputs"
        raise DeployError(f"{name} cannot take {what} of shape {shapes}: "
                          f"{str(err).strip().splitlines()[0].rstrip('.')}.") from err


def _config_summary(config: ExportConfig, arch: str | None, input_shapes: list[tuple[int, ...]],
                    dynamic_batch: bool, opset: int, output_dir: Path) -> dict:
    summary = {f.name: getattr(config, f.name) for f in fields(config) if f.name != "model"}
    summary.update(model=str(config.model) if not isinstance(config.model, nn.Module) else type(config.model).__name__,
                   arch=arch, input_shape=_shapes_summary(input_shapes), dynamic_batch=dynamic_batch, opset=opset,
                   lowering=config.lowering or "auto",
                   output_dir=str(output_dir),
                   seed=(config.seed or 0) if config.inputs is None and config.images is None else None,
                   inputs=str(config.inputs) if config.inputs else None,
                   images=[str(p) for p in config.images] if config.images else None,
                   calibration=[str(p) for p in config.calibration] if config.calibration else None)
    return summary


def _shapes_summary(shapes) -> list:
    """The input shapes for the report: one list for a one-input model (as before several inputs existed), a list of
    lists otherwise."""
    return list(shapes[0]) if len(shapes) == 1 else [list(shape) for shape in shapes]
