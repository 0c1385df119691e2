"""Layer 2: the export contract of every variant (reference, tolerances, custom ONNX ops, plugin).

`VARIANTS` is the single registry: a plain tuple, one line per variant.
"""

from deploykit.ops import scconv
from deploykit.ops.spec import VariantSpec

VARIANTS: tuple[VariantSpec, ...] = (
    scconv.SPEC,
)


def custom_ops():
    """Every ``deploykit::`` ONNX op a registered variant can export."""
    return tuple(op for spec in VARIANTS for op in spec.custom_ops)
