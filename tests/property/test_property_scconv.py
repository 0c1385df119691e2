"""Property tests of SCConv against the paper-formula float64 reference and through grouped dynamic-batch exports.
Drawn: channels, groups incl. depthwise, stride 1-3, dilation 1-3 (padding = dilation, the size-preserving setting
the gate needs), pooling rate 1-5, batch 1-4, non-square sizes from the pooling rate up, random BatchNorms."""

from __future__ import annotations

from hypothesis import strategies as st

from deploykit.nn import SCConv
from deploykit.ops.scconv import SPEC
from property_support import (MARKS, Case, input_specs, randomize, seeds, size_at_least, variant_tests)

pytestmark = MARKS
FAMILY = "scconv"


@st.composite
def cases(draw):
    channels = draw(st.integers(1, 12))
    groups = draw(st.sampled_from([g for g in range(1, channels + 1) if channels % g == 0]))
    stride, dilation, pooling_r = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 5))
    module = SCConv(channels, channels, stride, dilation, dilation, groups, pooling_r)
    randomize(module, draw(seeds), scale=None)
    size = [size_at_least(draw, pooling_r, extra=10), size_at_least(draw, pooling_r, extra=10)]
    config = dict(channels=channels, groups=groups, stride=stride, dilation=dilation, pooling_r=pooling_r, size=size)
    return Case(module.eval(), (channels, *size), draw(input_specs), f"SCConv {config}")


test_module_matches_float64_reference, test_grouped_export_matches_at_other_batches = variant_tests(cases, SPEC, FAMILY)


def test_padding_other_than_the_dilation_is_refused_in_one_sentence():
    """Found by the fuzz profile: k3 must keep the input's size (x gates it), which only padding == dilation does;
    other paddings used to fail at the first forward with a tensor-size mismatch."""
    import pytest

    with pytest.raises(ValueError, match=r"^SCConv needs padding == dilation .+; got padding 1 and dilation 2$"):
        SCConv(4, 4, padding=1, dilation=2)
