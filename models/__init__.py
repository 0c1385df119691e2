"""The model zoo: architecture names -> builders, with the input each model expects.

Installed, this folder is the package `deploykit.models`; in a checkout it is also importable as `models`
(`python -m models scnet50 -o scnet50.pt`). The registry is a plain dict: one visible line per model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deploykit.errors import DeployError

from . import dyconv, efficientnet_cc, odconv, scnet


@dataclass(frozen=True)
class ModelSpec:
    """How to build one zoo model and what it takes as input."""

    builder: Callable[..., nn.Module]
    input_shape: tuple[int, ...]  # one sample, without the batch dimension
    summary: str


MODELS: dict[str, ModelSpec] = {
    "scnet50": ModelSpec(scnet.scnet50, (3, 224, 224), "SCNet-50, self-calibrated convs (MCG-NKU/SCNet)"),
    "scnet50_v1d": ModelSpec(scnet.scnet50_v1d, (3, 224, 224), "SCNet-50 with ResNet-D stem and downsampling"),
    "scnet101": ModelSpec(scnet.scnet101, (3, 224, 224), "SCNet-101, self-calibrated convs"),
    "scnet101_v1d": ModelSpec(scnet.scnet101_v1d, (3, 224, 224), "SCNet-101 with ResNet-D stem and downsampling"),
    "od_resnet18": ModelSpec(odconv.od_resnet18, (3, 224, 224), "ResNet-18 with ODConv (1x), OSVAI/ODConv"),
    "od_resnet18_4x": ModelSpec(partial(odconv.od_resnet18, kernel_num=4), (3, 224, 224), "ResNet-18, ODConv (4x)"),
    "od_resnet50": ModelSpec(odconv.od_resnet50, (3, 224, 224), "ResNet-50 with ODConv (1x), OSVAI/ODConv"),
    "od_resnet50_4x": ModelSpec(partial(odconv.od_resnet50, kernel_num=4), (3, 224, 224), "ResNet-50, ODConv (4x)"),
    "od_mobilenetv2_100": ModelSpec(odconv.od_mobilenetv2_100, (3, 224, 224), "MobileNetV2 1.0 with ODConv (1x)"),
    "od_mobilenetv2_100_4x": ModelSpec(partial(odconv.od_mobilenetv2_100, kernel_num=4), (3, 224, 224),
                                       "MobileNetV2 1.0 with ODConv (4x)"),
    "dy_resnet18": ModelSpec(dyconv.dy_resnet18, (3, 224, 224), "ResNet-18 with dynamic convolution (DY-CNN), T=1"),
    "efficientnet_cc_b0_4e": ModelSpec(efficientnet_cc.efficientnet_cc_b0_4e, (3, 224, 224),
                                       "EfficientNet-B0 with CondConv, 4 experts (timm)"),
    "tf_efficientnet_cc_b0_4e": ModelSpec(efficientnet_cc.tf_efficientnet_cc_b0_4e, (3, 224, 224),
                                          "EfficientNet-B0 CondConv, TF port (TF SAME padding, BN eps 1e-3)"),
}


def model_spec(arch: str) -> ModelSpec:
    """The registry entry for `arch`; an unknown name lists the known ones."""
    try:
        return MODELS[arch]
    except KeyError:
        raise DeployError(f"Unknown architecture {arch!r}; known architectures: {', '.join(sorted(MODELS))}.") \
            from None


def build_model(arch: str, arch_kwargs: Mapping[str, Any] | None = None,
                state_dict: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Build `arch` in eval mode and, when given, load `state_dict` strictly (every key, every shape).

    A mismatch raises `DeployError` naming a few missing, unexpected and mis-shaped keys, which is usually
    enough to tell a wrong `--arch` from a checkpoint with an unstripped wrapper.
    """
    spec = model_spec(arch)
    try:
        model = spec.builder(**dict(arch_kwargs or {}))
    except TypeError as err:
        raise DeployError(f"Cannot build {arch} with arguments {dict(arch_kwargs or {})}: {err}.") from None
    if state_dict is not None:
        check_state_dict(arch, model, state_dict)
        model.load_state_dict(state_dict, strict=True)
    return model.eval()


def random_model(arch: str, seed: int = 0, input_shape: tuple[int, ...] | None = None, calibration_batches: int = 2,
                 batch_size: int = 8) -> nn.Module:
    """A seeded random instance of `arch` whose BatchNorm statistics are calibrated, in eval mode.

    Fresh running statistics (mean 0, variance 1) let activations grow by orders of magnitude per stage
    (SCNet-101's logits reach 1e8), so a parity check would test float overflow, not the export. The statistics
    are therefore re-estimated on random images that have structure at many scales: on white noise every image
    looks alike to a deep network, deep features barely vary across samples, and BatchNorm calibrated on them
    amplifies rounding errors ~10x (fp32 vs fp64 of SCNet-101: 1.8e-4 relative instead of 2e-5). The weights
    themselves stay as initialised. BatchNorms on globally pooled features (one value per sample, e.g. ODConv's
    attention trunk) are normalised by the features' magnitude rather than their small spread across samples.
    Calibrate at the resolution the model will be checked at (`input_shape`, one
    sample without batch; defaults to the model's native input): statistics from another resolution are off.
    """
    spec = model_spec(arch)
    input_shape = tuple(input_shape or spec.input_shape)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = spec.builder()
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    pooled = set()  # norms that see globally pooled features (e.g. ODConv's attention trunk)
    hooks = [norm.register_forward_pre_hook(lambda m, args: pooled.add(m) if args[0][0, 0].numel() == 1 else None)
             for norm in norms]
    with torch.no_grad():
        model.eval()(torch.zeros((1, *input_shape)))
    for hook in hooks:
        hook.remove()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(calibration_batches):
            model(structured_noise(batch_size, input_shape, generator))
        for norm in pooled:
            # Pooled features vary little between samples: normalising by that spread would turn attention
            # logits into near-ties of huge numbers. Normalise by their magnitude (second moment) instead.
            norm.running_var += norm.running_mean ** 2
    return model.eval()


def structured_noise(batch: int, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Random images (C, H, W): smooth noise at a random scale, random contrast and colour cast, plus grain."""
    channels, height, width = shape
    images = []
    for _ in range(batch):
        scale = int(torch.randint(2, 33, (1,), generator=generator))
        smooth = F.interpolate(torch.randn(1, channels, scale, scale, generator=generator), size=(height, width),
                               mode="bilinear", align_corners=False)
        contrast = 0.5 + 1.5 * torch.rand(1, generator=generator)
        cast = 0.5 * torch.randn(1, channels, 1, 1, generator=generator)
        grain = 0.3 * torch.randn(1, channels, height, width, generator=generator)
        images.append(smooth * contrast + cast + grain)
    return torch.cat(images)


def check_state_dict(arch: str, model: nn.Module, state_dict: Mapping[str, torch.Tensor], shown: int = 3) -> None:
    """Raise one readable `DeployError` if `state_dict` does not fit `model` key for key and shape for shape."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                 if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if not (missing or unexpected or misshaped):
        return

    def few(items: list[str]) -> str:
        more = f" and {len(items) - shown} more" if len(items) > shown else ""
        return ", ".join(items[:shown]) + more

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({few(unexpected)})")
    if misshaped:
        parts.append(f"{len(misshaped)} with another shape ({few(misshaped)})")
    raise DeployError(f"The checkpoint's state_dict does not fit {arch}: " + "; ".join(parts)
                      + ". Check --arch, or that the checkpoint is for this architecture.")
