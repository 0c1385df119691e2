"""Layer 1: the PyTorch modules of every conv variant deploykit owns (one file per variant)."""

from deploykit.nn.scconv import SCConv

__all__ = ["SCConv"]
