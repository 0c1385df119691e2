"""Bring a model written with official or third-party conv layers over to deploykit's modules, before export.

Why: users' networks keep the layer classes they trained with (OSVAI's ``ODConv2d``, kaijieshi7's
``Dynamic_conv2d``, timm's ``CondConv2d``, JierunChen's ``TVConv``, LeapLabTHU's ``ACmix``, mmcv's and
torchvision's deformable convs). Given to torch.onnx as they are, the batch-into-groups layers fail with a dynamic
batch, TVConv fails on its int64 buffers, mmcv's layers freeze the batch and ACmix exports slowly. deploykit's
modules compute the same with the same parameter names and layouts, so `convert` swaps each recognised layer for
its deploykit module, weights copied exactly. Which classes are recognised, and how, is each variant's business:
its `deploykit.ops.spec.LayerRule` s in ``SPEC.conversions`` (collected from `deploykit.variants.VARIANTS`).

A call of torchvision's functional ``deform_conv2d`` cannot be swapped; `export_translations` gives the exporter
its translation to the same ``deploykit::DeformConv2d`` node instead.

    from deploykit import convert
    conversion = convert(model)          # a converted deep copy; `model` stays as it was
    conversion.model, conversion.swaps, conversion.left_alone
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from deploykit.errors import DeployError
from deploykit.ops.spec import LayerRule, Unfit


@dataclass(frozen=True)
class Swap:
    """One replaced layer.

    Attributes:
        path: its path in the model, e.g. "layer1.0.conv1" ("" for the model itself).
        source: the original class, qualified, e.g. "modules.odconv.ODConv2d".
        target: the deploykit class, qualified, e.g. "deploykit.nn.odconv.ODConv2d".
    """

    path: str
    source: str
    target: str


@dataclass(frozen=True)
class LeftAlone:
    """A layer whose class name is recognised but whose structure does not fit: kept as it is, never guessed.

    Attributes:
        path, source: as in `Swap`.
        reason: one clause saying what did not fit, e.g. "its state_dict lacks `attention.bn.weight`".
    """

    path: str
    source: str
    reason: str


@dataclass
class Conversion:
    """The converted model and what happened to each recognised layer, in module order."""

    model: nn.Module
    swaps: list[Swap]
    left_alone: list[LeftAlone]

    def as_dict(self) -> dict:
        """The swaps and the layers left alone as plain data (for report.json)."""
        return {"swaps": [asdict(s) for s in self.swaps], "left_alone": [asdict(s) for s in self.left_alone]}


def convert(model: nn.Module, *, inplace: bool = False) -> Conversion:
    """Swap every recognised official / third-party layer in `model` for the deploykit module computing the same.

    Layers are recognised anywhere in the module tree by class name and parameter structure, never by module path
    (users copy official files into their own packages). A swapped layer's parameters and buffers are copied
    exactly, with its non-state attributes (DY-CNN's and ODConv's temperature), device, dtype, train/eval mode and
    frozen parameters; everything else in the model is left as it is, and deploykit's own modules are not touched.
    A layer shared by several parents stays shared.

    Args:
        model: any module (the model itself may be a recognised layer).
        inplace: convert `model` itself instead of a deep copy. Defaults to False, which keeps the original, e.g. as
            the reference a verification compares against.

    Returns:
        The `Conversion`: the converted model (the same object if `inplace`, unless the model itself was swapped),
        its swaps and the look-alikes left alone.
    """
    if not inplace:
        try:
            model = copy.deepcopy(model)
        except Exception as err:  # deepcopy raises whatever a member's __deepcopy__ or pickling raises
            raise DeployError(f"The model cannot be deep-copied ({type(err).__name__}: {err}); convert it with "
                              f"inplace=True.") from err
    rules = _rules_by_name()
    ours = tuple({rule.target for named in rules.values() for rule in named})
    swaps: list[Swap] = []
    left_alone: list[LeftAlone] = []
    visited: dict[int, nn.Module] = {}  # id(original) -> what replaces it (itself if kept)

    def visit(module: nn.Module, path: str) -> nn.Module:
        if id(module) in visited:
            replacement = visited[id(module)]
            if replacement is not module:
                swaps.append(Swap(path, _qualified(type(module)), _qualified(type(replacement))))
            return replacement
        visited[id(module)] = module
        if isinstance(module, ours):
            return module
        reasons = []
        for rule in rules.get(type(module).__name__, ()):
            try:
                replacement = rule.build(module)
            except Unfit as err:
                reasons.append(str(err))
                continue
            visited[id(module)] = replacement
            swaps.append(Swap(path, _qualified(type(module)), _qualified(rule.target)))
            return replacement
        if reasons:
            left_alone.append(LeftAlone(path, _qualified(type(module)), "; ".join(reasons)))
        # _modules, not named_children(), which skips a child already seen under another name.
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            replacement = visit(child, f"{path}.{name}" if path else name)
            if replacement is not child:
                setattr(module, name, replacement)
        return module

    return Conversion(visit(model, ""), swaps, left_alone)


def export_translations(lowering: str | None = None, opset: int | None = None) -> dict:
    """``custom_translation_table`` entries for third-party torch ops that user code calls directly.

    torchvision's ``deform_conv2d`` functional calls ``torch.ops.torchvision.deform_conv2d``; it exports as the same
    ``deploykit::DeformConv2d`` node as deploykit's own layers (or that op's standard lowering, as `lowering` and
    `opset` choose, see `deploykit.export.custom_op.CustomOp.translation`).

    Returns:
        op overload -> translation, for the ops registered in this process (empty when torchvision is not loaded).
    """
    from deploykit.ops.deform_conv2d import torchvision_translation

    foreign: dict[tuple[str, str], Callable] = {("torchvision", "deform_conv2d"): torchvision_translation}
    table = {}
    for (namespace, name), translation in foreign.items():
        try:
            overload = getattr(getattr(torch.ops, namespace), name).default
        except AttributeError:  # the library that registers the op is not loaded
            continue
        table[overload] = translation(lowering or "auto", opset)
    return table


def _rules_by_name() -> dict[str, list[LayerRule]]:
    from deploykit.variants import VARIANTS

    rules: dict[str, list[LayerRule]] = {}
    for spec in VARIANTS:
        for rule in spec.conversions:
            for name in rule.names:
                rules.setdefault(name, []).append(rule)
    return rules


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


__all__ = ["Conversion", "LeftAlone", "Swap", "convert", "export_translations"]
