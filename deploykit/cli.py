"""Command line of ``export.py`` / ``deploykit-export``: parse arguments, call `deploykit.export_model`.

Exit status: 0 verified, 1 the deployed model does not match PyTorch, 2 bad input (one sentence on stderr),
3 inconclusive (every verification input is unstable for the network in float32).
"""

from __future__ import annotations

import argparse
import re
import shlex
import signal
import sys
import traceback

from deploykit import log
from deploykit.checkpoint import TRUST_PICKLE_FLAG
from deploykit.config import ExportConfig, parse_floats, parse_ints, parse_names, parse_shape
from deploykit.errors import DeployError
from deploykit.export.custom_op import LOWERINGS
from deploykit.export.onnx import DEFAULT_OPSET, SUPPORTED_OPSETS
from deploykit.verify import DEFAULT_RTOL

EXIT_OK, EXIT_MISMATCH, EXIT_USAGE, EXIT_INCONCLUSIVE = 0, 1, 2, 3
EXIT_STATUS = {"passed": EXIT_OK, "failed": EXIT_MISMATCH, "inconclusive": EXIT_INCONCLUSIVE}

EPILOG = """examples:
  python -m models scnet50 -o scnet50.pt        # a seeded random scnet50 checkpoint
  python export.py --model scnet50.pt           # export, run in onnxruntime, compare with PyTorch
  python export.py --model scnet50-dc6a7e87.pth --arch scnet50 --input-shape 4x3x256x256 --static-batch
  python export.py --model scnet50.pt --images photos/  # verify on your own images
  python export.py --arch mynet.py:build --model mynet.pth --input-shape 1x3x224x224  # your own model

exit status: 0 verified, 1 outputs differ beyond tolerance (artifacts are still written, the report names the
first diverging module), 2 bad input, 3 inconclusive (every input is unstable for the network in float32).
The report prints the `polygraphy run` command that replays the comparison from the artifacts."""


EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # 128 + SIGINT, 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every cleanup that handles an interrupt handles it too."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own usage errors also exit with status 2, in one line
        self.exit(EXIT_USAGE, f"error: {message.rstrip('.')}; see {self.prog} --help.\n")


def build_parser() -> argparse.ArgumentParser:
    from deploykit.models import MODELS

    parser = _Parser(
        prog="export.py", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Export a PyTorch checkpoint to ONNX, run it in onnxruntime and verify it against PyTorch.")
    model = parser.add_argument_group("model")
    model.add_argument("--model", metavar="PATH",
                       help="checkpoint: deploykit's format, or an official state_dict (bare, or wrapped in "
                            "'state_dict'/'model', 'module.' prefixes stripped); optional only with an --arch "
                            "factory that makes its own weights")
    model.add_argument("--arch", metavar="NAME",
                       help=f"architecture of a bare state_dict (default: from the checkpoint or the file name): "
                            f"a zoo model, one of {', '.join(sorted(MODELS))}; or your own model as "
                            f"path/to/net.py:factory or package.module:factory (called without arguments, then "
                            f"--model is loaded into it strictly; docs/own-model.md)")
    model.add_argument(TRUST_PICKLE_FLAG, action="store_true",
                       help="allow checkpoints that unpickle Python objects, e.g. a whole nn.Module (this runs code "
                            "from the file: only for files you trust)")
    export = parser.add_argument_group("export")
    export.add_argument("--input-shape", type=_shape, metavar="BxCxHxW", action="append",
                        help="input shape including batch (default: 1x<model's native input>, e.g. 1x3x224x224); "
                             "repeat it, in the forward's argument order, for a model with several inputs")
    export.add_argument("--out-indices", type=_ints, metavar="I,J,...",
                        help="a zoo detection backbone (dcn_resnet50, dcnv1_resnet50): export the feature maps of "
                             "these stages (0-3, mmdet's out_indices) as outputs c2..c5 instead of the classifier")
    export.add_argument("--output-names", type=_names, metavar="A,B,...",
                        help="names of the ONNX outputs, one per tensor the model returns (default: 'output'; dict "
                             "keys; output_0, output_1, ... for a tuple or list)")
    export.add_argument("--static-batch", action="store_true",
                        help="fix the batch dimension (default: dynamic, one file for every batch size)")
    export.add_argument("--dynamic-spatial", action="store_true",
                        help="also leave height and width symbolic: one file for every image size (detection "
                             "backbones), verified at the requested size and a second one; refused by models with "
                             "size-specific weights (TVConv, ACmix, the TF-padded CondConv port)")
    export.add_argument("--opset", type=int, metavar="N",
                        help=f"ONNX opset {SUPPORTED_OPSETS.start}-{SUPPORTED_OPSETS.stop - 1} "
                             f"(default: {DEFAULT_OPSET}; 18 = no DeformConv, deformable convs as standard ops)")
    export.add_argument("--lowering", choices=LOWERINGS,
                        help="deploykit:: ops: auto = each op's fastest form (dynamic convs: standard ops where a "
                             "static batch folds into conv groups; deformable convs: the node, whose body is ONNX "
                             "DeformConv), else one custom node with a standard-op body; custom = always the node "
                             "(for TensorRT plugins); standard = standard ops only (default: auto)")
    check = parser.add_argument_group("verification")
    check.add_argument("--inputs", metavar="FILE.npz",
                       help="verification inputs: one array per model input, named after it (or the only array of "
                            "a one-input model; numpy.savez's arr_0, arr_1, ... in input order); default: seeded "
                            "random")
    check.add_argument("--images", nargs="+", metavar="PATH",
                       help="verify on these images (files or directories of JPEG/PNG/WebP/BMP), resized, "
                            "centre-cropped and normalised as the model expects")
    check.add_argument("--mean", type=_floats, metavar="M,M,M",
                       help="per-channel mean for --images, pixels in [0, 1] (default: the model's own, else ImageNet)")
    check.add_argument("--std", type=_floats, metavar="S,S,S",
                       help="per-channel std for --images (default: the model's own, else ImageNet)")
    check.add_argument("--seed", type=int, help="seed of the random inputs (default: 0)")
    check.add_argument("--rtol", type=float, help=f"relative tolerance (default: {DEFAULT_RTOL:g})")
    check.add_argument("--atol", type=float, help="absolute tolerance (default: rtol * max |PyTorch output|)")
    check.add_argument("--runtimes", metavar="LIST",
                       help="runtimes that run and verify the same file, comma-separated: onnxruntime, openvino, "
                            "tensorrt (= --engine); onnxruntime always runs; the verdict is the worst (default: "
                            "onnxruntime)")
    check.add_argument("--providers", metavar="LIST",
                       help="onnxruntime execution providers, comma-separated, e.g. cpu or cuda,cpu "
                            "(default: the best available of tensorrt, cuda, cpu)")
    check.add_argument("--threads", type=int,
                       help="onnxruntime intra-op threads (default: onnxruntime's choice, one per physical core)")
    engine = parser.add_argument_group("TensorRT (needs TensorRT >= 10.7 and an NVIDIA GPU)")
    engine.add_argument("--engine", action="store_true",
                        help="also build a TensorRT engine (model.plan) and verify it against PyTorch")
    engine.add_argument("--fp16", action="store_true", help="let the engine use FP16 kernels (checked at rtol 1e-2)")
    engine.add_argument("--plugins", metavar="LIB.so",
                        help="deploykit's plugin library (default: $DEPLOYKIT_PLUGINS, else "
                             "plugins/build/libdeploykit_plugins.so)")
    engine.add_argument("--min-shape", type=_shape, metavar="BxCxHxW",
                        help="smallest input of the engine's profile (default: batch 1; with --dynamic-spatial also "
                             "the model's smallest size)")
    engine.add_argument("--max-shape", type=_shape, metavar="BxCxHxW",
                        help="largest input of the engine's profile (default: the largest verification input)")
    engine.add_argument("--max-batch", type=int, metavar="N",
                        help="largest batch of the engine's profile (default: the largest verification batch) and "
                             "Triton's max_batch_size (default: 8)")
    serving = parser.add_argument_group("serving (docs/serving.md)")
    serving.add_argument("--triton-repo", metavar="DIR",
                         help="after a passed verification, write a Triton model repository: DIR/<name>/config.pbtxt "
                              "and DIR/<name>/1/model.onnx (with --engine also DIR/<name>_trt/), plus DIR/README.md")
    serving.add_argument("--triton-name", metavar="NAME", help="the model's name in Triton (default: the arch)")
    serving.add_argument("--triton-instance", choices=("cpu", "gpu"),
                         help="where Triton's onnxruntime backend runs the model (default: cpu)")
    serving.add_argument("--triton-precision", choices=("fp32", "int8"),
                         help="the model the Triton repository serves: model.onnx or, with --quantize int8, "
                              "model.int8.onnx (default: fp32)")
    serving.add_argument("--force", action="store_true",
                         help="write the Triton repository even if the verification failed or was inconclusive")
    int8 = parser.add_argument_group("int8 (docs/quantization.md)")
    int8.add_argument("--quantize", choices=("int8",),
                      help="after the fp32 verification, also write model.int8.onnx (QDQ, calibrated) and judge it "
                           "on the verification inputs against PyTorch")
    int8.add_argument("--calibration", nargs="+", metavar="PATH",
                      help="calibration inputs for --quantize: images, directories of images or .npz files (never "
                           "the verification inputs)")
    int8.add_argument("--keep-float", nargs="+", metavar="NAME",
                      help="module paths (e.g. layer1.0.conv1) or ONNX node names to keep in float32 in the int8 "
                           "model (the report names the layers that lose the most)")
    parser.add_argument("-o", "--output-dir", metavar="DIR",
                        help="artifact directory (default: deploykit-out/<arch>)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace files in the artifact directory that bear the artifacts' names although "
                             "deploykit did not write them (default: refuse such a directory)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug detail and tracebacks")
    return parser


def config_from_args(args: argparse.Namespace) -> ExportConfig:
    return ExportConfig(
        model=args.model, arch=args.arch, output_dir=args.output_dir, overwrite=args.overwrite,
        input_shape=args.input_shape[0] if args.input_shape and len(args.input_shape) == 1 else args.input_shape,
        output_names=args.output_names, out_indices=args.out_indices,
        dynamic_batch=not args.static_batch, dynamic_spatial=args.dynamic_spatial, opset=args.opset,
        lowering=args.lowering, inputs=args.inputs, images=args.images, mean=args.mean, std=args.std,
        seed=args.seed, rtol=args.rtol, atol=args.atol,
        runtimes=args.runtimes.split(",") if args.runtimes is not None else None,
        providers=args.providers.split(",") if args.providers is not None else None, threads=args.threads,
        trust_pickle=args.trust_pickle, engine=args.engine, fp16=args.fp16, plugins=args.plugins,
        max_batch=args.max_batch, min_shape=args.min_shape, max_shape=args.max_shape, triton_repo=args.triton_repo,
        triton_name=args.triton_name, triton_instance=args.triton_instance, force=args.force,
        quantize=args.quantize, calibration=args.calibration, keep_float=args.keep_float,
        triton_precision=args.triton_precision, verbose=args.verbose)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_attach_negative_values(parser, sys.argv[1:] if argv is None else argv))
    log.configure(args.verbose)
    previous = _raise_on_sigterm()
    result = None
    try:
        from deploykit.pipeline import export_model  # heavy imports after --help

        result = export_model(config_from_args(args))
        directory = shlex.quote(str(result.output_dir))  # pasted into a shell: spaces, quotes, accents
        log.LOGGER.info("reproduce: cd %s && %s", directory, result.report["reproduce"])
        if "tensorrt" in result.report:
            log.LOGGER.info("reproduce TensorRT: cd %s && %s", directory, result.report["tensorrt"]["reproduce"])
        return EXIT_STATUS[result.verdict]
    except DeployError as err:
        if args.verbose:
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (`Terminated`): every stage cleans up on the way out
        if args.verbose:
            traceback.print_exc()
        what = "terminated" if isinstance(err, Terminated) else "interrupted"
        done = f"the artifacts in {result.output_dir} are complete" if result is not None else \
            "no artifacts were written"
        print(f"{what}: {done}", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(err, Terminated) else EXIT_INTERRUPTED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _attach_negative_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``--input-shape -1x3x8x8`` as ``--input-shape=-1x3x8x8``: argparse takes a value that starts with '-' and is
    not a plain number for an option and says "expected one argument"; attached, the value reaches its own check
    and its own sentence."""
    takes_value = {option for action in parser._actions if action.nargs is None and action.option_strings
                   for option in action.option_strings}
    attached: list[str] = []
    for token in argv:
        if attached and attached[-1] in takes_value and re.match(r"-[\d.]", token):
            attached[-1] = f"{attached[-1]}={token}"
        else:
            attached.append(token)
    return attached


def _raise_on_sigterm():
    """Turn SIGTERM into `Terminated` for the run (main thread only); returns the previous handler."""
    def terminate(signum, frame):
        raise Terminated()

    try:
        return signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread: leave signals alone
        return None


def _argument_type(parse):
    """An argparse `type` from one of config's parsers: its DeployError becomes argparse's usage error."""
    def convert(text: str):
        try:
            return parse(text)
        except DeployError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return convert


_floats, _shape, _names, _ints = (_argument_type(parse) for parse in (parse_floats, parse_shape, parse_names,
                                                                      parse_ints))
