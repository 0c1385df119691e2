"""Command line of ``export.py`` / ``deploykit-export``: parse arguments, call `deploykit.export_model`.

Exit status: 0 verified, 1 the deployed model does not match PyTorch, 2 bad input (one sentence on stderr).
"""

from __future__ import annotations

import argparse
import sys
import traceback

from deploykit import log
from deploykit.checkpoint import TRUST_PICKLE_FLAG
from deploykit.config import ExportConfig, parse_shape
from deploykit.errors import DeployError
from deploykit.export.custom_op import LOWERINGS
from deploykit.export.onnx import DEFAULT_OPSET, SUPPORTED_OPSETS
from deploykit.verify import DEFAULT_RTOL

EXIT_OK, EXIT_MISMATCH, EXIT_USAGE = 0, 1, 2

EPILOG = """examples:
  python -m models scnet50 -o scnet50.pt        # a seeded random scnet50 checkpoint
  python export.py --model scnet50.pt           # export, run in onnxruntime, compare with PyTorch
  python export.py --model scnet50-dc6a7e87.pth --arch scnet50 --input-shape 4x3x256x256 --static-batch

exit status: 0 verified, 1 outputs differ beyond tolerance (artifacts are still written), 2 bad input.
The report prints the `polygraphy run` command that replays the comparison from the artifacts."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own usage errors also exit with status 2
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from deploykit.models import MODELS

    parser = _Parser(
        prog="export.py", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Export a PyTorch checkpoint to ONNX, run it in onnxruntime and verify it against PyTorch.")
    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True, metavar="PATH",
                       help="checkpoint: deploykit's format, or an official state_dict (bare, or wrapped in "
                            "'state_dict'/'model', 'module.' prefixes stripped)")
    model.add_argument("--arch", metavar="NAME",
                       help=f"architecture of a bare state_dict (default: from the checkpoint or the file name); "
                            f"one of: {', '.join(sorted(MODELS))}")
    model.add_argument(TRUST_PICKLE_FLAG, action="store_true",
                       help="allow checkpoints that unpickle Python objects, e.g. a whole nn.Module (this runs code "
                            "from the file: only for files you trust)")
    export = parser.add_argument_group("export")
    export.add_argument("--input-shape", type=_shape, metavar="BxCxHxW",
                        help="input shape including batch (default: 1x<model's native input>, e.g. 1x3x224x224)")
    export.add_argument("--static-batch", action="store_true",
                        help="fix the batch dimension (default: dynamic, one file for every batch size)")
    export.add_argument("--opset", type=int, choices=list(SUPPORTED_OPSETS), metavar="N",
                        help=f"ONNX opset {SUPPORTED_OPSETS.start}-{SUPPORTED_OPSETS.stop - 1} "
                             f"(default: {DEFAULT_OPSET}; 18 = no DeformConv, deformable convs as standard ops)")
    export.add_argument("--lowering", choices=LOWERINGS,
                        help="deploykit:: ops: auto = each op's fastest form (dynamic convs: standard ops where a "
                             "static batch folds into conv groups; deformable convs: the node, whose body is ONNX "
                             "DeformConv), else one custom node with a standard-op body; custom = always the node "
                             "(for TensorRT plugins); standard = standard ops only (default: auto)")
    check = parser.add_argument_group("verification")
    check.add_argument("--inputs", metavar="FILE.npz",
                       help="verification input (array named 'input', or the only array); default: seeded random")
    check.add_argument("--seed", type=int, help="seed of the random inputs (default: 0)")
    check.add_argument("--rtol", type=float, help=f"relative tolerance (default: {DEFAULT_RTOL:g})")
    check.add_argument("--atol", type=float, help="absolute tolerance (default: rtol * max |PyTorch output|)")
    check.add_argument("--providers", metavar="LIST",
                       help="onnxruntime execution providers, comma-separated, e.g. cpu or cuda,cpu "
                            "(default: the best available of tensorrt, cuda, cpu)")
    check.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: one per core)")
    engine = parser.add_argument_group("TensorRT (needs TensorRT >= 10.7 and an NVIDIA GPU)")
    engine.add_argument("--engine", action="store_true",
                        help="also build a TensorRT engine (model.plan) and verify it against PyTorch")
    engine.add_argument("--fp16", action="store_true", help="let the engine use FP16 kernels (checked at rtol 1e-2)")
    engine.add_argument("--plugins", metavar="LIB.so",
                        help="deploykit's plugin library (default: $DEPLOYKIT_PLUGINS, else "
                             "plugins/build/libdeploykit_plugins.so)")
    engine.add_argument("--max-batch", type=int, metavar="N",
                        help="largest batch of the engine's profile (default: the largest verification batch)")
    parser.add_argument("-o", "--output-dir", metavar="DIR",
                        help="artifact directory (default: deploykit-out/<arch>)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug detail and tracebacks")
    return parser


def config_from_args(args: argparse.Namespace) -> ExportConfig:
    return ExportConfig(
        model=args.model, arch=args.arch, output_dir=args.output_dir, input_shape=args.input_shape,
        dynamic_batch=not args.static_batch, opset=args.opset, lowering=args.lowering, inputs=args.inputs,
        seed=args.seed, rtol=args.rtol, atol=args.atol,
        providers=args.providers.split(",") if args.providers else None, threads=args.threads,
        trust_pickle=args.trust_pickle, engine=args.engine, fp16=args.fp16, plugins=args.plugins,
        max_batch=args.max_batch, verbose=args.verbose)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log.configure(args.verbose)
    from deploykit.pipeline import export_model  # heavy imports after --help

    try:
        result = export_model(config_from_args(args))
    except DeployError as err:
        if args.verbose:
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted: no artifacts were written", file=sys.stderr)
        return 130
    log.LOGGER.info("reproduce: cd %s && %s", result.output_dir, result.report["reproduce"])
    if "tensorrt" in result.report:
        log.LOGGER.info("reproduce TensorRT: cd %s && %s", result.output_dir, result.report["tensorrt"]["reproduce"])
    return EXIT_OK if result.passed else EXIT_MISMATCH


def _shape(text: str):
    try:
        return parse_shape(text)
    except DeployError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
