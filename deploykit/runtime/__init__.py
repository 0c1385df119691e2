"""Runtimes that execute the exported model: `Predictor` (the Python API for running an export), onnxruntime (ort),
TensorRT engines (trt, imported lazily), and the CUDA kernels' C launchers on PyTorch tensors (kernels)."""

from __future__ import annotations

__all__ = ["Predictor", "TensorInfo"]


def __getattr__(name: str):
    """`Predictor` is imported on first use, so that importing e.g. ``deploykit.runtime.kernels`` stays light."""
    if name in __all__:
        import importlib

        return getattr(importlib.import_module("deploykit.runtime.predictor"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
