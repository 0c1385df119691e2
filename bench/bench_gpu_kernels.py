#!/usr/bin/env python3
"""deploykit's CUDA kernels against PyTorch on the GPU (needs a CUDA GPU and nvcc).

    python bench/bench_gpu_kernels.py                    # fp32 and fp16, batch 1 and 8
    python bench/bench_gpu_kernels.py --dtypes fp32 --batches 8

DeformConv2d (v2, 3x3, pad 1, one offset group, with mask), ratio = other / ours (> 1: ours is faster):
  PyTorch reference   deploykit's plain-PyTorch deform_conv2d (embedding_bag + MatMul) on the GPU
  torchvision         torchvision.ops.deform_conv2d (CUDA im2col + GEMM), when torchvision is installed
DynamicConv2d (K=4 kernels, per-sample), ratio = ours / cuDNN static conv of the same shape (< 1.2 is the target):
  ours                kernel mixing + implicit-GEMM conv, one launch each
  PyTorch fold        deploykit's PyTorch op: batch folded into cuDNN conv groups
FP32 runs without TF32 everywhere (true FP32 on both sides). Times are medians of CUDA-event-timed runs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import torch
import torch.nn.functional as F

from deploykit.ops.deform_conv2d import deform_conv2d
from deploykit.ops.dynamic_conv2d import dynamic_conv2d
from deploykit.runtime.kernels import ConvKernels, build_kernels

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
CASES = {"256x28": (256, 28), "512x14": (512, 14), "128x56": (128, 56), "64x56": (64, 56)}


def median_cuda_ms(fn, warmup: int = 10, runs: int = 50) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def torchvision_deform_conv2d():
    try:
        from torchvision.ops import deform_conv2d as tv_deform_conv2d
    except ImportError:
        return None
    return tv_deform_conv2d


def bench_deform(kernels: ConvKernels, channels: int, size: int, batch: int, dtype: torch.dtype) -> dict[str, float]:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, channels, size, size, device="cuda", dtype=dtype, generator=g)
    w = torch.randn(channels, channels, 3, 3, device="cuda", dtype=dtype, generator=g) / (3 * channels ** 0.5)
    offset = torch.randn(batch, 18, size, size, device="cuda", dtype=dtype, generator=g)
    mask = torch.rand(batch, 9, size, size, device="cuda", dtype=dtype, generator=g)
    times = {
        "ours": median_cuda_ms(lambda: kernels.deform_conv2d(x, w, offset, None, mask, [1, 1], [1] * 4, [1, 1], 1, 1)),
        "pytorch": median_cuda_ms(lambda: deform_conv2d(x, offset, w, None, 1, 1, 1, mask)),
        "static conv": median_cuda_ms(lambda: F.conv2d(x, w, None, 1, 1)),
    }
    tv = torchvision_deform_conv2d()
    if tv is not None:
        times["torchvision"] = median_cuda_ms(lambda: tv(x, offset, w, None, 1, 1, 1, mask))
    return times


def bench_dynamic(kernels: ConvKernels, channels: int, size: int, batch: int,
                  dtype: torch.dtype) -> dict[str, float]:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, channels, size, size, device="cuda", dtype=dtype, generator=g)
    bank = torch.randn(4, channels, channels, 3, 3, device="cuda", dtype=dtype, generator=g) / (3 * channels ** 0.5)
    attention = torch.softmax(torch.randn(batch, 4, device="cuda", generator=g), 1).to(dtype)
    bias = torch.zeros(4, channels, device="cuda", dtype=dtype)
    taps = torch.ones(1, 3, 3, device="cuda", dtype=dtype)
    return {
        "ours": median_cuda_ms(lambda: kernels.dynamic_conv2d(x, bank, attention, None, None, [1, 1], [1] * 4,
                                                              [1, 1], 1)),
        "pytorch fold": median_cuda_ms(lambda: dynamic_conv2d(x, bank, attention, bias, taps, [1, 1], [1] * 4,
                                                              [1, 1], 1)),
        "static conv": median_cuda_ms(lambda: F.conv2d(x, bank[0], None, 1, 1)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=["256x28", "512x14", "128x56"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "fp16"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu_kernels needs a CUDA GPU; none is visible to PyTorch.", file=sys.stderr)
        return 2
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    kernels = ConvKernels(build_kernels(tempfile.mkdtemp(prefix="deploykit-kernels-")))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"torchvision: {'yes' if torchvision_deform_conv2d() else 'not installed'}")
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for case in args.cases:
            channels, size = CASES[case]
            for batch in args.batches:
                d = bench_deform(kernels, channels, size, batch, dtype)
                line = (f"DeformConv2d  {dtype_name} {case} b{batch}: ours {d['ours']:.3f} ms, PyTorch ref "
                        f"{d['pytorch']:.3f} ms ({d['pytorch'] / d['ours']:.2f}x)")
                if "torchvision" in d:
                    line += f", torchvision {d['torchvision']:.3f} ms ({d['torchvision'] / d['ours']:.2f}x)"
                print(line + f", static cuDNN conv {d['static conv']:.3f} ms")
                y = bench_dynamic(kernels, channels, size, batch, dtype)
                print(f"DynamicConv2d {dtype_name} {case} b{batch}: ours {y['ours']:.3f} ms "
                      f"({y['ours'] / y['static conv']:.2f}x static cuDNN {y['static conv']:.3f} ms), PyTorch fold "
                      f"{y['pytorch fold']:.3f} ms ({y['pytorch fold'] / y['static conv']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
