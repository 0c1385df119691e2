"""`ExportConfig`: every knob of the pipeline, with None meaning "the default" (resolved in the pipeline)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from deploykit.errors import DeployError


@dataclass
class ExportConfig:
    """What to export and how to check it.

    Attributes:
        model: checkpoint path, or an ``nn.Module`` to export as is.
        arch: zoo architecture name. Defaults to the checkpoint's own, else the file name (``scnet50-dc6a7e87.pth``
            -> ``scnet50``) when that names a zoo model.
        output_dir: where the artifacts go. Defaults to ``deploykit-out/<arch>``.
        input_shape: full input shape including the batch, e.g. (1, 3, 224, 224). Defaults to batch 1 at the
            model's native resolution.
        dynamic_batch: export the batch dimension as symbolic. Defaults to True.
        opset: ONNX opset, 18-23 (18: deformable convs as standard ops). Defaults to 20.
        lowering: how ``deploykit::`` ops export: "auto" (their standard-op lowering where it applies, e.g. a
            static batch folded into conv groups, else the custom node), "custom" (always the node, e.g. for
            TensorRT plugins) or "standard" (standard ops only; fails where none exists). Defaults to "auto".
        inputs: ``.npz`` file with the verification inputs. Defaults to seeded random normal inputs.
        seed: seed of the random inputs. Defaults to 0.
        rtol, atol: verification tolerances (see `deploykit.verify`). Default to 1e-4 and ``rtol * max|output|``.
        providers: onnxruntime execution providers, e.g. ["cpu"]. Defaults to the best available.
        threads: onnxruntime intra-op threads. Defaults to onnxruntime's choice.
        trust_pickle: allow checkpoints that unpickle Python objects (runs code from the file). Defaults to False.
        engine: also build a TensorRT engine (``model.plan``) and verify it against PyTorch like onnxruntime.
            Needs TensorRT >= 10.7 and a GPU. Defaults to False.
        fp16: build the engine with FP16 kernels allowed (checked at `FP16_RTOL`). Defaults to False (FP32).
        plugins: deploykit's TensorRT plugin library. Defaults to $DEPLOYKIT_PLUGINS, else
            ``plugins/build/libdeploykit_plugins.so`` of a source checkout.
        max_batch: largest batch the engine's optimisation profile accepts (dynamic batch only). Defaults to the
            largest verification batch.
        verbose: debug logging and the exporter's own diagnostics.
    """

    model: str | os.PathLike | nn.Module
    arch: str | None = None
    output_dir: str | os.PathLike | None = None
    input_shape: tuple[int, ...] | None = None
    dynamic_batch: bool | None = None
    opset: int | None = None
    lowering: str | None = None
    inputs: str | os.PathLike | None = None
    seed: int | None = None
    rtol: float | None = None
    atol: float | None = None
    providers: list[str] | None = None
    threads: int | None = None
    trust_pickle: bool = False
    engine: bool = False
    fp16: bool = False
    plugins: str | os.PathLike | None = None
    max_batch: int | None = None
    verbose: bool = False

    def __post_init__(self) -> None:
        if self.input_shape is not None:
            self.input_shape = tuple(int(d) for d in self.input_shape)
            if not self.input_shape or any(d < 1 for d in self.input_shape):
                raise DeployError(f"Input shape {self.input_shape} is invalid: every dimension must be >= 1.")
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise DeployError(f"{name} must be a non-negative number, got {value}.")
        if self.inputs is not None:
            self.inputs = Path(self.inputs)
        if (self.fp16 or self.plugins is not None or self.max_batch is not None) and not self.engine:
            raise DeployError("fp16, plugins and max_batch configure the TensorRT engine; ask for one with --engine.")
        if self.max_batch is not None and self.max_batch < 1:
            raise DeployError(f"max_batch must be at least 1, got {self.max_batch}.")


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
