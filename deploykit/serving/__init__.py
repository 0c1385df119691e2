"""Hand-off to model servers: Triton Inference Server model repositories (`write_triton_repository`)."""

from deploykit.serving.triton import check_triton_target, parse_config, write_triton_repository

__all__ = ["check_triton_target", "parse_config", "write_triton_repository"]
