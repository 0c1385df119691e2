#!/usr/bin/env python3
"""TVConv's per-pixel depthwise conv in onnxruntime, folded weights, against its memory-bandwidth floor.

    python bench/bench_tvconv.py                    # C=64, 56x56, 3x3, batch 1
    python bench/bench_tvconv.py --channels 32 --size 48 --batch 4

The layer must stream C*k*k*H*W per-pixel weights (7.2 MB at the default shape) on every run, so its floor is
memory bandwidth, not a plain depthwise conv. The floor is measured in the same run: onnxruntime summing a tensor
of the weights' size over its tap axis (one read of the weights, one write of the output).

Rows (onnxruntime unless marked; ratio to the floor):
  floor                  ReduceSum over a [k*k, N*C, H, W] input: the least any graph that reads the weights can do
  deploykit export       TVConv exported by deploykit, weight generator folded into initializers (its form: a
                         depthwise Conv with one-hot kernels for all k*k shifts, one Mul, one ReduceSum)
  slices + Sum           Pad, k*k strided Slices, Mul by each tap's weights, one variadic Sum (the eager form)
  one-hot conv           the same shift Conv and Mul, the taps summed by a grouped 1x1 Conv of ones
  unfold as is           the official formulation (nn.Unfold, Mul, ReduceSum) exported with its weights folded
  depthwise conv         a plain depthwise Conv: different work (shared weights), for scale
  PyTorch eager          the module's per-pixel conv in eager PyTorch
Every row is timed in `--rounds` interleaved rounds and the best median is kept.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from deploykit.export.onnx import onnx_from_model
from deploykit.export.passes import run_passes
from deploykit.nn.tvconv import TVConv, pixelwise_depthwise_conv2d
from deploykit.runtime.ort import session_from_onnx

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from bench_latency import interleaved_ms  # noqa: E402


class UnfoldTVConv(torch.nn.Module):
    """The official forward (nn.Unfold, multiply, sum over taps) with fixed weights [C, k*k, H, W]."""

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weights", weights[None])
        k = int(round(weights.shape[1] ** 0.5))
        self.unfold = torch.nn.Unfold(k, 1, (k - 1) // 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.weights * self.unfold(x).view(x.shape[0], *self.weights.shape[1:])).sum(dim=2)


def _model(nodes, inputs, initializers) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "bench", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.ascontiguousarray(a, np.float32), n)
                               for n, a in initializers.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


def _input(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def slices_sum_model(weights: np.ndarray, batch: int) -> onnx.ModelProto:
    channels, taps, height, width = weights.shape
    k = int(round(taps ** 0.5))
    nodes = [helper.make_node("Pad", ["x", "pads"], ["padded"])]
    initializers = {"pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)}
    for t in range(taps):
        p, q = divmod(t, k)
        initializers.update({f"start{t}": np.array([p, q]), f"end{t}": np.array([p + height, q + width]),
                             f"w{t}": weights[:, t]})
        nodes += [helper.make_node("Slice", ["padded", f"start{t}", f"end{t}", "axes"], [f"s{t}"]),
                  helper.make_node("Mul", [f"s{t}", f"w{t}"], [f"m{t}"])]
    initializers = {k: v.astype(np.int64) if k.startswith(("start", "end")) else v for k, v in initializers.items()}
    initializers["axes"] = np.array([2, 3], np.int64)
    nodes.append(helper.make_node("Sum", [f"m{t}" for t in range(taps)], ["y"]))
    model = _model(nodes, [_input("x", (batch, channels, height, width))], {})
    model.graph.initializer.extend(numpy_helper.from_array(np.asarray(v), n) for n, v in initializers.items())
    return model


def one_hot_conv_model(weights: np.ndarray, batch: int) -> onnx.ModelProto:
    channels, taps, height, width = weights.shape
    k = int(round(taps ** 0.5))
    shifts = np.zeros((channels * taps, 1, k, k), np.float32)
    for c in range(channels):
        for t in range(taps):
            shifts[c * taps + t, 0, t // k, t % k] = 1
    nodes = [helper.make_node("Conv", ["x", "shifts"], ["windows"], group=channels, pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["windows", "w"], ["products"]),
             helper.make_node("Conv", ["products", "ones"], ["y"], group=channels)]
    return _model(nodes, [_input("x", (batch, channels, height, width))],
                  {"shifts": shifts, "w": weights.reshape(1, channels * taps, height, width),
                   "ones": np.ones((channels, taps, 1, 1))})


def floor_model(weights: np.ndarray, batch: int) -> onnx.ModelProto:
    channels, taps, height, width = weights.shape
    nodes = [helper.make_node("ReduceSum", ["stream", "axis"], ["y"], keepdims=0)]
    model = _model(nodes, [_input("stream", (taps, batch * channels, height, width))], {})
    model.graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), "axis"))
    return model


def depthwise_model(channels: int, size: int, batch: int) -> onnx.ModelProto:
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], group=channels, pads=[1, 1, 1, 1])]
    return _model(nodes, [_input("x", (batch, channels, size, size))],
                  {"w": np.random.default_rng(0).standard_normal((channels, 1, 3, 3))})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=56)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    c, size, n = args.channels, args.size, args.batch
    layer = TVConv(c, 3, 1, 4, 64, 3, False, size, size).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
        weights = layer.weight_maps()
    x = torch.randn(n, c, size, size)
    w = weights.numpy()

    def session(model: onnx.ModelProto, fold: bool = False):
        return session_from_onnx(run_passes(model)[0] if fold else model, ["cpu"], threads=args.threads)

    feeds = {"x": x.numpy()}
    rows = {
        "floor (stream the weights)": (session(floor_model(w, n)),
                                       {"stream": np.repeat(w.transpose(1, 0, 2, 3), n, axis=1).copy()}),
        "deploykit export": (session(onnx_from_model(layer, x, dynamic_batch=False, input_names=["x"]), fold=True),
                             feeds),
        "slices + Sum": (session(slices_sum_model(w, n)), feeds),
        "one-hot conv": (session(one_hot_conv_model(w, n)), feeds),
        "unfold as is": (session(onnx_from_model(UnfoldTVConv(weights), x, dynamic_batch=False, input_names=["x"]),
                                 fold=True), feeds),
        "depthwise conv (other work)": (session(depthwise_model(c, size, n)), feeds),
    }
    timed = {name: (lambda s=s, f=f: s.run(None, f)) for name, (s, f) in rows.items()}
    with torch.no_grad():
        timed["PyTorch eager (module's form)"] = lambda: pixelwise_depthwise_conv2d(x, weights, 1)
        reference = pixelwise_depthwise_conv2d(x, weights, 1).numpy()
    for name in ("deploykit export", "slices + Sum", "one-hot conv", "unfold as is"):
        out = timed[name]()[0]
        assert np.abs(out - reference).max() <= 1e-4 * np.abs(reference).max(), f"{name} computes something else"
    times = {name: float("inf") for name in timed}
    for _ in range(args.rounds):
        for name, (median, _) in interleaved_ms(timed, args.runs, 10).items():
            times[name] = min(times[name], median)
    megabytes = w.nbytes / 2 ** 20
    floor = times["floor (stream the weights)"]
    print(f"TVConv per-pixel depthwise conv, C={c}, {size}x{size}, 3x3, batch {n}; weights {megabytes:.1f} MiB; "
          f"{args.threads} threads; floor = {megabytes / 1024 / (floor / 1000):.0f} GiB/s")
    print(f"{'form':32} {'ms':>8} {'vs floor':>9}")
    for name, ms in times.items():
        print(f"{name:32} {ms:8.3f} {ms / floor:8.2f}x")
    print(f"deploykit export vs unfold as is: {times['unfold as is'] / times['deploykit export']:.1f}x faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
