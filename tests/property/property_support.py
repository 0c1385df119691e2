"""Shared setup of the property-based op tests (tests/property): hypothesis profiles, input strategies, and the
grouped export check (N independently drawn layers in ONE exported model).

Profiles (selected with the environment variable ``HYPOTHESIS_PROFILE``, default ``ci``):

- ``ci``: deterministic (``derandomize=True``), modest example counts, no deadline; part of ``python -m pytest``.
- ``fuzz``: random seeds, >= 500 configurations per family, no deadline. Every test in tests/property then carries
  the ``fuzz`` marker, which the default ``-m 'not ... and not fuzz'`` deselects, so run it as
  ``HYPOTHESIS_PROFILE=fuzz python -m pytest -m fuzz tests/property`` (one family:
  ``tests/property/test_property_<f>.py``).

Neither profile writes an example database (``database=None``): nothing lands in the checkout. A failing example is
printed with its ``@reproduce_failure`` blob (``print_blob=True``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import nn

from deploykit.verify import rel_to_range

PROFILES = ("ci", "fuzz")
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
if PROFILE not in PROFILES:
    raise ValueError(f"HYPOTHESIS_PROFILE={PROFILE!r} is not one of the property tests' profiles {PROFILES}.")
FUZZ = PROFILE == "fuzz"

_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
settings.register_profile("ci", max_examples=10, derandomize=True, **_COMMON)
settings.register_profile("fuzz", max_examples=500, **_COMMON)
settings.load_profile(PROFILE)

# Every module in tests/property sets `pytestmark = MARKS`: under the fuzz profile its tests are `fuzz` tests,
# deselected by default, so that HYPOTHESIS_PROFILE=fuzz never turns the default run into an hour-long one.
MARKS = [pytest.mark.fuzz] if FUZZ else []

TOLERANCE = 1e-4  # max error / max |expected|, float32 module vs float64 reference and ORT vs module
EXPORT_BATCH = 2  # traced batch; the file then runs at RUN_BATCHES
RUN_BATCHES = (1, 3)


def examples(ci: int, fuzz: int) -> int:
    """The example count of a test under the current profile."""
    return fuzz if FUZZ else ci


def module_settings(ci: int, fuzz: int = 500) -> settings:
    """Module vs float64 reference: cheap examples, shrinking on."""
    return settings(max_examples=examples(ci, fuzz))


def export_settings(ci: int, fuzz: int) -> settings:
    """Export vs onnxruntime: each example is one export of several layers (seconds), so no shrinking (a failure
    names the failing layer's configuration itself, see `assert_group_exports`)."""
    return settings(max_examples=examples(ci, fuzz), phases=[Phase.explicit, Phase.reuse, Phase.generate])


# --- inputs ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InputSpec:
    """How a layer's input is made: random normal or structured (smooth ramps + noise + a mean), never constant."""

    kind: str
    scale: float
    seed: int

    def make(self, shape: tuple[int, ...], batch_seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 131 + batch_seed)
        if self.kind == "normal":
            return torch.randn(shape, generator=g) * self.scale
        n, c, h, w = shape
        yy = torch.linspace(-1, 1, h).view(1, 1, h, 1)
        xx = torch.linspace(-1, 1, w).view(1, 1, 1, w)
        freq = 1 + 3 * torch.rand(n, c, 1, 1, generator=g)
        phase = 6.3 * torch.rand(n, c, 1, 1, generator=g)
        ramp = torch.sin(freq * (xx + 0.7 * yy) * 3 + phase) + 0.5 * xx * yy
        return self.scale * (ramp + 0.1 * torch.randn(shape, generator=g) + 0.3)


input_specs = st.builds(InputSpec, kind=st.sampled_from(["normal", "structured"]),
                        scale=st.sampled_from([0.5, 1.0, 2.0]), seed=st.integers(0, 2 ** 16))
seeds = st.integers(0, 2 ** 16)
batches = st.integers(1, 4)


@st.composite
def channel_groups(draw, max_groups: int = 4, max_per_group: int = 3, max_out_per_group: int = 3,
                   same_channels: bool = False):
    """(in_channels, out_channels, groups, kind): dense, grouped, depthwise (out = in) or a depthwise multiplier."""
    kind = draw(st.sampled_from(["dense", "grouped", "depthwise", "multiplier"]))
    if kind == "dense":
        groups = 1
        cin = draw(st.integers(1, max_per_group * 2))
        cout = cin if same_channels else draw(st.integers(1, max_out_per_group * 2))
    elif kind == "grouped":
        groups = draw(st.integers(2, max_groups))
        cin = groups * draw(st.integers(1, max_per_group))
        cout = cin if same_channels else groups * draw(st.integers(1, max_out_per_group))
    else:
        groups = cin = draw(st.integers(1, max_groups * 2))
        cout = cin if kind == "depthwise" or same_channels else cin * draw(st.integers(2, 3))
    return cin, cout, groups, kind


def size_at_least(draw, minimum: int, extra: int = 6) -> int:
    """A spatial size from the op's minimum up to `extra` more (hypothesis shrinks towards the minimum)."""
    return max(1, minimum) + draw(st.integers(0, extra))


def min_input(kernel: int, stride: int, dilation: int, pad_total: int) -> int:
    """The smallest input size with one output pixel: dilation * (kernel - 1) + 1 - pads (at least 1)."""
    return max(1, dilation * (kernel - 1) + 1 - pad_total)


def randomize(module: nn.Module, seed: int, scale: float | None = None) -> nn.Module:
    """Every floating parameter random normal (scaled by 1/sqrt(fan-in) unless `scale`), BatchNorms non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) * (scale if scale is not None else fan_in ** -0.5))
        for norm in module.modules():
            if isinstance(norm, nn.modules.batchnorm._BatchNorm):
                c = norm.num_features
                norm.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                norm.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g))
                norm.weight.copy_(0.5 + torch.rand(c, generator=g))
                norm.bias.copy_(0.2 * torch.randn(c, generator=g))
    return module


def assert_close_to_reference(actual: torch.Tensor | np.ndarray, expected: np.ndarray, what: str,
                              tolerance: float = TOLERANCE) -> None:
    actual = actual.detach().numpy() if isinstance(actual, torch.Tensor) else actual
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != reference {expected.shape}"
    assert np.isfinite(expected).all(), f"{what}: non-finite reference"
    # An output made of padding only is exactly 0 (rel_to_range then measures the absolute error).
    error = rel_to_range(actual, expected)
    assert error <= tolerance, f"{what}: {error:.3g} of the range > {tolerance:g}"


# --- grouped export --------------------------------------------------------------------------------------------

@dataclass
class Case:
    """One drawn layer: the module, its input (per batch size), and a description naming the configuration."""

    module: nn.Module
    shape: tuple[int, int, int]  # C, H, W of its input
    inputs: InputSpec
    description: str

    def input(self, batch: int) -> torch.Tensor:
        return self.inputs.make((batch, *self.shape), batch_seed=batch)


def assert_case_matches_spec(case: Case, batch: int, spec) -> None:
    """A drawn layer's float32 output at `batch` against its variant's float64 reference (`VariantSpec`)."""
    x = case.input(batch)
    with torch.no_grad():
        actual = case.module(x)
    assert_close_to_reference(actual, spec.reference(case.module, x.double().numpy()), case.description)


def variant_tests(cases, spec, family: str, module_ci: int = 20, export_ci: int = 2, export_fuzz: int = 63):
    """The two property tests of a variant whose layers export as standard ops: (a) module vs its float64 `spec`
    reference, (b) grouped export vs onnxruntime. `cases` is the variant's strategy of `Case`s. A module assigns
    them to its own ``test_*`` names so pytest collects them there."""

    @module_settings(ci=module_ci)
    @given(case=cases(), batch=batches)
    def module_matches_float64_reference(case, batch):
        assert_case_matches_spec(case, batch, spec)

    @export_settings(ci=export_ci, fuzz=export_fuzz)
    @given(group=st.lists(cases(), min_size=8, max_size=8))
    def grouped_export_matches_at_other_batches(group):
        assert_group_exports(family, group, deploykit_nodes=0)

    return module_matches_float64_reference, grouped_export_matches_at_other_batches


class _Group(nn.Module):
    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def run(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(layer(x) for layer, x in zip(self.layers, xs))


def Group(layers: list[nn.Module]) -> nn.Module:
    """N independently drawn layers, one input and one output each: one export checks N configurations.

    forward takes N named tensors (torch.export matches `dynamic_shapes` to the signature, so not ``*xs``)."""
    names = ", ".join(f"x{i}" for i in range(len(layers)))
    namespace: dict = {}
    exec(f"def forward(self, {names}):\n    return self.run({names})\n", namespace)
    cls = type(f"Group{len(layers)}", (_Group,), {"forward": namespace["forward"]})
    return cls(layers)


def assert_group_exports(family: str, cases: list[Case], lowering: str | None = None,
                         deploykit_nodes: int | None = None, tolerance: float = TOLERANCE):
    """Export the cases as ONE model with a dynamic batch (traced at batch 2); onnxruntime matches PyTorch at each
    of RUN_BATCHES for every output. `deploykit_nodes`: the number of ``deploykit::`` nodes the graph must have."""
    from deploykit.export.onnx import onnx_from_model
    from deploykit.export.passes import run_passes
    from deploykit.runtime.ort import session_from_onnx

    group = Group([c.module for c in cases]).eval()
    names = [f"x{i}" for i in range(len(cases))]
    outputs = [f"y{i}" for i in range(len(cases))]
    described = "\n".join(f"  layer {i}: {c.description}" for i, c in enumerate(cases))
    try:
        model, _ = run_passes(onnx_from_model(group, tuple(c.input(EXPORT_BATCH) for c in cases), input_names=names,
                                              output_names=outputs, lowering=lowering))
    except Exception as err:
        raise AssertionError(f"export failed ({err}) for\n{described}") from err
    assert [i.type.tensor_type.shape.dim[0].dim_param for i in model.graph.input] == ["batch"] * len(cases)
    if deploykit_nodes is not None:
        found = sum(n.domain == "deploykit" for n in model.graph.node)
        assert found == deploykit_nodes, f"{found} deploykit:: nodes, expected {deploykit_nodes}, for\n{described}"
    session = session_from_onnx(model, ["cpu"])
    failures = []
    for batch in RUN_BATCHES:
        xs = [c.input(batch) for c in cases]
        with torch.no_grad():
            expected = [y.numpy() for y in group(*xs)]
        actual = session.run(outputs, {n: x.numpy() for n, x in zip(names, xs)})
        for i, (a, e) in enumerate(zip(actual, expected)):
            if a.shape != e.shape:
                failures.append(f"layer {i} batch {batch}: shape {a.shape} != {e.shape}: {cases[i].description}")
                continue
            error = rel_to_range(a, e)
            if not error <= tolerance:
                failures.append(f"layer {i} batch {batch}: {error:.3g} of the range: {cases[i].description}")
    assert not failures, f"{family}: onnxruntime differs from PyTorch:\n" + "\n".join(failures)
    return model
