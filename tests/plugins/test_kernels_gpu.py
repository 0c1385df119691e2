"""The CUDA kernels on a GPU: built with nvcc for this machine's GPU, compared with the float64 references and with
deploykit's PyTorch ops on the same CUDA tensors, on randomized configs; fp32 within 1e-4 and fp16 within 1e-2 of
the output's range. Marked `gpu` (deselected by default; run with ``pytest -m gpu``)."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import CASES, MAKE_CASE, deform_case, dynamic_case, rel_error, run_case

from deploykit.ops.deform_conv2d import deform_conv2d
from deploykit.ops.dynamic_conv2d import dynamic_conv2d
from deploykit.runtime.kernels import ConvKernels, build_kernels, nvcc_path

pytestmark = pytest.mark.gpu
TOLERANCES = [(torch.float32, 1e-4), (torch.float16, 1e-2)]


@pytest.fixture(scope="module")
def kernels(tmp_path_factory) -> ConvKernels:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: the kernels can only be compiled here (tests/plugins/test_build.py)")
    if nvcc_path() is None:
        pytest.skip("nvcc is not installed: the kernels cannot be built")
    torch.backends.cudnn.allow_tf32 = False  # the PyTorch comparisons below run in true fp32
    torch.backends.cuda.matmul.allow_tf32 = False
    return ConvKernels(build_kernels(tmp_path_factory.mktemp("kernels")))


@pytest.mark.parametrize("dtype,tolerance", TOLERANCES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("seed", range(CASES))
@pytest.mark.parametrize("op", sorted(MAKE_CASE))
def test_kernel_matches_the_float64_reference(kernels, op, seed, dtype, tolerance):
    case = MAKE_CASE[op](seed)
    y = run_case(kernels, op, case, "cuda", dtype)
    torch.cuda.synchronize()
    assert y.dtype == dtype and rel_error(y, case.expected) <= tolerance


@pytest.mark.parametrize("seed", range(6))
def test_kernels_match_the_pytorch_ops_on_the_gpu(kernels, seed):
    """Same CUDA inputs through deploykit's PyTorch ops (what the layers call) and through the kernels."""
    deform, dynamic = deform_case(seed), dynamic_case(seed)
    t = deform.to("cuda", torch.float32)
    a = deform.attributes
    if a["pads"][:2] == a["pads"][2:]:  # the functional op takes symmetric padding
        expected = deform_conv2d(t["X"], t["offset"], t["W"], t["B"], a["strides"], a["pads"][:2], a["dilations"],
                                 t["mask"])
        actual = kernels.deform_conv2d(t["X"], t["W"], t["offset"], t["B"], t["mask"], **a)
        assert rel_error(actual, expected.double().cpu().numpy()) <= 1e-4
    t = dynamic.to("cuda", torch.float32)
    k = t["W"].shape[-1]
    bias = t["B"] if t["B"] is not None else torch.zeros(t["W"].shape[:2], device="cuda")
    taps = t["S"] if t["S"] is not None else torch.ones(1, k, k, device="cuda")
    expected = dynamic_conv2d(t["X"], t["W"], t["A"], bias, taps, dynamic.attributes["strides"],
                              dynamic.attributes["pads"], dynamic.attributes["dilations"], dynamic.attributes["group"])
    actual = kernels.dynamic_conv2d(t["X"], t["W"], t["A"], t["B"], t["S"], **dynamic.attributes)
    assert rel_error(actual, expected.double().cpu().numpy()) <= 1e-4


def test_large_batch_and_channels(kernels):
    """A ResNet-sized layer at batch 8: many tiles in every grid dimension."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(8, 256, 28, 28, device="cuda", generator=g)
    w = torch.randn(256, 256, 3, 3, device="cuda", generator=g) / 48
    offset = torch.randn(8, 18, 28, 28, device="cuda", generator=g)
    mask = torch.rand(8, 9, 28, 28, device="cuda", generator=g)
    bias = torch.randn(256, device="cuda", generator=g)
    expected = deform_conv2d(x, offset, w, bias, (1, 1), (1, 1), (1, 1), mask)
    actual = kernels.deform_conv2d(x, w, offset, bias, mask, [1, 1], [1, 1, 1, 1], [1, 1], 1, 1)
    assert rel_error(actual, expected.double().cpu().numpy()) <= 1e-4
