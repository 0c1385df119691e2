"""The registry of conv variants: one `VariantSpec` per line, in the order they were added.

It lives outside `deploykit.ops` so that importing one op (as the PyTorch modules do) does not import every
variant's contract.
"""

from deploykit.ops import acmix, condconv, deform_conv, dyconv, odconv, scconv, tvconv
from deploykit.ops.spec import VariantSpec

VARIANTS: tuple[VariantSpec, ...] = (
    scconv.SPEC,
    condconv.SPEC,
    dyconv.SPEC,
    odconv.SPEC,
    deform_conv.SPEC,
    tvconv.SPEC,
    acmix.SPEC,
)


def custom_ops():
    """Every ``deploykit::`` ONNX op a registered variant can export (each once)."""
    return tuple(dict.fromkeys(op for spec in VARIANTS for op in spec.custom_ops))
