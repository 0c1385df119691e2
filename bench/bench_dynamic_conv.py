#!/usr/bin/env python3
"""DynamicConv2d in onnxruntime against a static conv of the same shape, from deploykit's own exports.

    python bench/bench_dynamic_conv.py                       # 128->128, 3x3, 28x28, K=4, batch 1 and 8
    python bench/bench_dynamic_conv.py --channels 256 --kernel 1
    python bench/bench_dynamic_conv.py --int8                # int8 forms per layer shape, ODConv then DyConv

Rows (each exported by deploykit, timed in one process with the same thread count):
  static conv       nn.Conv2d with constant weights: the floor
  weight as input   the same Conv with its weight fed at run time: the floor for any runtime-computed kernel
  DynamicConv2d     a DyConv2d layer exported with a dynamic batch (deploykit::DynamicConv2d, Scan body)
  static batch      the same layer exported with --static-batch (batch folded into conv groups)
Ratios are to the static conv at the same batch size. Shared VMs are noisy: every row is timed in `--rounds`
interleaved rounds and the best median is kept.

With --int8: for each `--layers` shape, one ODConv (K=`--experts`) and one DyConv layer followed by BatchNorm and
ReLU, quantized in each of the two int8 forms of a dense dynamic conv (per-sample kernel; bank, docs/quantization.md
"Weight-bound layers"), timed against the fp32 node in interleaved runs, with each form's SQNR against fp32.
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
from deploykit import quantize
from deploykit.inputs import structured_noise
from deploykit.nn import DyConv2d, ODConv2d
from deploykit.runtime.ort import session_from_onnx

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from bench_latency import interleaved_ms  # noqa: E402


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
    parser.add_argument("--int8", action="store_true", help="time the two int8 forms per layer shape")
    parser.add_argument("--layers", nargs="+", default=["512x7", "256x14", "128x28", "64x56"],
                        help="channels x size, for --int8")
    args = parser.parse_args(argv)
    if args.int8:
        return int8_forms(args)
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
        runtimes = {name: (lambda s=s, f=feeds[name]: s.run(None, f)) for name, s in rows.items()}
        times = {name: float("inf") for name in rows}
        for _ in range(args.rounds):
            for name, (median, _) in interleaved_ms(runtimes, args.runs, 10).items():
                times[name] = min(times[name], median)
        for name, ms in times.items():
            print(f"{name:34} {batch:5d} {ms:8.3f} {ms / times['static conv']:9.2f}x")
    return 0


def int8_forms(args: argparse.Namespace) -> int:
    """Per layer shape and family: int8 time / fp32 time of the per-sample kernel form and of the bank form."""
    print(f"int8 forms of a dense dynamic conv (+ BatchNorm + ReLU), K={args.experts}, {args.threads} threads, "
          f"medians of {args.runs} interleaved runs; ratios to the fp32 node")
    print(f"{'layer':16} {'batch':>5} {'fp32 ms':>8} {'per-sample kernel':>18} {'bank':>14} {'SQNR dB (kernel / bank)':>24}")
    for shape in args.layers:
        channels, size = (int(v) for v in shape.split("x"))
        for family, layer in (("ODConv", ODConv2d(channels, channels, 3, padding=1, kernel_num=args.experts)),
                              ("DyConv", DyConv2d(channels, channels, 3, padding=1, bias=False, K=args.experts))):
            net = torch.nn.Sequential(layer, torch.nn.BatchNorm2d(channels), torch.nn.ReLU()).eval()
            fp32 = run_passes(onnx_from_model(net, torch.randn(2, channels, size, size)))[0]
            calibration = [{"input": structured_noise(4, (channels, size, size),
                                                      torch.Generator().manual_seed(seed)).numpy()}
                           for seed in range(2)]
            forms, default = {}, quantize.BANK_FORM_MIN_WEIGHTS_PER_PIXEL
            for form, threshold in (("kernel", float("inf")), ("bank", 0.0)):
                quantize.BANK_FORM_MIN_WEIGHTS_PER_PIXEL = threshold  # force the form for the comparison
                forms[form] = quantize.quantize_int8(fp32, calibration).model
            quantize.BANK_FORM_MIN_WEIGHTS_PER_PIXEL = default
            sessions = {"fp32": session_from_onnx(fp32, ["cpu"], args.threads),
                        **{form: session_from_onnx(model, ["cpu"], args.threads) for form, model in forms.items()}}
            for batch in args.batches:
                feed = {"input": structured_noise(batch, (channels, size, size),
                                                  torch.Generator().manual_seed(99)).numpy()}
                runtimes = {name: (lambda s=s: s.run(None, feed)) for name, s in sessions.items()}
                ms = {name: median for name, (median, _) in interleaved_ms(runtimes, args.runs, 5).items()}
                expected = sessions["fp32"].run(None, feed)[0]
                sqnr = [quantize.sqnr_db(sessions[f].run(None, feed)[0], expected) for f in ("kernel", "bank")]
                print(f"{family + ' ' + shape:16} {batch:5d} {ms['fp32']:8.2f} {ms['kernel'] / ms['fp32']:17.2f}x "
                      f"{ms['bank'] / ms['fp32']:13.2f}x {sqnr[0]:11.1f} / {sqnr[1]:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
