#!/usr/bin/env python3
"""Latency of zoo models: PyTorch eager vs torch.compile (+freezing) vs the exported model in onnxruntime.

    python bench/bench_latency.py --model scnet50                      # 1x3x224x224, 2 threads
    python bench/bench_latency.py --model scnet50 --no-compile --runs 50
    python bench/bench_latency.py --fold-batchnorm --no-compile        # od_resnet50, od_resnet18, dy_resnet18,
                                                                       # efficientnet_cc_b0_4e: ORT before/after
                                                                       # the BatchNorm-folding pass
    python bench/bench_latency.py --int8                               # one zoo model per family: fp32 vs int8
                                                                       # ORT, and their agreement on photos

All runtimes use the same thread count and the same input (structured noise: white noise makes random networks
ill-conditioned). Each is warmed up, then the runtimes are timed in turn, `--runs` rounds of one call each, so
the noise of a shared machine hits every runtime alike; the median is reported with its ratio to eager. Ratios
measured in one run are what to compare across machines. With `--fold-batchnorm` the table gains the export
without `deploykit.export.fold_batchnorm` (every other pass run) and the two ORT files' agreement.
With `--int8` each model is exported, quantized (`deploykit.quantize.quantize_int8`, calibrated on crops of
scikit-image's photos, `bench/photos.py`) and timed against its fp32 file in the same interleaved rounds (median and
best of `--runs`, int8/fp32 ratios), then judged on other photos against PyTorch float32 (`verify_int8`). The zoo's
weights are random (BatchNorms calibrated on noise), so the agreement figures show how faithfully int8 reproduces
these networks, not accuracy on a task (docs/quantization.md says how far they carry).
PyTorch eager on small VMs pays glibc page faults for freed tensors; run with
GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296 to see eager without
them (the table says whether it was set).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from deploykit import log
from deploykit.config import parse_shape
from deploykit.export.onnx import onnx_from_model
from deploykit.export.passes import check, check_folded, fold_constants, infer_shapes, run_passes
from deploykit.images import load_images
from deploykit.inputs import structured_noise
from deploykit.models import MODELS, model_spec, random_model
from deploykit.runtime.ort import session_from_onnx
from deploykit.quantize import BANK_FORM, quantize_int8, verify_int8
from deploykit.verify import rel_to_range, run_torch
from photos import CALIBRATION_PHOTOS, VERIFICATION_PHOTOS, save_crops

FOLD_MODELS = ("od_resnet50", "od_resnet18", "dy_resnet18", "efficientnet_cc_b0_4e")
INT8_MODELS = ("scnet50", "dcn_resnet50", "od_resnet50", "od_resnet18", "dy_resnet18", "efficientnet_cc_b0_4e",
               "acmix_resnet26", "tvconv_mobilenet_v2")
# A pause before each timed call: onnxruntime's intra-op threads keep spinning for a while after a run, and on a
# 2-core machine they would steal the cores from whichever runtime is timed next (measured: the second of two
# identical-cost ORT sessions then ran 1.4-1.7x slower).
_SETTLE_S = 0.05


def interleaved_samples(runtimes: dict[str, Callable[[], object]], runs: int, warmup: int) -> dict[str, list[float]]:
    """Times (ms) of each runtime over `runs` rounds that call every runtime once, after `warmup` untimed calls
    each."""
    for fn in runtimes.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in runtimes}
    for _ in range(runs):
        for name, fn in runtimes.items():
            time.sleep(_SETTLE_S)
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return samples


def interleaved_ms(runtimes: dict[str, Callable[[], object]], runs: int, warmup: int) -> dict[str, tuple[float, float]]:
    """Median and 90th percentile (ms) of each runtime over `interleaved_samples`."""
    samples = interleaved_samples(runtimes, runs, warmup)
    return {name: (statistics.median(s), float(np.percentile(s, 90))) for name, s in samples.items()}


def unfolded_passes(model):
    """Every graph pass but `fold_batchnorm`: the export as it was before that pass existed."""
    model = fold_constants(model)
    check_folded(model)
    model = infer_shapes(model)
    check(model)
    return model


def bench_model(arch: str, args: argparse.Namespace) -> None:
    shape = args.input_shape or (1, *model_spec(arch).input_shape)
    model = random_model(arch)
    x = structured_noise(shape[0], shape[1:], torch.Generator().manual_seed(0)) if len(shape) == 4 else \
        torch.randn(shape, generator=torch.Generator().manual_seed(0))
    feed = {"input": x.numpy()}

    def eager():
        with torch.inference_mode():
            return model(x)

    runtimes: dict[str, Callable[[], object]] = {"PyTorch eager": eager}
    if not args.no_compile:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        compiled = torch.compile(model)
        with torch.no_grad():
            start = time.perf_counter()
            compiled(x)
            print(f"torch.compile + freezing: compiled in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        runtimes["torch.compile + freezing"] = lambda: compiled(x)

    exported = onnx_from_model(model, x, dynamic_batch=True)
    sessions = {"onnxruntime (deploykit export)": session_from_onnx(run_passes(exported)[0], ["cpu"], args.threads)}
    if args.fold_batchnorm:
        sessions = {"onnxruntime, BN not folded": session_from_onnx(unfolded_passes(exported), ["cpu"], args.threads),
                    "onnxruntime, BN folded": sessions["onnxruntime (deploykit export)"]}
    for name, session in sessions.items():
        runtimes[name] = lambda session=session: session.run(None, feed)
    rows = interleaved_ms(runtimes, args.runs, args.warmup)

    eager_ms = rows["PyTorch eager"][0]
    tuned = "set" if "GLIBC_TUNABLES" in os.environ else "not set"
    print(f"\n{arch} {'x'.join(map(str, shape))}, {args.threads} threads, median of {args.runs} interleaved runs "
          f"(GLIBC_TUNABLES {tuned}; torch {torch.__version__})")
    print(f"{'runtime':34} {'median ms':>10} {'p90 ms':>8} {'vs eager':>9}")
    for name, (median, p90) in rows.items():
        print(f"{name:34} {median:10.2f} {p90:8.2f} {median / eager_ms:8.2f}x")
    if args.fold_batchnorm:
        before, after = (rows[name][0] for name in sessions)
        outputs = [session.run(None, feed)[0] for session in sessions.values()]
        print(f"folded / not folded: {after / before:.3f}x; outputs agree to {rel_to_range(*outputs):.1e} of the range")


def bench_int8(arch: str, args: argparse.Namespace, photos: tuple[Path, Path]) -> None:
    """fp32 vs int8 onnxruntime latency in one run, and the int8 file's agreement with PyTorch on photos."""
    spec = model_spec(arch)
    shape = args.input_shape or (1, *spec.input_shape)
    model = random_model(arch)
    calibration = load_images([photos[0]], shape[1:], spec.preprocessing)
    held_out = load_images([photos[1]], shape[1:], spec.preprocessing)
    fp32 = run_passes(onnx_from_model(model, torch.from_numpy(held_out[:shape[0]]), dynamic_batch=True))[0]
    start = time.perf_counter()
    int8 = quantize_int8(fp32, [{"input": calibration[i:i + 8]} for i in range(0, len(calibration), 8)])
    quantized_in = time.perf_counter() - start
    sessions = {"fp32": session_from_onnx(fp32, ["cpu"], args.threads),
                "int8": session_from_onnx(int8.model, ["cpu"], args.threads)}
    feed = {"input": held_out[:shape[0]]}
    samples = interleaved_samples({name: lambda s=s: s.run(None, feed) for name, s in sessions.items()},
                                  args.runs, args.warmup)
    feeds = [{"input": held_out[i:i + 1]} for i in range(len(held_out))]
    verification = verify_int8([{"output": sessions["int8"].run(None, f)[0]} for f in feeds],
                               run_torch(model, feeds, ["output"]))
    median = {name: statistics.median(s) for name, s in samples.items()}
    best = {name: min(s) for name, s in samples.items()}
    dynamic = len(int8.report["dynamic_convs"])
    bank = sum(d["form"] == BANK_FORM for d in int8.report["dynamic_convs"])
    print(f"\n{arch} {'x'.join(map(str, shape))}, {args.threads} threads, {args.runs} interleaved runs; quantized "
          f"in {quantized_in:.0f} s ({dynamic} dynamic convs in int8, {bank} of them in the bank form; "
          f"{len(int8.report['float'])} nodes float)")
    print(f"{'':6} {'median ms':>10} {'best ms':>8}")
    for name in sessions:
        print(f"{name:6} {median[name]:10.2f} {best[name]:8.2f}")
    print(f"int8/fp32: {median['int8'] / median['fp32']:.2f}x median, {best['int8'] / best['fp32']:.2f}x best")
    print(f"agreement: {verification.describe()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model", nargs="+", choices=sorted(MODELS),
                        help=f"default: scnet50, or {', '.join(FOLD_MODELS)} with --fold-batchnorm")
    parser.add_argument("--input-shape", type=parse_shape, help="default: 1x<native input>")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=30, help="timed rounds (default 30)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (it takes a minute or two)")
    parser.add_argument("--fold-batchnorm", action="store_true",
                        help="also time the export without the BatchNorm-folding pass")
    parser.add_argument("--int8", action="store_true",
                        help=f"fp32 vs int8 onnxruntime and the int8 file's agreement on photos (default models: "
                             f"{', '.join(INT8_MODELS)})")
    args = parser.parse_args(argv)
    log.configure(False)
    torch.set_num_threads(args.threads)
    if args.int8:
        with tempfile.TemporaryDirectory() as scratch:
            photos = (save_crops(Path(scratch) / "calibration", CALIBRATION_PHOTOS),
                      save_crops(Path(scratch) / "verification", VERIFICATION_PHOTOS))
            for arch in args.model or INT8_MODELS:
                bench_int8(arch, args, photos)
        return 0
    for arch in args.model or (FOLD_MODELS if args.fold_batchnorm else ("scnet50",)):
        bench_model(arch, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
