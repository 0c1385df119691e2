"""The model zoo: architecture names -> builders, with the input each model expects.

Installed, this folder is the package `deploykit.models`; in a checkout it is also importable as `models`
(`python -m models scnet50 -o scnet50.pt`). The registry is a plain dict: one visible line per model.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deploykit.errors import DeployError
from deploykit.images import FACE_BGR, IMAGENET, INCEPTION, Preprocessing
from deploykit.inputs import structured_noise

from . import acmix, dcn, dyconv, efficientnet_cc, odconv, scnet, tvconv


@dataclass(frozen=True)
class ModelSpec:
    """How to build one zoo model and what it takes as input."""

    builder: Callable[..., nn.Module]
    input_shape: tuple[int, ...]  # one sample, without the batch dimension
    summary: str
    fixed_size: bool = False  # the model takes only `input_shape` (e.g. TVConv's per-pixel weights)
    min_size: int = 32  # the smallest height and width it takes, and the least a dynamic spatial export accepts
    min_size_reason: str | None = None  # why, when smaller inputs fail: then they are refused before running it
    static_spatial: str | None = None  # why one file cannot serve every input size, if it cannot (see
    #                                    `check_dynamic_spatial`); fixed-size models cannot either
    preprocessing: Preprocessing = IMAGENET  # how its evaluation images are made (`export.py --images`)
    feature_levels: bool = False  # can return its stages' feature maps as outputs (``out_indices``, a backbone)


# SCConv's calibration branch average-pools by 4 at the last stage (1/32 of the input): 128 = 32 * 4.
_SCNET_MIN_SIZE = 128
_SCNET_REASON = "SCConv pools by 4 at 1/32 of the input, so inputs must be at least 128x128"
_ACMIX_MIN_SIZE = 128
_ACMIX_STATIC = ("its attention windows gather through index tables built for one feature-map size, and every "
                 "stride needs H and W divisible by 32")

MODELS: dict[str, ModelSpec] = {
    "scnet50": ModelSpec(scnet.scnet50, (3, 224, 224), "SCNet-50, self-calibrated convs (MCG-NKU/SCNet)",
                         min_size=_SCNET_MIN_SIZE, min_size_reason=_SCNET_REASON),
    "scnet50_v1d": ModelSpec(scnet.scnet50_v1d, (3, 224, 224), "SCNet-50 with ResNet-D stem and downsampling",
                             min_size=_SCNET_MIN_SIZE, min_size_reason=_SCNET_REASON),
    "scnet101": ModelSpec(scnet.scnet101, (3, 224, 224), "SCNet-101, self-calibrated convs",
                          min_size=_SCNET_MIN_SIZE, min_size_reason=_SCNET_REASON),
    "scnet101_v1d": ModelSpec(scnet.scnet101_v1d, (3, 224, 224), "SCNet-101 with ResNet-D stem and downsampling",
                              min_size=_SCNET_MIN_SIZE, min_size_reason=_SCNET_REASON),
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
                                          "EfficientNet-B0 CondConv, TF port (TF SAME padding, BN eps 1e-3)",
                                          preprocessing=INCEPTION,
                                          static_spatial="TF 'SAME' padding of its strided CondConvs depends on "
                                                         "the input size"),
    "dcn_resnet50": ModelSpec(dcn.dcn_resnet50, (3, 224, 224),
                              "ResNet-50, modulated deformable convs (DCNv2) in stages 3-5, mmdet keys",
                              feature_levels=True),
    "dcnv1_resnet50": ModelSpec(dcn.dcnv1_resnet50, (3, 224, 224),
                                "ResNet-50, deformable convs v1 in stages 3-5, mmdet keys", feature_levels=True),
    **{f"acmix_resnet{depth}": ModelSpec(getattr(acmix, f"acmix_resnet{depth}"), (3, 224, 224),
                                         f"ResNet-{depth} with ACmix bottleneck convs (LeapLabTHU/ACmix): k_att 7, "
                                         f"4 heads", min_size=_ACMIX_MIN_SIZE, static_spatial=_ACMIX_STATIC)
       for depth in (26, 38, 50)},
    "tvconv_mobilenet_v2": ModelSpec(tvconv.tvconv_mobilenet_v2, (3, 96, 96),
                                     "MobileNetV2 1.0 with TVConv, face embedding (JierunChen/TVConv)", True,
                                     preprocessing=FACE_BGR),
    **{f"tvconv_mobilenet_v2_x0_{w}": ModelSpec(partial(tvconv.tvconv_mobilenet_v2, w / 10), (3, 96, 96),
                                                f"MobileNetV2 {w / 10} with TVConv, face embedding", True,
                                                preprocessing=FACE_BGR)
       for w in (1, 2, 3, 5)},
}


def check_dynamic_spatial(arch: str) -> int:
    """The smallest height and width a dynamic spatial export of `arch` accepts; raises `DeployError` (one
    sentence, with the reason) for a model whose file can only take the size it was exported at."""
    spec = model_spec(arch)
    if spec.fixed_size:
        size = "x".join(map(str, spec.input_shape[1:]))
        raise DeployError(f"{arch} cannot export a dynamic spatial size: its per-pixel weights are learned at "
                          f"{size}, the only size it takes.")
    if spec.static_spatial is not None:
        raise DeployError(f"{arch} cannot export a dynamic spatial size: {spec.static_spatial}; export one file per "
                          f"input size instead.")
    return spec.min_size


def arch_from_file_name(path: str | os.PathLike) -> str | None:
    """The zoo architecture a checkpoint's file name names, if any: official names carry a hash
    (``scnet50-dc6a7e87.pth``), converted ones a precision (``od_resnet18_fp16.safetensors``)."""
    stem = Path(path).stem
    for _ in range(2):  # a hash and a precision, in either order
        stem = re.sub(r"-[0-9a-f]{6,}$|[._-](fp16|fp32|bf16|half|float16|bfloat16|float32)$", "", stem)
    return stem if stem in MODELS else None


def model_spec(arch: str) -> ModelSpec:
    """The registry entry for `arch`; an unknown name lists the known ones."""
    try:
        return MODELS[arch]
    except KeyError:
        raise DeployError(f"Unknown architecture {arch!r}; known architectures: {', '.join(sorted(MODELS))}.") \
            from None


def build_model(arch: str, arch_kwargs: Mapping[str, Any] | None = None,
                state_dict: Mapping[str, torch.Tensor] | None = None, hint: str | None = None) -> nn.Module:
    """Build `arch` in eval mode and, when given, load `state_dict` strictly (every key, every shape).

    A mismatch raises `DeployError` naming a few missing, unexpected and mis-shaped keys, which is usually
    enough to tell a wrong `--arch` from a checkpoint with an unstripped wrapper; `hint` ends it (what to check).
    """
    spec = model_spec(arch)
    try:
        model = spec.builder(**dict(arch_kwargs or {}))
    except TypeError as err:
        raise DeployError(f"Cannot build {arch} with arguments {dict(arch_kwargs or {})}: {err}.") from None
    if state_dict is not None:
        state_dict = upgrade_state_dict(model, state_dict)
        check_state_dict(arch, model, state_dict, hint=hint)
        model.load_state_dict(state_dict, strict=True)
    return model.eval()


def upgrade_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename legacy keys to the current layout: every submodule with an ``upgrade_state_dict(prefix, state_dict)``
    hook (e.g. deformable convs, whose offset conv old mmdet checkpoints store as a sibling) rewrites its keys.
    Returns a new dict; `state_dict` is left as is."""
    upgraded = dict(state_dict)
    for name, module in model.named_modules():
        if hasattr(module, "upgrade_state_dict"):
            module.upgrade_state_dict(f"{name}." if name else "", upgraded)
    return upgraded


def random_model(arch: str, seed: int = 0, input_shape: tuple[int, ...] | None = None, calibration_batches: int = 2,
                 batch_size: int = 8, passes: int = 2) -> nn.Module:
    """A seeded random instance of `arch` whose BatchNorm statistics are calibrated, in eval mode.

    Fresh running statistics (mean 0, variance 1) let activations grow by orders of magnitude per stage
    (SCNet-101's logits reach 1e8), so a parity check would test float overflow, not the export. The statistics
    are re-estimated on `structured_noise` images (the kind the pipeline verifies with; calibrated on white noise,
    random ResNets are ill-conditioned) at `input_shape` (one sample, default: the model's native input); the
    weights stay as initialised.

    Convs the official init sets to zero (deformable convs' offset convs) get small random weights and unit
    normal biases instead: offsets of about a pixel that depend mildly on the input, so a random checkpoint
    exercises them rather than a plain conv in disguise. (He-normal weights there make the net chaotic: PyTorch's
    own float32 and float64 outputs of dcn_resnet50 then differ by 6% of the range.)

    BatchNorms on globally pooled features (one value per sample, e.g. ODConv's attention trunk) would get
    degenerate variances from a few samples, so they are normalised by the features' magnitude (second moment)
    instead. Because they steer the main path and the main path feeds them, the two groups are re-estimated in
    turn (`passes` times), each with the other in eval mode, so the statistics match what inference computes.
    """
    spec = model_spec(arch)
    input_shape = tuple(input_shape or spec.input_shape)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = spec.builder()
        for conv in model.modules():
            if isinstance(conv, nn.Conv2d) and not conv.weight.detach().any():
                nn.init.normal_(conv.weight, std=0.1 * conv.weight[0].numel() ** -0.5)
                if conv.bias is not None:
                    nn.init.normal_(conv.bias)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    pooled = _pooled_norms(model, norms, input_shape)
    main = [norm for norm in norms if norm not in pooled]
    batches = [structured_noise(batch_size, input_shape, generator) for _ in range(calibration_batches)]
    _estimate(model, norms, batches)
    for _ in range(passes):
        _normalise_by_magnitude(pooled)
        _estimate(model, main, batches)
        _estimate(model, pooled, batches)
    _normalise_by_magnitude(pooled)
    return model.eval()


def _pooled_norms(model: nn.Module, norms: list[nn.Module], input_shape: tuple[int, ...]) -> set[nn.Module]:
    """The norms whose input has one value per sample and channel (found with one forward pass)."""
    pooled: set[nn.Module] = set()
    hooks = [norm.register_forward_pre_hook(lambda m, args: pooled.add(m) if args[0][0, 0].numel() == 1 else None)
             for norm in norms]
    with torch.no_grad():
        model.eval()(torch.zeros((1, *input_shape)))
    for hook in hooks:
        hook.remove()
    return pooled


def _estimate(model: nn.Module, norms, batches: list[torch.Tensor]) -> None:
    """Re-estimate the running statistics of `norms` (cumulative average); every other module in eval mode."""
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    model.eval()


def _normalise_by_magnitude(norms) -> None:
    for norm in norms:
        norm.running_var += norm.running_mean ** 2


def check_state_dict(arch: str, model: nn.Module, state_dict: Mapping[str, torch.Tensor], shown: int = 3,
                     hint: str | None = None) -> None:
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
                      + f"; {hint or 'check --arch, or that the checkpoint is for this architecture'}.")
