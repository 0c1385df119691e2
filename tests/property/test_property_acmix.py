"""Property tests of ACmix against the official-formula float64 reference and through grouped dynamic-batch
exports. Drawn: in/out planes, heads 1-4 and head_dim 1-4, kernel_att 1/3/5/7, kernel_conv 1/3/5, stride 1-3,
batch 1-4, non-square sizes (multiples of the stride) from the smallest the reflection padding allows, every
parameter random (rates, shift kernels, positional encoding)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import strategies as st

from deploykit.nn import ACmix
from deploykit.ops.acmix import SPEC
from property_support import (MARKS, Case, input_specs, randomize, seeds, variant_tests)

pytestmark = MARKS
FAMILY = "acmix"


@st.composite
def cases(draw):
    head, head_dim = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    in_planes = draw(st.integers(1, 8))
    kernel_att, kernel_conv = draw(st.sampled_from([1, 3, 5, 7])), draw(st.sampled_from([1, 3, 5]))
    stride = draw(st.integers(1, 3))
    module = ACmix(in_planes, head * head_dim, kernel_att, head, kernel_conv, stride)
    seed = draw(seeds)
    randomize(module, seed)  # every parameter, scaled by 1/sqrt(fan-in): the softmax stays soft
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.rate1.copy_(0.5 + torch.rand(1, generator=g))
        module.rate2.copy_(-0.5 - torch.rand(1, generator=g))
    smallest = (module.padding_att // stride + 1) * stride  # a multiple of the stride above the padding
    size = [smallest + stride * draw(st.integers(0, 4)) for _ in range(2)]
    config = dict(in_planes=in_planes, head=head, head_dim=head_dim, kernel_att=kernel_att, kernel_conv=kernel_conv,
                  stride=stride, size=size)
    return Case(module.eval(), (in_planes, *size), draw(input_specs), f"ACmix {config}")


test_module_matches_float64_reference, test_grouped_export_matches_at_other_batches = variant_tests(cases, SPEC, FAMILY)


@pytest.mark.parametrize("size, message", [((7, 8), "divisible by 2"), ((2, 8), "must exceed 3")])
def test_refuses_sizes_it_cannot_take(size, message):
    with pytest.raises(ValueError, match=message):
        ACmix(4, 4, 7, 2, 3, stride=2)(torch.randn(1, 4, *size))
