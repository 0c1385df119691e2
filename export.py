#!/usr/bin/env python3
"""Export a checkpoint to ONNX, run it in onnxruntime and verify it against PyTorch (see --help)."""

import sys
from pathlib import Path

# Python puts this script's folder first on sys.path, where the checkout's zoo folder `models/` would shadow a
# user's own package of that name (the official ODConv code is one). deploykit itself is installed (it reaches its
# zoo as `deploykit.models`), so the folder moves to the end: found last, for a checkout that is not installed.
_CHECKOUT = str(Path(__file__).resolve().parent)
if sys.path and sys.path[0] in (_CHECKOUT, ""):
    sys.path.append(sys.path.pop(0))

from deploykit.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
