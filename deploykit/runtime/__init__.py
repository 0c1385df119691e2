"""Runtimes that execute the exported model: onnxruntime here; TensorRT when installed (later)."""
