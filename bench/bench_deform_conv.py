#!/usr/bin/env python3
"""Deformable conv v2 (3x3, stride 1, pad 1, one offset group, with mask) against a static conv of the same shape.

    python bench/bench_deform_conv.py                        # 256ch 28x28 and 512ch 14x14, batch 1 and 8
    python bench/bench_deform_conv.py --cases 256x28 --batches 1

Rows (the layer takes x, offset and mask as inputs, so only the op is timed, not the offset conv):
  onnxruntime  static conv                 nn.Conv2d exported by deploykit: the floor
               deploykit::DeformConv2d     the node (body: ONNX DeformConv, onnxruntime's native kernel)
               ONNX DeformConv (bare)      a hand-built single DeformConv node: what the node should cost
               standard-op fallback        --lowering standard (Gather + ReduceSum + MatMul), for opset 18
               sampled form, fp32          the int8 file's form in float (`to_sampled_conv`: GridSample + 1x1 Conv)
               sampled form, int8          that form quantized (`quantize_int8`: the 1x1 conv in int8), its output
                                           quantized again as inside a network (the int8 file keeps only the model's
                                           own outputs in float, and a conv with a float output cannot run in int8)
  PyTorch      static conv                 F.conv2d, eager
               deform_conv2d               deploykit's implementation (embedding_bag + MatMul), eager
Ratios are to the static conv of the same runtime and batch. Shared VMs are noisy: every row is timed in `--rounds`
interleaved rounds and the best median is kept.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
import torch.nn.functional as F

from deploykit.export.onnx import onnx_from_model
from deploykit.export.passes import run_passes
from deploykit.ops.deform_conv2d import OP_TYPE, deform_conv2d, to_sampled_conv
from deploykit.quantize import quantize_int8
from deploykit.runtime.ort import session_from_onnx

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from bench_latency import interleaved_ms  # noqa: E402


class DeformLayer(torch.nn.Module):
    """The op alone: offset and mask are inputs."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight)

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return deform_conv2d(x, offset, self.weight, None, 1, 1, 1, mask)


def bare_deform_conv_model(weight: torch.Tensor) -> onnx.ModelProto:
    channels = weight.shape[1]
    graph = helper.make_graph(
        [helper.make_node("DeformConv", ["input", "weight", "offset", "", "mask"], ["output"], pads=[1, 1, 1, 1])],
        "deform_conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", channels, None, None]),
         helper.make_tensor_value_info("offset", TensorProto.FLOAT, ["batch", 18, None, None]),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", 9, None, None])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
        initializer=[onnx.numpy_helper.from_array(weight.detach().numpy(), "weight")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


def sampled_form(model: onnx.ModelProto) -> onnx.ModelProto:
    [node] = [n for n in model.graph.node if n.op_type == OP_TYPE]
    to_sampled_conv(model, node)
    return model


def requantized_output(model: onnx.ModelProto, feeds: list[dict]) -> onnx.ModelProto:
    """`model` with a uint8 Q/DQ pair on its output, ranged on `feeds`: what a next layer's quantized input gives it."""
    session = session_from_onnx(model, ["cpu"])
    outputs = [session.run(None, feed)[0] for feed in feeds]
    low, high = min(0.0, min(float(o.min()) for o in outputs)), max(0.0, max(float(o.max()) for o in outputs))
    scale = (high - low) / 255
    output = model.graph.output[0].name
    producer = next(node for node in model.graph.node if output in node.output)
    producer.output[list(producer.output).index(output)] = f"{output}_float"
    model.graph.initializer.extend([onnx.numpy_helper.from_array(np.float32(scale), "output_scale"),
                                    onnx.numpy_helper.from_array(np.uint8(round(-low / scale)), "output_zero_point")])
    model.graph.node.extend([
        helper.make_node("QuantizeLinear", [f"{output}_float", "output_scale", "output_zero_point"], ["output_q"]),
        helper.make_node("DequantizeLinear", ["output_q", "output_scale", "output_zero_point"], [output])])
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["256x28", "512x14"], help="CHANNELSxSIZE")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"3x3 stride 1 pad 1, 1 offset group, with mask; {args.threads} threads, best of {args.rounds} medians "
          f"of {args.runs}")
    print(f"{'case':14} {'runtime':12} {'lowering':26} {'ms':>8} {'vs static':>10}")
    for case in args.cases:
        channels, size = (int(v) for v in case.split("x"))
        generator = torch.Generator().manual_seed(channels)
        static = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).eval()
        layer = DeformLayer(static.weight.detach().clone()).eval()

        def example(batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return (torch.randn(batch, channels, size, size, generator=generator),
                    2 * torch.randn(batch, 18, size, size, generator=generator),
                    torch.rand(batch, 9, size, size, generator=generator))

        def session(model: onnx.ModelProto):
            return session_from_onnx(run_passes(model)[0], ["cpu"], threads=args.threads)

        names = ("input", "offset", "mask")
        node_model = run_passes(onnx_from_model(layer, example(2), input_names=names))[0]
        calibration = [dict(zip(names, (t.numpy() for t in example(4)))) for _ in range(2)]
        sessions = {
            "static conv": (session(onnx_from_model(static, example(2)[0])), 1),
            "deploykit::DeformConv2d": (session(onnx_from_model(layer, example(2), input_names=names)), 3),
            "ONNX DeformConv (bare)": (session(bare_deform_conv_model(static.weight)), 3),
            "standard-op fallback": (session(onnx_from_model(layer, example(2), input_names=names,
                                                              lowering="standard")), 3),
            "sampled form, fp32": (session(sampled_form(onnx.ModelProto.FromString(
                node_model.SerializeToString()))), 3),
            "sampled form, int8": (session_from_onnx(requantized_output(
                quantize_int8(node_model, calibration).model, calibration), ["cpu"], threads=args.threads), 3),
        }
        for batch in args.batches:
            inputs = example(batch)
            ort_rows = {name: (lambda s=s, f=dict(zip(names[:n], (t.numpy() for t in inputs))): s.run(None, f))
                        for name, (s, n) in sessions.items()}
            torch_rows = {"static conv": lambda: F.conv2d(inputs[0], static.weight, None, 1, 1),
                          "deform_conv2d": lambda: layer(*inputs)}
            timed = {("onnxruntime", name): fn for name, fn in ort_rows.items()}
            timed.update({("PyTorch", name): fn for name, fn in torch_rows.items()})
            times = {key: float("inf") for key in timed}
            with torch.no_grad():
                for _ in range(args.rounds):
                    for key, (median, _) in interleaved_ms(timed, args.runs, 3).items():
                        times[key] = min(times[key], median)
            for (runtime, name), ms in times.items():
                floor = times[(runtime, "static conv")]
                print(f"{case + ' b' + str(batch):14} {runtime:12} {name:26} {ms:8.2f} {ms / floor:9.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
