#!/usr/bin/env python3
"""OpenVINO vs onnxruntime vs PyTorch eager on every zoo family, from one exported file per model.

    python bench/bench_openvino.py                                   # one model per family, 2 threads
    python bench/bench_openvino.py --model od_resnet18 scnet50 --runs 20
    python bench/bench_openvino.py --int8                              # + int8 rows (quantized here on photos)
    python bench/bench_openvino.py --int8-dir deploykit-out            # + rows for <dir>/<arch>/model.int8.onnx

Two tables per model, each runtime with the same thread count and the same input (structured noise):
- batch-1 latency: OpenVINO with the LATENCY hint, onnxruntime, eager; best of `--runs` rounds that call every
  runtime once in turn (a shared machine's noise then hits all alike; the best is the least disturbed);
- batch-8 throughput (images/s): OpenVINO with the THROUGHPUT hint (its streams, fed by an ``AsyncInferQueue`` of
  its optimal number of requests), onnxruntime and eager running batches back to back; best of `--runs` rounds of
  `--jobs` batches each, runtimes in turn.
Ratios are to onnxruntime in the same run; compare ratios across machines, not milliseconds. The first lines
name the CPU and whether it has AVX-512 VNNI (int8 dot products), which decides the int8 rows.
int8: `--int8` quantizes each model's file here (`deploykit.quantize.quantize_int8`, calibrated on crops of
scikit-image's photos, `bench/photos.py`, as `bench_latency.py --int8` does) and adds its rows in both runtimes, with
each runtime's int8 output compared with onnxruntime's fp32 one on a held-out photo (SQNR, dB); `--int8-dir DIR` takes
``DIR/<arch>/model.int8.onnx`` from an int8 export instead. `int8_runtimes` is the hook for a single file.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bench_latency import interleaved_samples
from deploykit import log
from deploykit.images import load_images
from deploykit.export.onnx import onnx_from_model
from deploykit.export.passes import run_passes
from deploykit.inputs import structured_noise
from deploykit.models import MODELS, model_spec, random_model
from deploykit.runtime.openvino import OpenVinoRunner, version
from deploykit.quantize import quantize_int8, sqnr_db
from deploykit.runtime.ort import session_from_onnx
from deploykit.verify import rel_to_range
from photos import CALIBRATION_PHOTOS, VERIFICATION_PHOTOS, save_crops

# One model per family (the smallest that has the family's op).
FAMILIES = {"scconv": "scnet50", "condconv": "efficientnet_cc_b0_4e", "dyconv": "dy_resnet18",
            "odconv": "od_resnet18", "dcn v2": "dcn_resnet50", "dcn v1": "dcnv1_resnet50",
            "tvconv": "tvconv_mobilenet_v2", "acmix": "acmix_resnet26"}
THROUGHPUT_BATCH = 8

Runtimes = dict[str, Callable[[np.ndarray], object]]


def cpu_summary() -> str:
    """The CPU's model name and whether it has AVX-512 VNNI."""
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")), "unknown")
    except (OSError, subprocess.CalledProcessError):
        name = "unknown (no lscpu)"
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return f"CPU: {name}; avx512_vnni: {'yes' if 'avx512_vnni' in flags else 'no'}"


def openvino_async(runner: OpenVinoRunner) -> Callable[[list[np.ndarray]], None]:
    """Run a list of batches through the runner's compiled model with an AsyncInferQueue (all streams busy)."""
    from openvino import AsyncInferQueue

    requests = runner.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")
    queue = AsyncInferQueue(runner.compiled, requests)
    name = runner.inputs[0].name

    def run(batches: list[np.ndarray]) -> None:
        for batch in batches:
            queue.start_async({name: batch})
        queue.wait_all()

    return run


def int8_runtimes(path: Path, threads: int) -> tuple[Runtimes, Runtimes]:
    """Batch-1 and batch-8 runners (onnxruntime and OpenVINO) for a QDQ int8 file: the hook for the int8 rows."""
    latency_ov = OpenVinoRunner(path, "LATENCY", threads)
    throughput_ov = openvino_async(OpenVinoRunner(path, "THROUGHPUT", threads))
    session = session_from_onnx(path.read_bytes(), ["cpu"], threads)
    name = latency_ov.inputs[0].name
    latency = {"onnxruntime int8": lambda x: session.run(None, {name: x})[0],
               "openvino int8": lambda x: next(iter(latency_ov.run({name: x}).values()))}
    throughput = {"onnxruntime int8": lambda xs: [session.run(None, {name: x}) for x in xs],
                  "openvino int8": throughput_ov}
    return latency, throughput


def quantized_file(arch: str, exported, calibration: Path, scratch: Path) -> Path:
    """`exported` quantized to int8 on the calibration photos, saved as ``scratch/<arch>.int8.onnx``."""
    spec = model_spec(arch)
    images = load_images([calibration], spec.input_shape, spec.preprocessing)
    int8 = quantize_int8(exported, [{"input": images[i:i + 8]} for i in range(0, len(images), 8)])
    path = scratch / f"{arch}.int8.onnx"
    path.write_bytes(int8.model.SerializeToString())
    return path


def print_table(title: str, rows: dict[str, float], unit: str, higher_is_better: bool) -> None:
    base = rows["onnxruntime"]
    print(f"{title}\n{'runtime':22} {unit:>12} {'vs onnxruntime':>15}")
    for name, value in rows.items():
        ratio = value / base if higher_is_better else base / value
        print(f"{name:22} {value:12.2f} {ratio:14.2f}x")  # > 1: better than onnxruntime


def bench_model(arch: str, args: argparse.Namespace, scratch: Path) -> None:
    shape = model_spec(arch).input_shape
    model = random_model(arch)
    generator = torch.Generator().manual_seed(0)
    single = structured_noise(1, shape, generator)
    batch = structured_noise(THROUGHPUT_BATCH, shape, generator)
    exported, _ = run_passes(onnx_from_model(model, single))
    session = session_from_onnx(exported, ["cpu"], args.threads)
    latency_ov = OpenVinoRunner(exported, "LATENCY", args.threads)
    throughput_ov = OpenVinoRunner(exported, "THROUGHPUT", args.threads)
    agreement = rel_to_range(latency_ov.run({"input": single.numpy()})["output"],
                             session.run(None, {"input": single.numpy()})[0])

    def eager(x: np.ndarray):
        with torch.inference_mode():
            return model(torch.from_numpy(x))

    latency: Runtimes = {"onnxruntime": lambda x: session.run(None, {"input": x}),
                         "openvino": lambda x: latency_ov.run({"input": x}), "PyTorch eager": eager}
    throughput: Runtimes = {"onnxruntime": lambda xs: [session.run(None, {"input": x}) for x in xs],
                            "openvino": openvino_async(throughput_ov),
                            "PyTorch eager": lambda xs: [eager(x) for x in xs]}
    int8 = None
    if args.int8:
        int8 = quantized_file(arch, exported, scratch / "calibration", scratch)
    elif args.int8_dir and (Path(args.int8_dir) / arch / "model.int8.onnx").is_file():
        int8 = Path(args.int8_dir) / arch / "model.int8.onnx"
    int8_sqnr = ""
    if int8 is not None:
        extra_latency, extra_throughput = int8_runtimes(int8, args.threads)
        latency.update(extra_latency)
        throughput.update(extra_throughput)
        spec = model_spec(arch)
        photo = load_images([scratch / "verification"], shape, spec.preprocessing)[:1]
        fp32 = session.run(None, {"input": photo})[0]
        int8_sqnr = "; int8 vs fp32 on a held-out photo: SQNR " + ", ".join(
            f"{name.split()[0]} {sqnr_db(run(photo), fp32):.1f} dB" for name, run in extra_latency.items())

    x1, jobs = single.numpy(), [batch.numpy()] * args.jobs
    best_ms = {name: min(times) for name, times in interleaved_samples(
        {name: lambda fn=fn: fn(x1) for name, fn in latency.items()}, args.runs, args.warmup).items()}
    best_round = {name: min(times) for name, times in interleaved_samples(
        {name: lambda fn=fn: fn(jobs) for name, fn in throughput.items()}, max(3, args.runs // 5), 1).items()}
    images = THROUGHPUT_BATCH * args.jobs
    print(f"\n{arch} ({'x'.join(map(str, shape))}), {args.threads} threads; openvino vs onnxruntime at batch 1: "
          f"{agreement:.1e} of the range; OpenVINO THROUGHPUT streams: "
          f"{throughput_ov.compiled.get_property('NUM_STREAMS')}"
          + int8_sqnr)
    print_table(f"batch 1, best of {args.runs} alternating", best_ms, "ms", higher_is_better=False)
    print_table(f"batch {THROUGHPUT_BATCH} x {args.jobs} jobs, best of {max(3, args.runs // 5)} alternating rounds",
                {name: images / (ms / 1e3) for name, ms in best_round.items()}, "images/s", higher_is_better=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model", nargs="+", choices=sorted(MODELS), help="default: one model per family")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=30, help="batch-1 rounds (default 30; batch-8: a fifth)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=4, help="batches of 8 per throughput round (default 4)")
    int8 = parser.add_mutually_exclusive_group()
    int8.add_argument("--int8", action="store_true", help="add int8 rows: quantize each model here, on photos")
    int8.add_argument("--int8-dir", metavar="DIR", help="add int8 rows from DIR/<arch>/model.int8.onnx (int8 exports)")
    args = parser.parse_args(argv)
    log.configure(False)
    torch.set_num_threads(args.threads)
    print(f"{cpu_summary()}\ntorch {torch.__version__}, onnxruntime {__import__('onnxruntime').__version__}, "
          f"openvino {version()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    with tempfile.TemporaryDirectory(prefix="bench-openvino-") as scratch:
        if args.int8:
            save_crops(Path(scratch) / "calibration", CALIBRATION_PHOTOS)
        if args.int8 or args.int8_dir:
            save_crops(Path(scratch) / "verification", VERIFICATION_PHOTOS)
        for arch in args.model or FAMILIES.values():
            bench_model(arch, args, Path(scratch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
