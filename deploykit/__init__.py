"""deploykit: deploy PyTorch models with dynamic and variant convolutions, and prove they still compute the same.

Python API (the CLI `export.py` is a thin layer over it):

    from deploykit import ExportConfig, export_model
    result = export_model(ExportConfig(model="scnet50.pt", output_dir="out"))
    result.passed, result.report["verification"]
"""

__version__ = "0.1.0"

from deploykit.config import ExportConfig  # noqa: E402
from deploykit.errors import DeployError, VerificationFailed  # noqa: E402


def export_model(config: ExportConfig, raise_on_mismatch: bool = False):
    """Export, verify and save one model; see `deploykit.pipeline.export_model`."""
    from deploykit.pipeline import export_model as run

    return run(config, raise_on_mismatch=raise_on_mismatch)


def __getattr__(name: str):
    """`deploykit.convert` (`deploykit.conversion.convert`: official and third-party layers -> deploykit's) is
    imported on first use: it loads the ONNX machinery, which ``import deploykit`` (e.g. the CLI's argument checks)
    should not pay for."""
    if name == "convert":
        from deploykit.conversion import convert

        return convert
    raise AttributeError(f"module 'deploykit' has no attribute {name!r}")


__all__ = ["DeployError", "ExportConfig", "VerificationFailed", "convert", "export_model", "__version__"]
