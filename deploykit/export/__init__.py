"""Export: PyTorch module -> ONNX (with deploykit's custom ops) -> graph passes."""
