#!/usr/bin/env python3
"""Latency of a zoo model: PyTorch eager vs torch.compile (+freezing) vs the exported model in onnxruntime.

    python bench/bench_latency.py --model scnet50                      # 1x3x224x224, 2 threads
    python bench/bench_latency.py --model scnet50 --no-compile --runs 50

All runtimes use the same thread count and the same input; each is warmed up, then timed `--runs` times, and the
median is reported with its ratio to eager. Ratios measured in one run are what to compare across machines.
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
from deploykit.export.passes import run_passes
from deploykit.models import MODELS, model_spec, random_model
from deploykit.runtime.ort import session_from_onnx


def median_ms(fn: Callable[[], object], runs: int, warmup: int) -> tuple[float, float]:
    """Median and 90th percentile of `runs` timed calls after `warmup` untimed ones, in milliseconds."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples), float(np.percentile(samples, 90))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model", default="scnet50", choices=sorted(MODELS))
    parser.add_argument("--input-shape", type=parse_shape, help="default: 1x<native input>")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=30, help="timed runs per runtime (default 30)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (it takes a minute or two)")
    args = parser.parse_args(argv)
    log.configure(False)

    shape = args.input_shape or (1, *model_spec(args.model).input_shape)
    torch.set_num_threads(args.threads)
    model = random_model(args.model)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    rows: list[tuple[str, float, float]] = []

    with torch.inference_mode():
        rows.append(("PyTorch eager", *median_ms(lambda: model(x), args.runs, args.warmup)))
    if not args.no_compile:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        compiled = torch.compile(model)
        with torch.no_grad():
            start = time.perf_counter()
            compiled(x)
            print(f"torch.compile + freezing: compiled in {time.perf_counter() - start:.0f} s", file=sys.stderr)
            rows.append(("torch.compile + freezing", *median_ms(lambda: compiled(x), args.runs, args.warmup)))

    onnx_model, _ = run_passes(onnx_from_model(model, x, dynamic_batch=True))
    session = session_from_onnx(onnx_model, ["cpu"], threads=args.threads)
    feed = {"input": x.numpy()}
    rows.append(("onnxruntime (deploykit export)", *median_ms(lambda: session.run(None, feed), args.runs,
                                                              args.warmup)))

    eager = rows[0][1]
    tuned = "set" if "GLIBC_TUNABLES" in os.environ else "not set"
    print(f"\n{args.model} {'x'.join(map(str, shape))}, {args.threads} threads, median of {args.runs} runs "
          f"(GLIBC_TUNABLES {tuned}; torch {torch.__version__})")
    print(f"{'runtime':34} {'median ms':>10} {'p90 ms':>8} {'vs eager':>9}")
    for name, median, p90 in rows:
        print(f"{name:34} {median:10.2f} {p90:8.2f} {median / eager:8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
