"""`ExportConfig`: every knob of the pipeline, with None meaning "the default" (resolved in the pipeline)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from deploykit.errors import DeployError

MAX_SEED = 2 ** 64 - 1  # torch.Generator.manual_seed takes 64-bit seeds
MAX_BATCH = 2 ** 31 - 1  # Triton's max_batch_size and TensorRT's profile dimensions are int32
# The tolerance is relative to each output's range: below float32's resolution no float32 runtime can meet it, and
# at a tenth of the range a broken export passes as easily as a working one.
RTOL_RANGE = (float(np.finfo(np.float32).eps), 0.1)


@dataclass
class ExportConfig:
    """What to export and how to check it.

    Attributes:
        model: checkpoint path, or an ``nn.Module`` to export as is. None only with a factory `arch` that
            makes its own weights.
        arch: zoo architecture name, or the user's own model as ``path/to/net.py:factory`` or
            ``package.module:factory`` (`deploykit.user_code`: the factory is called without arguments, then `model`
            is loaded into its result strictly). Defaults to the checkpoint's own, else the file name
            (``scnet50-dc6a7e87.pth`` -> ``scnet50``) when that names a zoo model.
        output_dir: where the artifacts go. Defaults to ``deploykit-out/<name>``: the arch, the factory's name, or
            the class of a module given as is.
        overwrite: replace files in `output_dir` that bear the artifacts' names (model.onnx, inputs.json,
            torch_outputs.json, report.json, model.plan) although the last deploykit run there did not write them.
            Defaults to False: such a directory is refused, so a user's own files are never lost.
        input_shape: full input shape including the batch, e.g. (1, 3, 224, 224); a list of them for a model with
            several inputs (in the forward's argument order, all with the same batch). Defaults to batch 1 at the
            zoo model's native resolution.
        out_indices: for a zoo backbone that can (`ModelSpec.feature_levels`: the DCN ResNets), export the feature
            maps of these stages (0-3, mmdet's ``out_indices``) as outputs ``c2``-``c5`` instead of the classifier.
            Defaults to None.
        output_names: names of the ONNX outputs, one per tensor the forward returns (flattened depth first).
            Defaults to ``output`` for one tensor, dict keys for a dict, ``output_0``, ``output_1`` ... for a
            sequence (`deploykit.signature`).
        dynamic_batch: export the batch dimension as symbolic. Defaults to True.
        dynamic_spatial: also export height and width as symbolic (one file for every image size; needs a dynamic
            batch), verified at the requested size and a second one. Defaults to False.
        opset: ONNX opset, 18-23 (18: deformable convs as standard ops). Defaults to 20.
        lowering: how ``deploykit::`` ops export: "auto" (their standard-op lowering where it applies, e.g. a
            static batch folded into conv groups, else the custom node), "custom" (always the node, e.g. for
            TensorRT plugins) or "standard" (standard ops only; fails where none exists). Defaults to "auto".
        inputs: ``.npz`` file with the verification inputs. Defaults to seeded random images.
        images: image files or directories (JPEG/PNG/WebP/BMP) to verify on instead: resized, centre-cropped and
            normalised as the model expects (`deploykit.images`). Defaults to None.
        mean, std: per-channel normalisation of `images` (pixel values in [0, 1]). Default to the zoo model's own
            preprocessing, ImageNet's statistics for other models.
        seed: seed of the random inputs. Defaults to 0.
        rtol, atol: verification tolerances (see `deploykit.verify`). Default to 1e-4 and ``rtol * max|output|``.
        runtimes: the runtimes that run and verify the same file (`deploykit.runtime.base.RUNTIMES`), e.g.
            ["onnxruntime", "openvino"]; onnxruntime always runs (the replay line and the first-divergence search
            use it) and "tensorrt" means `engine`. The verdict is the worst over them. Defaults to onnxruntime only.
        providers: onnxruntime execution providers, e.g. ["cpu"]. Defaults to the best available.
        threads: onnxruntime intra-op threads. Defaults to onnxruntime's choice.
        trust_pickle: allow checkpoints that unpickle Python objects (runs code from the file). Defaults to False.
        engine: also build a TensorRT engine (``model.plan``) and verify it against PyTorch like onnxruntime.
            Needs TensorRT >= 10.7 and a GPU. Defaults to False.
        fp16: build the engine with FP16 kernels allowed (checked at `FP16_RTOL`). Defaults to False (FP32).
        plugins: deploykit's TensorRT plugin library. Defaults to $DEPLOYKIT_PLUGINS, else
            ``plugins/build/libdeploykit_plugins.so`` of a source checkout.
        min_shape, max_shape: the engine's optimisation profile bounds (full shapes). Default to batch 1 (and the
            model's smallest size with `dynamic_spatial`) up to the largest verification shape.
        max_batch: largest batch the engine's optimisation profile accepts (dynamic batch only), and Triton's
            ``max_batch_size``. Defaults to the largest verification batch for the engine, 8 for Triton.
        triton_repo: after a passed verification, write a Triton model repository here (`deploykit.serving`).
            Defaults to None (none).
        triton_name: the model's name in that repository. Defaults to the arch.
        triton_instance: where Triton's onnxruntime backend runs the model, "cpu" or "gpu". Defaults to "cpu".
        force: write the Triton repository even when the verdict is "failed" or "inconclusive". Defaults to False.
        quantize: "int8": after the fp32 verification, also write ``model.int8.onnx`` (QDQ) and judge it on the
            verification inputs against PyTorch (`deploykit.quantize`, docs/quantization.md). Defaults to None.
        calibration: images, directories of images or ``.npz`` files to calibrate the int8 model on; never the
            verification inputs. Required with `quantize`.
        keep_float: module paths or ONNX node names kept in float32 in the int8 model. Defaults to none.
        triton_precision: which model the Triton repository serves, "fp32" or "int8" (needs `quantize`; written
            only when the whole run passed, unless `force`). Defaults to "fp32".
        verbose: debug logging and the exporter's own diagnostics.
        progress: log each stage on stderr as the CLI does, unless the application configured logging itself (the
            ``deploykit`` logger or the root logger; then its configuration decides). Defaults to True; False
            keeps a Python caller's run silent.
    """

    model: str | os.PathLike | nn.Module | None
    arch: str | None = None
    output_dir: str | os.PathLike | None = None
    overwrite: bool = False
    input_shape: tuple[int, ...] | list[tuple[int, ...]] | None = None
    output_names: list[str] | None = None
    out_indices: tuple[int, ...] | None = None
    dynamic_batch: bool | None = None
    dynamic_spatial: bool = False
    opset: int | None = None
    lowering: str | None = None
    inputs: str | os.PathLike | None = None
    images: list[str | os.PathLike] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    seed: int | None = None
    rtol: float | None = None
    atol: float | None = None
    runtimes: list[str] | None = None
    providers: list[str] | None = None
    threads: int | None = None
    trust_pickle: bool = False
    engine: bool = False
    fp16: bool = False
    plugins: str | os.PathLike | None = None
    max_batch: int | None = None
    min_shape: tuple[int, ...] | None = None
    max_shape: tuple[int, ...] | None = None
    triton_repo: str | os.PathLike | None = None
    triton_name: str | None = None
    triton_instance: str | None = None
    force: bool = False
    quantize: str | None = None
    calibration: list[str | os.PathLike] | None = None
    keep_float: list[str] | None = None
    triton_precision: str | None = None
    verbose: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.model is None and not (self.arch and ":" in self.arch):
            raise DeployError("No model given: pass --model (a checkpoint), or --arch path/to/net.py:factory for a "
                              "model whose factory makes its own weights.")
        if self.input_shape is not None:
            self.input_shape = _shapes(self.input_shape)
        if self.out_indices is not None:
            self.out_indices = tuple(int(i) for i in self.out_indices)
            if not self.out_indices or len(set(self.out_indices)) != len(self.out_indices) or \
                    not all(0 <= i <= 3 for i in self.out_indices):
                raise DeployError(f"--out-indices {','.join(map(str, self.out_indices))} is not a set of distinct "
                                  f"stages from 0 to 3, such as 0,1,2,3.")
            self.out_indices = tuple(sorted(self.out_indices))
        if self.output_names is not None:
            self.output_names = [str(name) for name in self.output_names]
            if not self.output_names or not all(self.output_names):
                raise DeployError("--output-names needs one non-empty name per output, e.g. logits,embedding.")
        _check_tolerances(self.rtol, self.atol)
        if self.seed is not None:
            check_seed(self.seed)
        if self.providers is not None and (not self.providers or not all(p.strip() for p in self.providers)):
            raise DeployError(f"--providers {','.join(self.providers)!r} names an empty provider; pass names such as "
                              f"cpu or cuda,cpu, or leave the option out for the best available.")
        _check_statistics(self.mean, self.std)
        if self.runtimes is not None:
            from deploykit.runtime.base import parse_runtimes

            self.runtimes = parse_runtimes(list(self.runtimes))
            self.engine = self.engine or "tensorrt" in self.runtimes
        if self.inputs is not None:
            self.inputs = Path(self.inputs)
        if isinstance(self.images, (str, os.PathLike)):
            self.images = [self.images]
        if self.images is not None:
            self.images = [Path(p) for p in self.images]
            if self.inputs is not None:
                raise DeployError("--inputs and --images both give the verification inputs; pass one of them.")
        if (self.mean is not None or self.std is not None) and self.images is None:
            raise DeployError("--mean and --std normalise --images; pass the images too.")
        if (self.fp16 or self.plugins is not None or self.min_shape is not None or self.max_shape is not None) \
                and not self.engine:
            raise DeployError("fp16, plugins, min_shape and max_shape configure the TensorRT engine; ask for one with "
                              "--engine.")
        if self.dynamic_spatial and self.dynamic_batch is False:
            raise DeployError("--dynamic-spatial needs a dynamic batch (with a static batch, dynamic convs fold the "
                              "batch into size-specific conv groups); drop --static-batch.")
        if self.max_batch is not None and self.max_shape is not None and self.max_batch != self.max_shape[0]:
            raise DeployError(f"--max-batch {self.max_batch} contradicts --max-shape, whose batch is "
                              f"{self.max_shape[0]}; pass one of them.")
        if self.max_batch is not None and not (self.engine or self.triton_repo is not None):
            raise DeployError("max_batch is the largest batch of the TensorRT engine or the Triton model; ask for "
                              "one with --engine or --triton-repo.")
        if (self.triton_name is not None or self.triton_instance is not None or self.force) and \
                self.triton_repo is None:
            raise DeployError("--triton-name, --triton-instance and --force configure the Triton repository; name "
                              "it with --triton-repo.")
        if self.max_batch is not None and not 1 <= self.max_batch <= MAX_BATCH:
            raise DeployError(f"max_batch must be from 1 to {MAX_BATCH} (Triton's and TensorRT's 32-bit limit), got "
                              f"{self.max_batch}.")
        if self.opset is not None:
            from deploykit.export.onnx import SUPPORTED_OPSETS

            if self.opset not in SUPPORTED_OPSETS:
                raise DeployError(f"--opset {self.opset} is not supported: pass an opset from "
                                  f"{SUPPORTED_OPSETS.start} to {SUPPORTED_OPSETS.stop - 1} (torch's exporter "
                                  f"emits no lower opset).")
        if self.threads is not None and self.threads < 1:
            raise DeployError(f"--threads must be at least 1, got {self.threads}.")
        self._check_quantization()
        if self.seed is not None and (self.inputs is not None or self.images is not None):
            raise DeployError("--seed seeds the random verification inputs, but --inputs or --images gives them; "
                              "drop --seed.")

    def _check_quantization(self) -> None:
        if isinstance(self.calibration, (str, os.PathLike)):
            self.calibration = [self.calibration]
        if self.triton_precision not in (None, "fp32", "int8"):
            raise DeployError(f"--triton-precision {self.triton_precision} is not supported; pass fp32 or int8.")
        if self.triton_precision is not None and self.triton_repo is None:
            raise DeployError("--triton-precision chooses the model of the Triton repository; name it with "
                              "--triton-repo.")
        if self.quantize is None:
            if self.calibration is not None or self.keep_float or self.triton_precision == "int8":
                raise DeployError("--calibration, --keep-float and --triton-precision int8 need the int8 model; ask "
                                  "for one with --quantize int8.")
            return
        if self.quantize != "int8":
            raise DeployError(f"--quantize {self.quantize} is not supported; pass --quantize int8.")
        if not self.calibration:
            raise DeployError("--quantize int8 needs calibration inputs: pass --calibration with images, directories "
                              "of images or .npz files (not the verification inputs).")
        self.calibration = [Path(p) for p in self.calibration]
        verification = {Path(p).resolve() for p in [*(self.images or []), *([self.inputs] if self.inputs else [])]}
        shared = sorted(str(p) for p in self.calibration if p.resolve() in verification)
        if shared:
            raise DeployError(f"--calibration and the verification inputs share {', '.join(shared)}; an int8 model "
                              f"must be judged on inputs it was not calibrated on.")


def _shapes(value) -> tuple[int, ...] | list[tuple[int, ...]]:
    """One shape (ints) or several (a sequence of int sequences), every dimension >= 1, batches equal."""
    several = len(value) > 0 and not isinstance(value[0], (int,)) and hasattr(value[0], "__len__")
    shapes = [tuple(int(d) for d in shape) for shape in value] if several else [tuple(int(d) for d in value)]
    for shape in shapes:
        if not shape or any(d < 1 for d in shape):
            raise DeployError(f"Input shape {shape} is invalid: every dimension must be >= 1.")
    if len({shape[0] for shape in shapes}) > 1:
        raise DeployError(f"The input shapes {', '.join('x'.join(map(str, s)) for s in shapes)} have different "
                          f"batches; every input of one call shares dimension 0.")
    return shapes if several else shapes[0]


def parse_shape(text: str) -> tuple[int, ...]:
    """Parse "1x3x224x224" or "1,3,224,224" into a tuple of positive ints."""
    parts = text.replace(",", "x").lower().split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise DeployError(f"Input shape {text!r} is not of the form 1x3x224x224.") from None
    if any(d < 1 for d in shape):
        raise DeployError(f"Input shape {text!r} is invalid: every dimension must be >= 1.")
    return shape


def _parse_numbers(text: str, kind: type, what: str, example: str) -> tuple:
    try:
        return tuple(kind(p) for p in text.split(","))
    except ValueError:
        raise DeployError(f"{text!r} is not a comma-separated list of {what} such as {example}.") from None


def parse_floats(text: str) -> tuple[float, ...]:
    """Parse "0.485,0.456,0.406" into a tuple of floats."""
    return _parse_numbers(text, float, "numbers", "0.485,0.456,0.406")


def parse_names(text: str) -> list[str]:
    """Parse "logits,embedding" into a list of non-empty names."""
    names = [part.strip() for part in text.split(",")]
    if not all(names):
        raise DeployError(f"{text!r} is not a comma-separated list of names such as logits,embedding.")
    return names


def parse_ints(text: str) -> tuple[int, ...]:
    """Parse "0,1,2,3" into a tuple of ints."""
    return _parse_numbers(text, int, "integers", "0,1,2,3")


def check_seed(seed: int) -> None:
    """A seed torch's generators take (a larger one would end in an overflow traceback)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise DeployError(f"--seed must be an integer from 0 to {MAX_SEED}, got {seed}.")


def _check_tolerances(rtol: float | None, atol: float | None) -> None:
    """Tolerances that can tell a working export from a broken one: finite, rtol within `RTOL_RANGE`, atol > 0."""
    low, high = RTOL_RANGE
    if rtol is not None and not (isinstance(rtol, (int, float)) and low <= rtol <= high):
        raise DeployError(f"--rtol must be a number from {low:.2g} (float32's resolution) to {high:g} (a tenth of "
                          f"the output's range), got {rtol}.")
    if atol is not None and not (isinstance(atol, (int, float)) and math.isfinite(atol) and atol > 0):
        raise DeployError(f"--atol must be a positive finite number, got {atol}.")


def _check_statistics(mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> None:
    """--mean and --std apply to pixels in [0, 1]: values on the 0-255 scale (123.7, 58.4) are refused, not
    silently used."""
    for name, values, interval, above_floor in (("--mean", mean, "[0, 1]", lambda v: v >= 0),
                                                ("--std", std, "(0, 1]", lambda v: v > 0)):
        if values is not None and not all(above_floor(v) and v <= 1 for v in values):
            scale = " (on the 0-255 scale: divide by 255)" if any(v > 1 for v in values) else ""
            raise DeployError(f"{name} values must be in {interval} like the pixels they apply to, got "
                              f"{','.join(map(str, values))}{scale}.")
