#!/usr/bin/env python3
"""Export a checkpoint to ONNX, run it in onnxruntime and verify it against PyTorch (see --help)."""

import sys

from deploykit.cli import main

if __name__ == "__main__":
    sys.exit(main())
