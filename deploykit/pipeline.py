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
from deploykit.checkpoint import Checkpoint, check_weights, load_checkpoint
from deploykit.config import ExportConfig
from deploykit.errors import DeployError, VerificationFailed
from deploykit.export.onnx import DEFAULT_OPSET, onnx_from_model
from deploykit.export.passes import run_passes
from deploykit.fileio import check_writable_dir
from deploykit.images import IMAGENET, image_files, load_images
from deploykit.inputs import structured_noise
from deploykit.localize import first_divergence
from deploykit.log import LOGGER, stage
from deploykit.models import MODELS, build_model, check_dynamic_spatial, model_spec
from deploykit.nn import DeformConv2d, ModulatedDeformConv2d
from deploykit.quantize import log_int8_verdict, quantize_and_check
from deploykit.runtime import trt
from deploykit.runtime.ort import resolve_providers, session_from_onnx
from deploykit.serving.triton import check_triton_target, write_triton_repository
from deploykit.verify import (FAILED, FP16_RTOL, INSTABILITY_FACTOR, PASSED, TorchReference, Verification,
                              combined_verdict, compare, onnxrt_results, polygraphy_command, torch_reference)

INPUT_NAME = "input"
OUTPUT_NAME = "output"
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
    if "cast" in checkpoint.metadata:
        LOGGER.info("  %s", checkpoint.metadata["cast"])
    if config.triton_repo is not None:  # a bad name or an unwritable repository fails before the slow steps
        check_triton_target(config.triton_repo, _triton_name(config, arch), **_triton_options(config))

    input_shape = _resolve_input_shape(config.input_shape, arch)  # a size the model cannot take fails before the build
    with stage(f"Building {arch or type(checkpoint.module).__name__}", timings, "build_model"):
        model = checkpoint.module.eval() if checkpoint.module is not None else \
            build_model(arch, checkpoint.arch_kwargs, checkpoint.state_dict)
    check_weights(model, checkpoint)
    providers = resolve_providers(config.providers)  # fail before the slow export if one is unavailable
    dynamic_batch = True if config.dynamic_batch is None else config.dynamic_batch
    opset = config.opset or DEFAULT_OPSET
    min_spatial = _spatial_floor(config, arch, model, input_shape, opset) if config.dynamic_spatial else None
    shapes = _verification_shapes(input_shape, dynamic_batch, min_spatial, arch is not None)
    feeds = _make_feeds(config, arch, shapes)
    # Checked now, created only when the artifacts are written: a run that fails before leaves no directory.
    output_dir = check_writable_dir(config.output_dir or Path("deploykit-out") / (arch or "model"))

    with stage("Running PyTorch (float32, and float64 as the reference)", timings, "torch_run"):
        try:
            reference = torch_reference(model, feeds, [OUTPUT_NAME])
        except (RuntimeError, ValueError) as err:
            shape = "x".join(map(str, feeds[0][INPUT_NAME].shape))
            raise DeployError(f"{arch or 'The model'} cannot take an input of shape {shape}: "
                              f"{str(err).strip().splitlines()[0].rstrip('.')}.") from err

    dims = "dynamic batch and size" if min_spatial else "dynamic batch" if dynamic_batch else "static batch"
    with stage(f"Exporting ONNX (opset {opset}, {dims})", timings, "export"):
        onnx_model = onnx_from_model(model, torch.from_numpy(feeds[0][INPUT_NAME]), opset=opset,
                                     dynamic_batch=dynamic_batch, dynamic_spatial=config.dynamic_spatial,
                                     min_spatial=min_spatial, input_names=[INPUT_NAME],
                                     output_names=[OUTPUT_NAME], lowering=config.lowering,
                                     verbose=config.verbose)
    with stage("Graph passes (constant folding, shape inference, checks)", timings, "passes"):
        onnx_model, pass_report = run_passes(onnx_model)
    LOGGER.info("  folding: %d -> %d nodes, %d -> %d parameters in initializers", pass_report.before.nodes,
                pass_report.after.nodes, pass_report.before.parameters, pass_report.after.parameters)

    if reference.fallback_reason:
        LOGGER.info("  float32 reference only: %s", reference.fallback_reason)
    with stage("Running onnxruntime", timings, "onnxruntime"):
        session = session_from_onnx(onnx_model, providers, config.threads)
        candidate = onnxrt_results(session, feeds)
    verification = compare(candidate, reference, rtol=config.rtol, atol=config.atol)
    if verification.verdict == FAILED:
        with stage("Localising the first divergence", timings, "localize"):
            _localize(verification, model, onnx_model, feeds, reference, providers, config.threads)

    report = {
        "versions": artifacts.versions(),
        "config": _config_summary(config, arch, input_shape, dynamic_batch, opset),
        "model": {"arch": arch, "checkpoint": str(checkpoint.path),
                  "parameters": sum(p.numel() for p in model.parameters())},
        "export": {"opset": opset, "ir_version": onnx_model.ir_version, "dynamic_batch": dynamic_batch,
                   "dynamic_spatial": {"min_size": min_spatial,
                                       "verified_shapes": [list(f[INPUT_NAME].shape) for f in feeds]}
                   if min_spatial else None,
                   "custom_nodes": sorted({f"{n.domain}::{n.op_type}" for n in onnx_model.graph.node if n.domain}),
                   "passes": pass_report.as_dict()},
        "runtime": {"name": "onnxruntime", "providers": session.get_providers()},
        "verification": verification.as_dict(),
        "reproduce": polygraphy_command(artifacts.MODEL_FILE, artifacts.INPUTS_FILE,
                                        artifacts.TORCH_OUTPUTS_FILE, verification),
        "verdict": verification.verdict,
        "timings_s": timings,
    }
    checks = {f"onnxruntime ({session.get_providers()[0]})": verification}
    engine = None
    if config.engine:
        engine, report["tensorrt"], checks["TensorRT"] = _engine_and_check(
            config, onnx_model, feeds, reference, dynamic_batch, min_spatial, trt_version, plugin_library, timings)
    verdicts = [check.verdict for check in checks.values()]
    int8_model = None
    if config.quantize:
        with stage("Quantizing to int8 and checking it on the verification inputs", timings, "quantize"):
            int8_model, report["quantization"] = quantize_and_check(
                onnx_model, model, _calibration_feeds(config, arch, feeds[0][INPUT_NAME].shape), feeds,
                config.keep_float or (), [str(p) for p in config.calibration], providers, config.threads)
        verdicts.append(report["quantization"]["verification"]["verdict"])
    verdict = combined_verdict(verdicts)
    report["verdict"] = verdict
    for runtime, check in checks.items():
        _log_verdict(runtime, check)
    if int8_model is not None:
        log_int8_verdict(report["quantization"])
    if config.triton_repo is not None:
        served = int8_model if config.triton_precision == "int8" else onnx_model
        report["triton"] = _triton_repository(config, arch, verdict, served, dynamic_batch, input_shape, engine,
                                              report.get("tensorrt"), plugin_library)

    with stage(f"Writing artifacts to {output_dir}", timings, "write"):
        timings["total"] = round(time.perf_counter() - started, 4)
        files = artifacts.write_artifacts(output_dir, onnx_model, feeds, reference.saved_results(), report, engine,
                                          int8_model)
    result = ExportResult(verdict, output_dir, files, report)
    if raise_on_mismatch and verdict == FAILED:
        failed = ", ".join(runtime for runtime, check in checks.items() if check.verdict == FAILED)
        raise VerificationFailed(f"The {failed} outputs differ from PyTorch beyond tolerance; see "
                                 f"{files['report.json']}.")
    return result


def _triton_name(config: ExportConfig, arch: str | None) -> str:
    return config.triton_name or arch or "model"


def _triton_options(config: ExportConfig) -> dict:
    return {"max_batch": config.max_batch or 8, "instance_kind": config.triton_instance or "cpu",
            "threads": config.threads}


def _triton_repository(config: ExportConfig, arch: str | None, verdict: str, onnx_model, dynamic_batch: bool,
                       input_shape: tuple[int, ...], engine: bytes | None, tensorrt: dict | None,
                       plugin_library: Path | None) -> dict:
    """Hand the verified model to Triton; a failed or inconclusive check writes no repository unless forced.
    Returns the report's ``triton`` section."""
    name = _triton_name(config, arch)
    section = {"repository": str(config.triton_repo), "name": name, "written": False}
    if verdict != PASSED and not config.force:
        LOGGER.info("Triton repository not written: the verification %s (pass --force to write it anyway)",
                    "failed" if verdict == FAILED else "was inconclusive")
        return section
    with stage(f"Writing the Triton model repository {config.triton_repo} (model {name!r})"):
        write_triton_repository(config.triton_repo, name, onnx_model, dynamic_batch=dynamic_batch, engine=engine,
                                engine_profile=tensorrt["profile"] if engine is not None else None,
                                plugin_library=plugin_library if engine is not None else None,
                                example_shapes={INPUT_NAME: input_shape}, **_triton_options(config))
    LOGGER.info("  serve it: see %s", Path(config.triton_repo) / "README.md")
    models = [name, *([f"{name}_trt"] if engine is not None else [])]
    return {**section, "written": True, "models": models, "forced": verdict != PASSED}


def _log_verdict(runtime: str, check: Verification) -> None:
    """One line per check: the verdict, the worst sample against its bound, and why when inconclusive."""
    worst = check.worst
    pytorch = f", PyTorch float32 {worst.e_ref:.2g}" if worst.e_ref is not None else ""
    counts = ", ".join(f"{n} {status}" for status, n in check.counts.items() if n)
    LOGGER.info("%s: %s vs PyTorch %s, %s samples; worst: output %r sample %d of batch %d at %.2g of its range "
                "(bound %.2g%s)", check.verdict.upper(), runtime, check.reference, counts, worst.output, worst.sample,
                worst.iteration, worst.e_dep, worst.bound, pytorch)
    if check.verdict == "inconclusive":
        LOGGER.info("  every input is unstable for this network in float32 (PyTorch's own float32 output is more "
                    "than %g tolerances from float64), so no float32 runtime can be checked on it: verify on other "
                    "inputs (--images, --inputs, --seed)", INSTABILITY_FACTOR)
    if check.first_divergence:
        LOGGER.info("  %s", check.first_divergence["summary"])


def _localize(verification: Verification, model: nn.Module, onnx_model, feeds, reference: TorchReference,
              providers, threads) -> None:
    """Name the first module whose exported output is out of tolerance, on the worst failed sample."""
    failed = [s for s in verification.samples if s.status == FAILED]
    worst = max(failed, key=lambda s: s.e_dep / s.bound)
    divergence = first_divergence(model, onnx_model, feeds[worst.iteration], worst.iteration, worst.sample,
                                  verification.tolerance, float64=reference.float64 is not None,
                                  providers=providers, threads=threads)
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
    verified = [feed[INPUT_NAME].shape for feed in feeds]
    largest = [(config.max_batch, *verified[0][1:])] if config.max_batch else []
    shapes = trt.EngineShapes.spanning(verified + largest, dynamic_batch, min_spatial, config.min_shape,
                                       config.max_shape)
    precision = "FP16" if config.fp16 else "FP32"
    span = "x".join(map(str, shapes.min)) + " to " + "x".join(map(str, shapes.max))
    with stage(f"Building the TensorRT engine ({precision}, inputs {span})", timings, "trt_build"):
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
        reason = spec.min_size_reason if spec is not None else None
        if reason and len(requested) == 4 and min(requested[2:]) < spec.min_size:
            raise DeployError(f"{arch} cannot take an input of shape {'x'.join(map(str, requested))}: {reason}; "
                              f"pass a larger --input-shape.")
        return requested
    if arch is None:
        raise DeployError("The model is not a zoo architecture, so its input shape is unknown; pass --input-shape.")
    return (1, *model_spec(arch).input_shape)


def _spatial_floor(config: ExportConfig, arch: str | None, model: nn.Module, input_shape: tuple[int, ...],
                   opset: int) -> int:
    """The smallest height and width the dynamic-spatial file must accept; refuses models that cannot have one."""
    if len(input_shape) != 4:
        raise DeployError(f"--dynamic-spatial needs an image input (N, C, H, W), not "
                          f"{'x'.join(map(str, input_shape))}.")
    deformable = any(isinstance(m, (DeformConv2d, ModulatedDeformConv2d)) for m in model.modules())
    if deformable and (opset < 19 or config.lowering == "standard"):
        raise DeployError("--dynamic-spatial needs deformable convs as ONNX DeformConv (opset >= 19, lowering auto "
                          "or custom): their standard-op fallback bakes the feature-map size into Reshapes.")
    floor = check_dynamic_spatial(arch) if arch is not None else min(32, *input_shape[2:])
    if min(input_shape[2:]) < floor:
        raise DeployError(f"{arch or 'The model'} takes inputs of at least {floor}x{floor}, not "
                          f"{'x'.join(map(str, input_shape[2:]))}.")
    return floor


def _verification_shapes(input_shape: tuple[int, ...], dynamic_batch: bool, min_spatial: int | None,
                         known_floor: bool) -> list[tuple[int, ...]]:
    """The requested shape and, when the batch is dynamic, one more batch size, so the check proves that one file
    serves several; with a dynamic spatial size that second input also has another size (H - 32, else H + 32 when
    that would go below the model's smallest size or it is unknown; W + 32)."""
    if not dynamic_batch:
        return [input_shape]
    batch, *rest = input_shape
    if min_spatial is None:
        return [input_shape, (batch + 1, *rest)]
    channels, height, width = rest
    second = height - 32 if known_floor and height - 32 >= min_spatial else height + 32
    return [input_shape, (batch + 1, channels, second, width + 32)]


def _make_feeds(config: ExportConfig, arch: str | None, shapes: list[tuple[int, ...]]) -> list[dict[str, np.ndarray]]:
    """Verification inputs, one feed per shape: the user's .npz (one feed as given), the user's images, or seeded
    random images (`structured_noise`; normal noise for inputs that are not image-shaped)."""
    if config.inputs is not None:
        array = _load_npz_input(config.inputs)
        _check_npz_shape(config, array, shapes[0], dynamic_batch=len(shapes) > 1)
        return [{INPUT_NAME: array}]
    if config.images is not None:
        return _image_feeds(config, arch, shapes)
    generator = torch.Generator().manual_seed(0 if config.seed is None else config.seed)
    if len(shapes[0]) == 4:
        return [{INPUT_NAME: structured_noise(shape[0], shape[1:], generator).numpy()} for shape in shapes]
    return [{INPUT_NAME: torch.randn(shape, generator=generator).numpy()} for shape in shapes]


def _image_feeds(config: ExportConfig, arch: str | None, shapes: list[tuple[int, ...]]) -> list[dict[str, np.ndarray]]:
    """The user's images, preprocessed as the model expects. With two verification shapes and three or more images:
    batches of 1 and N-1 (every image once, the second batch at the second shape's size); with fewer images and a
    second size, every image at both sizes."""
    if len(shapes[0]) != 4:
        raise DeployError(f"--images needs an image input (N, C, H, W); the model's input shape is "
                          f"{'x'.join(map(str, shapes[0]))}.")
    preprocessing = (model_spec(arch).preprocessing if arch is not None else IMAGENET).with_statistics(config.mean,
                                                                                                      config.std)
    files = image_files(config.images)
    with stage(f"Reading {len(files)} image(s) ({preprocessing})"):
        first = load_images(files, shapes[0][1:], preprocessing)
        resized = len(shapes) == 2 and shapes[1][2:] != shapes[0][2:]
        second = load_images(files if len(files) < 3 else files[1:], shapes[1][1:], preprocessing) if resized else None
    if len(shapes) == 1 and len(first) != shapes[0][0]:
        raise DeployError(f"--static-batch exports batch {shapes[0][0]} but --images gave {len(first)} image(s); "
                          f"pass --input-shape {len(first)}x{'x'.join(map(str, shapes[0][1:]))} or drop "
                          f"--static-batch.")
    if len(shapes) == 2 and len(first) >= 3:
        return [{INPUT_NAME: first[:1]}, {INPUT_NAME: second if resized else first[1:]}]
    return [{INPUT_NAME: first}] + ([{INPUT_NAME: second}] if resized else [])


def _calibration_feeds(config: ExportConfig, arch: str | None, shape: tuple[int, ...]) -> list[dict[str, np.ndarray]]:
    """The --calibration inputs, read like --images (image files, directories) and --inputs (.npz files), in
    batches of at most `CALIBRATION_BATCH` at the verification input's size."""
    missing = [str(p) for p in config.calibration if not Path(p).exists()]
    if missing:
        raise DeployError(f"--calibration {', '.join(missing)}: no such file or directory.")
    npz = [Path(p) for p in config.calibration if Path(p).suffix.lower() == ".npz"]
    images = [p for p in config.calibration if Path(p).suffix.lower() != ".npz"]
    arrays = [_load_npz_input(path) for path in npz]
    for path, array in zip(npz, arrays):
        if array.shape[1:] != tuple(shape[1:]):
            raise DeployError(f"--calibration {path} holds an array of shape {'x'.join(map(str, array.shape))}; the "
                              f"model takes Nx{'x'.join(map(str, shape[1:]))}.")
    if images:
        preprocessing = (model_spec(arch).preprocessing if arch is not None else IMAGENET).with_statistics(
            config.mean, config.std)
        arrays.append(load_images(images, shape[1:], preprocessing))
    batch = np.concatenate(arrays)
    return [{INPUT_NAME: batch[i:i + CALIBRATION_BATCH]} for i in range(0, len(batch), CALIBRATION_BATCH)]


def _load_npz_input(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DeployError(f"--inputs {path} {'is not a file' if path.exists() else 'does not exist'}; pass an .npz "
                          f"file saved with numpy.savez.")
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
                          f"numpy.savez(path, input=array).") from None
    except Exception as err:  # zipfile.BadZipFile and other formats numpy cannot parse
        raise DeployError(f"--inputs {path} is not a readable .npz file ({type(err).__name__}); save the input "
                          f"with numpy.savez(path, input=array).") from None
    if INPUT_NAME in arrays:
        array = arrays[INPUT_NAME]
    elif len(arrays) == 1:
        array = next(iter(arrays.values()))
    elif not arrays:
        raise DeployError(f"--inputs {path} holds no array; save the input with numpy.savez(path, input=array).")
    else:
        raise DeployError(f"--inputs {path} holds several arrays ({', '.join(arrays)}); name the model input "
                          f"{INPUT_NAME!r}.")
    if not np.issubdtype(array.dtype, np.floating):
        raise DeployError(f"The input in --inputs {path} has dtype {array.dtype}; save a floating-point array "
                          f"(float32).")
    bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise DeployError(f"The input in --inputs {path} has {bad} NaN or infinite value(s); save finite numbers.")
    return np.ascontiguousarray(array, dtype=np.float32)


def _check_npz_shape(config: ExportConfig, array: np.ndarray, expected: tuple[int, ...], dynamic_batch: bool) -> None:
    """The .npz input must have the model's input shape: the batch may differ with a dynamic batch, height and
    width with a dynamic spatial size."""
    free = {0} if dynamic_batch else set()
    if config.dynamic_spatial:
        free |= {2, 3}
    if array.ndim == len(expected) and all(a == e or i in free for i, (a, e) in enumerate(zip(array.shape, expected))):
        return
    got, want = "x".join(map(str, array.shape)), "x".join(map(str, expected))
    batch = " (any batch)" if dynamic_batch else ""
    raise DeployError(f"The input in --inputs {config.inputs} has shape {got} but the export takes {want}{batch}; "
                      f"save an array of that shape or pass --input-shape {got}.")


def _config_summary(config: ExportConfig, arch: str | None, input_shape: tuple[int, ...], dynamic_batch: bool,
                    opset: int) -> dict:
    summary = {f.name: getattr(config, f.name) for f in fields(config) if f.name != "model"}
    summary.update(model=str(config.model) if not isinstance(config.model, nn.Module) else type(config.model).__name__,
                   arch=arch, input_shape=list(input_shape), dynamic_batch=dynamic_batch, opset=opset,
                   lowering=config.lowering or "auto",
                   output_dir=str(config.output_dir) if config.output_dir else None,
                   inputs=str(config.inputs) if config.inputs else None,
                   images=[str(p) for p in config.images] if config.images else None,
                   calibration=[str(p) for p in config.calibration] if config.calibration else None)
    return summary
