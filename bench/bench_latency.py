#!/usr/bin/env python3
"""Latency of zoo models: PyTorch eager vs torch.compile (+freezing) vs the exported model in onnxruntime.

    python bench/bench_latency.py --model scnet50                      # 1x3x224x224, 2 threads
    python bench/bench_latency.py --model scnet50 --no-compile --runs 50
    python bench/bench_latency.py --fold-batchnorm --no-compile        # od_resnet50, od_resnet18, dy_resnet18,
                                                                       # efficientnet_cc_b0_4e: ORT before/after
                                                                       # the BatchNorm-folding pass

All runtimes use the same thread count and the same input (structured noise: white noise makes random networks
ill-conditioned). Each is warmed up, then the runtimes are timed in turn, `--runs` rounds of one call each, so
the noise of a shared machine hits every runtime alike; the median is reported with its ratio to eager. Ratios
measured in one run are what to compare across machines. With `--fold-batchnorm` the table gains the export
without `deploykit.export.fold_batchnorm` (every other pass run) and the two ORT files' agreement.
PyTorch eager on small VMs pays glibc page faults for freed tensors; run with
GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296 to see eager without
them (the table says whether it was set).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from deploykit import log
from deploykit.config import parse_shape
from deploykit.export.onnx import onnx_from_model
from deploykit.export.passes import check, check_folded, fold_constants, infer_shapes, run_passes
from deploykit.inputs import structured_noise
from deploykit.models import MODELS, model_spec, random_model
from deploykit.runtime.ort import session_from_onnx
from deploykit.verify import rel_to_range

FOLD_MODELS = ("od_resnet50", "od_resnet18", "dy_resnet18", "efficientnet_cc_b0_4e")
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
    args = parser.parse_args(argv)
    log.configure(False)
    torch.set_num_threads(args.threads)
    for arch in args.model or (FOLD_MODELS if args.fold_batchnorm else ("scnet50",)):
        bench_model(arch, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
