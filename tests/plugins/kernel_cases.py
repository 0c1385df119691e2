"""Randomized inputs for the GPU kernels' launchers, with their float64 references, shared by the host-emulator
tests (CPU) and the GPU tests. Shapes are chosen to cross the kernels' tile edges: more than 64 output channels or
pixels, reductions that are not multiples of 16, depthwise and grouped convs, asymmetric pads, batch 1 and 3."""

from __future__ import annotations

import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from deploykit.ops.deform_conv2d import deform_conv2d_reference
from deploykit.ops.dynamic_conv2d import dynamic_conv2d_reference, output_size
from deploykit.runtime.kernels import PLUGINS_DIR, ConvKernels, cuda_home

CASES = 24
EMULATOR_SOURCE = Path(__file__).with_name("host_emulator.cpp")
CUDA_INCLUDE = cuda_home() / "include"


def build_emulator(directory: Path) -> ConvKernels:
    """Compile host_emulator.cpp with the host compiler (skips the calling test where it cannot be built)."""
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ is not installed: the host emulator of the kernels cannot be built")
    if not (CUDA_INCLUDE / "cuda_fp16.h").is_file():
        pytest.skip(f"{CUDA_INCLUDE}/cuda_fp16.h is missing: the kernels' headers need the CUDA toolkit's headers")
    library = directory / "libemulator.so"
    command = [compiler, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
               f"-I{CUDA_INCLUDE}", f"-I{PLUGINS_DIR}", str(EMULATOR_SOURCE), "-o", str(library)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return ConvKernels(library, symbol_prefix="emulate")


@dataclass
class Case:
    tensors: dict[str, torch.Tensor | None]
    attributes: dict
    expected: np.ndarray

    def to(self, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor | None]:
        return {name: None if t is None else t.to(device, dtype).contiguous() for name, t in self.tensors.items()}


def _geometry(rng: random.Random) -> dict:
    kind = rng.choice(["dense", "grouped", "depthwise"])
    channels = rng.choice([3, 8, 12]) if kind != "grouped" else rng.choice([4, 8])
    group = {"dense": 1, "grouped": 2, "depthwise": channels}[kind]
    out_channels = channels if kind == "depthwise" else rng.choice([6, 70, 130])
    kernel = rng.choice([1, 3, 5])
    return dict(channels=channels, out_channels=out_channels, kernel=kernel, group=group,
                strides=[rng.choice([1, 2]), rng.choice([1, 2])], dilations=[rng.choice([1, 2]), rng.choice([1, 2])],
                pads=[rng.randint(0, 2) for _ in range(4)], batch=rng.choice([1, 3]),
                height=rng.randint(9, 14), width=rng.randint(9, 17))


def deform_case(seed: int) -> Case:
    rng = random.Random(seed)
    geo = _geometry(rng)
    offset_group = rng.choice([g for g in (1, 2, 3) if geo["channels"] % g == 0])
    masked, biased = rng.random() < 0.7, rng.random() < 0.7
    g = torch.Generator().manual_seed(seed)
    n, k = geo["batch"], geo["kernel"]
    out_h, out_w = output_size((geo["height"], geo["width"]), (k, k), geo["strides"], geo["pads"], geo["dilations"])
    tensors = dict(
        X=torch.randn(n, geo["channels"], geo["height"], geo["width"], generator=g, dtype=torch.float64),
        W=torch.randn(geo["out_channels"], geo["channels"] // geo["group"], k, k, generator=g, dtype=torch.float64),
        offset=rng.choice([1.0, 3.0]) * torch.randn(n, 2 * offset_group * k * k, out_h, out_w, generator=g,
                                                     dtype=torch.float64),
        B=torch.randn(geo["out_channels"], generator=g, dtype=torch.float64) if biased else None,
        mask=torch.rand(n, offset_group * k * k, out_h, out_w, generator=g, dtype=torch.float64) if masked else None)
    attributes = dict(strides=geo["strides"], pads=geo["pads"], dilations=geo["dilations"], group=geo["group"],
                      offset_group=offset_group)
    expected = deform_conv2d_reference(
        tensors["X"], tensors["W"], tensors["offset"],
        tensors["B"] if biased else np.zeros(geo["out_channels"]),
        tensors["mask"] if masked else np.ones((n, offset_group * k * k, out_h, out_w)), **attributes)
    return Case(tensors, attributes, expected)


def dynamic_case(seed: int) -> Case:
    rng = random.Random(seed)
    geo = _geometry(rng)
    experts = rng.choice([1, 4, 8])
    taps_kind = rng.choice(["none", "shared", "per_sample"])
    biased = rng.random() < 0.7
    g = torch.Generator().manual_seed(seed)
    n, k = geo["batch"], geo["kernel"]
    tap_samples = {"none": 1, "shared": 1, "per_sample": n}[taps_kind]
    tensors = dict(
        X=torch.randn(n, geo["channels"], geo["height"], geo["width"], generator=g, dtype=torch.float64),
        W=torch.randn(experts, geo["out_channels"], geo["channels"] // geo["group"], k, k, generator=g,
                      dtype=torch.float64),
        A=torch.softmax(torch.randn(n, experts, generator=g, dtype=torch.float64), dim=1),
        B=torch.randn(experts, geo["out_channels"], generator=g, dtype=torch.float64) if biased else None,
        S=None if taps_kind == "none" else torch.rand(tap_samples, k, k, generator=g, dtype=torch.float64) + 0.5)
    attributes = dict(strides=geo["strides"], pads=geo["pads"], dilations=geo["dilations"], group=geo["group"])
    expected = dynamic_conv2d_reference(
        tensors["X"], tensors["W"], tensors["A"],
        tensors["B"] if biased else np.zeros((experts, geo["out_channels"])),
        tensors["S"] if tensors["S"] is not None else np.ones((1, k, k)), **attributes)
    return Case(tensors, attributes, expected)


def rel_error(actual: torch.Tensor, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected|."""
    actual = actual.detach().double().cpu().numpy()
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def run_case(kernels: ConvKernels, op: str, case: Case, device: str, dtype: torch.dtype) -> torch.Tensor:
    """Call the launcher of `op` ("deform_conv2d" or "dynamic_conv2d") on the case's tensors."""
    t = case.to(device, dtype)
    if op == "deform_conv2d":
        return kernels.deform_conv2d(t["X"], t["W"], t["offset"], t["B"], t["mask"], **case.attributes)
    return kernels.dynamic_conv2d(t["X"], t["W"], t["A"], t["B"], t["S"], **case.attributes)


MAKE_CASE = {"deform_conv2d": deform_case, "dynamic_conv2d": dynamic_case}
