"""Property tests of TVConv against the float64 reference and through grouped dynamic-batch exports (the weight
generator folded). Drawn: channels 1-6, kernel 1/3/5, stride 1-3, affinity channels, generator width and 0-2
intermediate layers, bias on/off, output maps from 1x1 (non-square), batch 1-4, parameters away from init."""

from __future__ import annotations

import pytest
import torch
from hypothesis import strategies as st

from deploykit.nn import TVConv
from deploykit.ops.tvconv import SPEC
from property_support import (MARKS, Case, input_specs, seeds, variant_tests)

pytestmark = MARKS
FAMILY = "tvconv"


@st.composite
def cases(draw):
    config = dict(channels=draw(st.integers(1, 6)), TVConv_k=draw(st.sampled_from([1, 3, 5])),
                  stride=draw(st.integers(1, 3)), TVConv_posi_chans=draw(st.integers(1, 4)),
                  TVConv_inter_chans=draw(st.integers(1, 8)), TVConv_inter_layers=draw(st.integers(0, 2)),
                  TVConv_Bias=draw(st.booleans()), h=draw(st.integers(1, 8)), w=draw(st.integers(1, 8)))
    layer = TVConv(**config)
    g = torch.Generator().manual_seed(draw(seeds))
    with torch.no_grad():  # trained-looking: affinity maps and per-pixel LayerNorm affines away from 1 / 0
        for name, p in layer.named_parameters():
            p.add_((0.5 if p.dim() > 3 and "posi_map" not in name else 0.3) * torch.randn(p.shape, generator=g))
    return Case(layer.eval(), (config["channels"], *layer.input_size), draw(input_specs), f"TVConv {config}")


test_module_matches_float64_reference, test_grouped_export_matches_at_other_batches = variant_tests(cases, SPEC, FAMILY)


def test_refuses_an_even_kernel():
    with pytest.raises(ValueError, match="must be odd"):
        TVConv(4, 4)
