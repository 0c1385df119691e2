"""The GPU kernels' code, run on the CPU by tests/plugins/host_emulator.cpp (the same forward passes, tiles and
samplers as the .cu launchers, block by block), against the float64 references on randomized configs.

This checks the kernels' indexing, tiling, bounds, offset/mask layout and per-sample weights without a GPU; what
it cannot check (launch configuration, barriers, the GPU's own arithmetic) the `gpu` tests do."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import CASES, MAKE_CASE, build_emulator, rel_error, run_case

from deploykit.runtime.kernels import ConvKernels


@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> ConvKernels:
    return build_emulator(tmp_path_factory.mktemp("emulator"))


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-4), (torch.float16, 1e-2)], ids=["fp32", "fp16"])
@pytest.mark.parametrize("seed", range(CASES))
@pytest.mark.parametrize("op", sorted(MAKE_CASE))
def test_kernel_matches_the_float64_reference(emulator, op, seed, dtype, tolerance):
    case = MAKE_CASE[op](seed)
    y = run_case(emulator, op, case, "cpu", dtype)
    assert y.dtype == dtype and y.shape == case.expected.shape
    assert rel_error(y, case.expected) <= tolerance


def test_invalid_shape_is_refused_not_run(emulator):
    x, w = torch.randn(1, 6, 8, 8), torch.randn(4, 3, 3, 3)
    offset = torch.randn(1, 18, 6, 6)
    with pytest.raises(Exception, match="not describe a valid convolution"):
        emulator.deform_conv2d(x, w, offset, None, None, [1, 1], [0, 0, 0, 0], [1, 1], group=4, offset_group=1)
