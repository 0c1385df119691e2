#!/usr/bin/env python3
"""DynamicConv2d in onnxruntime against a static conv of the same shape, from deploykit's own exports.

    python bench/bench_dynamic_conv.py                       # 128->128, 3x3, 28x28, K=4, batch 1 and 8
    python bench/bench_dynamic_conv.py --channels 256 --kernel 1

Rows (each exported by deploykit, timed in one process with the same thread count):
  static conv       nn.Conv2d with constant weights: the floor
  weight as input   the same Conv with its weight fed at run time: the floor for any runtime-computed kernel
  DynamicConv2d     a DyConv2d layer exported with a dynamic batch (deploykit::DynamicConv2d, Scan body)
  static batch      the same layer exported with --static-batch (batch folded into conv groups)
Ratios are to the static conv at the same batch size. Shared VMs are noisy: every row is timed in `--rounds`
interleaved rounds and the best median is kept.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from deploykit.export.onnx import onnx_from_model
from deploykit.export.passes import run_passes
from deploykit.nn import DyConv2d
from deploykit.runtime.ort import session_from_onnx

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from bench_latency import median_ms  # noqa: E402


def weight_as_input_model(weight: np.ndarray, padding: int) -> onnx.ModelProto:
    out_c, in_c, k, _ = weight.shape
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "weight"], ["output"], pads=[padding] * 4)], "conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", in_c, None, None]),
         helper.make_tensor_value_info("weight", TensorProto.FLOAT, list(weight.shape))],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--kernel", type=int, default=3)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    c, k, pad = args.channels, args.kernel, args.kernel // 2
    static = torch.nn.Conv2d(c, c, k, padding=pad, bias=False).eval()
    dynamic = DyConv2d(c, c, k, padding=pad, bias=False, K=args.experts, temperature=1.0).eval()

    def session(model: onnx.ModelProto):
        return session_from_onnx(model, ["cpu"], threads=args.threads)

    example = torch.randn(2, c, args.size, args.size)
    sessions = {
        "static conv": session(run_passes(onnx_from_model(static, example))[0]),
        "weight as input": session(weight_as_input_model(static.weight.detach().numpy(), pad)),
        "DynamicConv2d (dynamic batch)": session(run_passes(onnx_from_model(dynamic, example))[0]),
    }
    print(f"{c}->{c} {k}x{k} {args.size}x{args.size} K={args.experts}, {args.threads} threads, "
          f"best of {args.rounds} medians of {args.runs}")
    print(f"{'lowering':34} {'batch':>5} {'ms':>8} {'vs static':>10}")
    for batch in args.batches:
        x = torch.randn(batch, c, args.size, args.size, generator=torch.Generator().manual_seed(batch)).numpy()
        rows = dict(sessions)
        rows["DynamicConv2d (static batch: fold)"] = session(
            run_passes(onnx_from_model(dynamic, torch.from_numpy(x), dynamic_batch=False))[0])
        feeds = {name: {"input": x} for name in rows}
        feeds["weight as input"]["weight"] = static.weight.detach().numpy()
        times = {name: float("inf") for name in rows}
        for _ in range(args.rounds):
            for name, s in rows.items():
                ms = median_ms(lambda s=s, f=feeds[name]: s.run(None, f), args.runs, 10)[0]
                times[name] = min(times[name], ms)
        for name, ms in times.items():
            print(f"{name:34} {batch:5d} {ms:8.3f} {ms / times['static conv']:9.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
