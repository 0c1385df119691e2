"""Runtimes that execute the exported model: onnxruntime (ort), TensorRT engines (trt, imported lazily), and the CUDA
kernels' C launchers on PyTorch tensors (kernels)."""
