"""`VariantSpec`: everything deploykit knows about one conv variant beyond its PyTorch module.

One spec per variant, in `deploykit/ops/<name>.py`, collected in `deploykit.variants.VARIANTS`. The same stem names
the variant in every layer (``deploykit/nn/<name>.py``, ``deploykit/ops/<name>.py``, ``tests/ops/test_<name>.py``);
a custom op that variants share is named by its own stem in ``deploykit/ops/`` and ``plugins/`` (e.g.
``dynamic_conv2d`` for CondConv, DyConv and ODConv); `tests/test_layout.py` enforces that.

A variant also declares how a model written with the official or a third-party class of its layer is brought over
(`LayerRule`, collected by `deploykit.conversion.convert`), so that adding a variant touches one contract file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from deploykit.export.custom_op import CustomOp


@dataclass(frozen=True)
class VariantSpec:
    """The export contract of one variant.

    Attributes:
        name: the stem shared by the variant's files in every layer.
        module: the PyTorch layer (in `deploykit.nn`).
        reference: float64 NumPy implementation of the layer's forward, written from the paper's formula:
            ``reference(module, x, *extra_inputs) -> y``; it reads the module's parameters, never calls its code.
        tolerance: max error relative to the output's range (max |y|) allowed against `reference`, per dtype.
        custom_ops: the ``deploykit::`` ONNX ops the variant exports (empty: it exports to standard ONNX only).
        conversions: how official / third-party classes of the layer become deploykit modules (empty: none needed).
    """

    name: str
    module: type[nn.Module]
    reference: Callable[..., np.ndarray]
    tolerance: dict[str, float]
    custom_ops: tuple[CustomOp, ...] = ()
    conversions: tuple[LayerRule, ...] = ()

    @property
    def plugins(self) -> tuple[str, ...]:
        """Folders under ``plugins/`` whose CUDA kernels and TensorRT plugins implement the variant's custom ops."""
        return tuple(op.plugin for op in self.custom_ops if op.plugin is not None)


class Unfit(ValueError):
    """A layer with a recognised class name whose structure the deploykit module cannot take; the message is one
    clause saying what did not fit (it becomes `deploykit.conversion.LeftAlone.reason`)."""


@dataclass(frozen=True)
class LayerRule:
    """Swap an official or third-party layer class for the deploykit module that computes the same.

    Recognition is by class name only (users copy official files into their own packages, so module paths mean
    nothing); the structure then decides: `configure` must accept the layer's attributes and the built module must
    have exactly the layer's state_dict keys and shapes, or the layer is left alone with the reason.

    Attributes:
        names: the class names this rule recognises, e.g. ("ODConv2d",).
        target: the deploykit class it builds.
        configure: builds a freshly initialised `target` with the layer's hyper-parameters and non-state attributes
            (e.g. a temperature), read from the layer's attributes; raises `Unfit` (or the ValueError / TypeError of
            the target's constructor or of a conversion) where they do not fit.
    """

    names: tuple[str, ...]
    target: type[nn.Module]
    configure: Callable[[nn.Module], nn.Module]

    def build(self, layer: nn.Module) -> nn.Module:
        """The deploykit module computing what `layer` computes: its weights and buffers copied exactly, on the
        layer's device and dtype, in the layer's train/eval mode, parameters frozen where the layer's are.

        Raises:
            Unfit: the layer's attributes or state_dict do not fit the deploykit module.
        """
        try:
            module = self.configure(layer)
        except (TypeError, ValueError) as err:  # Unfit, or the deploykit constructor refusing the hyper-parameters
            raise Unfit(str(err).rstrip(".")) from err
        state = layer.state_dict()
        reference = next((t for t in state.values() if t.is_floating_point()), None)
        if reference is not None:
            module = module.to(device=reference.device, dtype=reference.dtype)
        mismatch = state_mismatch(state, module.state_dict())
        if mismatch:
            raise Unfit(mismatch)
        module.load_state_dict(state)
        frozen = {name for name, p in layer.named_parameters() if not p.requires_grad}
        for name, parameter in module.named_parameters():
            parameter.requires_grad_(name not in frozen)
        return module.train(layer.training)

    def fits(self, layer: nn.Module) -> str | None:
        """None if `build` would swap `layer`, else the reason it would not."""
        try:
            self.build(layer)
        except Unfit as err:
            return str(err)
        return None


def state_mismatch(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> str | None:
    """The first difference between two state_dicts' keys and shapes, as a clause; None when they agree."""
    for key in sorted(source.keys() - target.keys()):
        return f"its state_dict has `{key}`, which the deploykit layer does not"
    for key in sorted(target.keys() - source.keys()):
        return f"its state_dict lacks `{key}`"
    for key, tensor in source.items():
        if tensor.shape != target[key].shape:
            return f"its `{key}` is {tuple(tensor.shape)}, not {tuple(target[key].shape)}"
    return None


def attribute(layer: nn.Module, name: str) -> Any:
    """`layer.<name>`, or `Unfit` naming the missing attribute."""
    if not hasattr(layer, name):
        raise Unfit(f"it has no attribute `{name}`")
    return getattr(layer, name)


def square(layer: nn.Module, name: str) -> int:
    """An int attribute, or a pair of equal ints (as timm and mmcv store sizes), as one int; `Unfit` otherwise."""
    value = attribute(layer, name)
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or pair[0] != pair[1] or not isinstance(pair[0], int):
        raise Unfit(f"its `{name}` is {value!r}, where the deploykit layer takes one int for both axes")
    return pair[0]
