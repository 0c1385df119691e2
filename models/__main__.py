"""Write a seeded random instance of a zoo model as a deploykit checkpoint.

    python -m models scnet50 -o scnet50.pt            # in a checkout
    python -m deploykit.models scnet50 -o scnet50.pt  # anywhere deploykit is installed
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deploykit.checkpoint import write_checkpoint
from deploykit.config import check_seed
from deploykit.fileio import check_writable_dir
from deploykit.errors import DeployError

from . import MODELS, model_spec, random_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m models", description=__doc__.strip().splitlines()[0],
        epilog="architectures: " + ", ".join(sorted(MODELS)))
    parser.add_argument("arch", help="architecture name (see the list below)")
    parser.add_argument("-o", "--output", required=True,
                        help="checkpoint file to write: .pt/.pth (torch.save) or .safetensors (e.g. scnet50.pt)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation (default: 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    args = parser.parse_args(argv)
    try:
        spec = model_spec(args.arch)
        check_seed(args.seed)
        _check_output(Path(args.output), args.overwrite)  # before the minute of calibration, not after
        print(f"building {args.arch} with random weights (seed {args.seed}) and calibrating its BatchNorms on "
              f"structured noise (up to a minute) ...", file=sys.stderr, flush=True)
        model = random_model(args.arch, seed=args.seed)
        path = write_checkpoint(args.output, args.arch, model.state_dict(), seed=args.seed,
                                input_shape=list(spec.input_shape))
    except DeployError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({args.arch}, random weights, seed {args.seed})")
    return 0


def _check_output(path: Path, overwrite: bool) -> None:
    if path.is_dir():
        raise DeployError(f"-o {path} is a directory; name the checkpoint file to write, e.g. {path / 'model.pt'}.")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise DeployError(f"-o {path} exists already; choose another name, or pass --overwrite to replace it.")
    check_writable_dir(path.parent, option="-o")


if __name__ == "__main__":
    sys.exit(main())
