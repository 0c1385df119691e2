"""Write a seeded random instance of a zoo model as a deploykit checkpoint.

    python -m models scnet50 -o scnet50.pt            # in a checkout
    python -m deploykit.models scnet50 -o scnet50.pt  # anywhere deploykit is installed
"""

from __future__ import annotations

import argparse
import sys

from deploykit.checkpoint import write_checkpoint
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
    args = parser.parse_args(argv)
    try:
        spec = model_spec(args.arch)
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


if __name__ == "__main__":
    sys.exit(main())
