"""The float64-anchored verdict: the three-way rule on constructed arrays, Polygraphy's replay agreeing with it,
the float32 fallback, a 1% error in one layer always failing, and the first diverging module."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from polygraphy.comparator import RunResults
from conftest import DivergesWhenExported
from torch import nn

import deploykit.nn as dnn
from deploykit import ExportConfig, export_model
from deploykit.models import random_model
from deploykit.inputs import structured_noise
from deploykit.verify import (DEFAULT_RTOL, FAILED, INCONCLUSIVE, INSTABILITY_FACTOR, PASSED, REFERENCE_ERROR_FACTOR,
                              UNSTABLE, TorchReference, compare, float64_copy, rel_to_range, sample_status,
                              torch_reference, verdict_of)

TOL = DEFAULT_RTOL
MAIN_PATH_CONVS = (nn.Conv2d, dnn.CondConv2d, dnn.DyConv2d, dnn.ODConv2d, dnn.DeformConv2d, dnn.ModulatedDeformConv2d,
                   dnn.SCConv, dnn.TVConv, dnn.ACmix)


@pytest.mark.parametrize("e_dep, e_ref, expected", [
    (0.5 * TOL, 1e-7, PASSED),  # within the tolerance
    (3.0 * TOL, 1e-4, PASSED),  # beyond it, but within K x PyTorch's own error
    (5.0 * TOL, 1e-4, FAILED),  # beyond K x PyTorch's error on a stable input
    (2.0 * TOL, 1e-7, FAILED),
    (0.9 * TOL, 20 * TOL, PASSED),  # an unstable input the deployment still gets right
    (5.0 * TOL, 20 * TOL, UNSTABLE),  # an unstable input: nothing can be said
    (2.0 * TOL, None, FAILED),  # float32 reference only: the plain tolerance
    (0.5 * TOL, None, PASSED),
])
def test_sample_status_follows_the_rule(e_dep, e_ref, expected):
    status, bound = sample_status(e_dep, e_ref, TOL)
    assert status == expected
    stable = e_ref is not None and e_ref <= INSTABILITY_FACTOR * TOL
    assert bound == (max(TOL, REFERENCE_ERROR_FACTOR * e_ref) if stable else TOL)


def test_verdict_of_samples():
    assert verdict_of([PASSED, UNSTABLE]) == PASSED
    assert verdict_of([PASSED, FAILED, UNSTABLE]) == FAILED
    assert verdict_of([UNSTABLE, UNSTABLE]) == INCONCLUSIVE


def _constructed(e_deps: list[float], e_refs: list[float], seed: int = 0) -> tuple[RunResults, TorchReference]:
    """A batch whose float64 output is smooth random data, with PyTorch float32 and the deployment placed at the
    given relative errors per sample (the error sits on one element, signs random)."""
    rng = np.random.default_rng(seed)
    fp64 = rng.normal(size=(len(e_deps), 40)).cumsum(axis=1)

    def at(errors):
        out = fp64.copy()
        for n, error in enumerate(errors):
            out[n, rng.integers(40)] += rng.choice([-1, 1]) * error * np.abs(fp64[n]).max()
        return out.astype(np.float32)

    reference = TorchReference(float32=[{"output": at(e_refs)}], float64=[{"output": fp64}])
    candidate = RunResults()
    candidate.add([{"output": at(e_deps)}], runner_name="onnxruntime")
    return candidate, reference


@pytest.mark.parametrize("e_deps, e_refs, verdict", [
    ([3e-5, 2e-4, 6e-5], [1e-5, 1e-4, 3e-5], PASSED),  # sample 1 exceeds the tolerance within 4x PyTorch's error
    ([3e-5, 2e-3, 6e-5], [1e-5, 1e-4, 3e-5], FAILED),
    ([5e-2, 8e-5, 0.2], [3e-2, 2e-5, 0.1], PASSED),  # two unstable samples, one checkable
    ([5e-2, 0.2], [3e-2, 0.1], INCONCLUSIVE),
])
def test_compare_verdict_and_polygraphy_replay_agree(e_deps, e_refs, verdict):
    candidate, reference = _constructed(e_deps, e_refs)
    verification = compare(candidate, reference)
    assert verification.verdict == verdict
    for sample, e_dep, e_ref in zip(verification.samples, e_deps, e_refs):
        assert sample.e_dep == pytest.approx(e_dep, rel=1e-3) and sample.e_ref == pytest.approx(e_ref, rel=1e-3)
    if verdict != INCONCLUSIVE:
        assert verification.polygraphy_passed == (verdict == PASSED)
    report = verification.as_dict()
    assert report["verdict"] == verdict and report["reference"] == "float64"
    assert [s["status"] for s in report["samples"]] == [s.status for s in verification.samples]


class _Float32Inside(nn.Module):
    """A model that casts to float32 internally, so its float64 copy cannot compute in float64."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.proj = nn.Parameter(torch.randn(4, 6))

    def forward(self, x):
        return torch.mm(self.conv(x).mean((2, 3)).float(), self.proj.float())


def test_a_model_that_cannot_run_in_float64_falls_back_and_says_so(tmp_path):
    result = export_model(ExportConfig(model=_Float32Inside().eval(), input_shape=(2, 3, 12, 12), output_dir=tmp_path))
    verification = result.report["verification"]
    assert result.verdict == PASSED and verification["reference"] == "float32"
    assert "float64" in verification["reference_note"] and all(s["e_ref"] is None for s in verification["samples"])


def test_the_saved_reference_is_the_float64_output_rounded():
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.Tanh(), nn.Conv2d(5, 2, 3)).eval()
    x = structured_noise(2, (3, 9, 9), torch.Generator().manual_seed(0)).numpy()
    reference = torch_reference(model, [{"input": x}], ["output"])
    saved = reference.saved_results()[0][1][0]["output"]
    with torch.no_grad():
        expected = float64_copy(model)(torch.from_numpy(x).double()).float().numpy()
    assert saved.dtype == np.float32 and np.array_equal(saved, expected)


@pytest.mark.parametrize("arch, size", [("od_resnet18", 64),
                                        *(pytest.param(a, s, marks=pytest.mark.slow) for a, s in
                                          [("dcn_resnet50", 64), ("scnet50", 128), ("tvconv_mobilenet_v2_x0_1", 96)])])
def test_a_one_percent_error_in_one_layer_always_fails(arch, size):
    """The bound a stable input allows stays far below what a 1% error (each element off by +-1%) in one middle
    conv of the main path does."""
    model = random_model(arch, input_shape=(3, size, size), calibration_batches=1)
    side_paths = ("offset", "weight_layers", "attention", "routing")  # offsets, TVConv's generator, attention trunks
    convs = [name for name, m in model.named_modules()
             if isinstance(m, MAIN_PATH_CONVS) and not any(part in name for part in side_paths)]
    layer = dict(model.named_modules())[convs[len(convs) // 2]]
    x = structured_noise(4, (3, size, size), torch.Generator().manual_seed(5))
    reference = torch_reference(model, [{"input": x.numpy()}], ["output"])
    signs = {}

    def one_percent_off(module, args, out):
        signs.setdefault("pattern", torch.randint(0, 2, out.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1)
        return out * (1 + 0.01 * signs["pattern"])

    handle = layer.register_forward_hook(one_percent_off)
    try:
        with torch.no_grad():
            deployed = model(x).numpy()
    finally:
        handle.remove()
    candidate = RunResults()
    candidate.add([{"output": deployed}], runner_name="onnxruntime")
    statuses = [s.status for s in compare(candidate, reference).samples]
    assert FAILED in statuses and PASSED not in statuses, statuses


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                                  DivergesWhenExported(nn.Conv2d(8, 8, 3, padding=1)), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean((2, 3)))


def test_the_first_divergence_names_the_module_that_computes_differently(tmp_path, caplog):
    torch.manual_seed(1)
    result = export_model(ExportConfig(model=_Net().eval(), input_shape=(1, 3, 16, 16), output_dir=tmp_path))
    verification = result.report["verification"]
    assert result.verdict == FAILED and result.report["verdict"] == FAILED
    divergence = verification["first_divergence"]
    assert divergence["module"] == "body.2" and divergence["class"] == "DivergesWhenExported"
    assert divergence["e_dep"] == pytest.approx(0.01, rel=0.05) and divergence["e_dep"] > divergence["bound"]
    assert any(node.startswith("Mul ") for node in divergence["onnx_nodes"])
    assert divergence["summary"].startswith("first divergence: body.2 (DivergesWhenExported;")
    assert verification["polygraphy_passed"] is False


def test_a_passing_run_does_not_localise(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3)).eval()
    result = export_model(ExportConfig(model=model, input_shape=(1, 3, 12, 12), output_dir=tmp_path))
    assert result.verdict == PASSED and result.report["verification"]["first_divergence"] is None
    assert "localize" not in result.report["timings_s"]
    assert result.report["verification"]["polygraphy_passed"] is True


class _Chaotic(nn.Module):
    """sin of a huge argument: float32 rounding decides the output, so every input is unstable."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return torch.sin(1e5 * self.conv(x))


def test_an_input_chaotic_for_float32_is_inconclusive(tmp_path):
    result = export_model(ExportConfig(model=_Chaotic().eval(), input_shape=(1, 3, 10, 10), output_dir=tmp_path))
    verification = result.report["verification"]
    assert result.verdict == INCONCLUSIVE and verification["counts"] == {"passed": 0, "failed": 0, "unstable": 3}
    assert all(s["e_ref"] > INSTABILITY_FACTOR * TOL for s in verification["samples"])


def test_agreement_reports_top1_top5_and_cosine():
    from deploykit.verify import agreement

    rng = np.random.default_rng(0)
    scores = rng.normal(size=(6, 20)).astype(np.float32)
    deployed = scores.copy()
    deployed[0, scores[0].argmax()] -= 10  # one sample's top-1 changes
    result = agreement([{"output": deployed}], [{"output": scores}])
    assert result["top1"] == pytest.approx(5 / 6) and result["samples"] == 6
    assert result["top5"] == pytest.approx(5 / 6) and result["cosine_min"] < 0.99
    assert rel_to_range(deployed[1:], scores[1:]) == 0


def test_nudged_inputs_move_every_element_by_one_ulp_in_a_seeded_direction():
    from deploykit.verify import nudged

    x = structured_noise(2, (3, 5, 7), torch.Generator().manual_seed(2)).numpy()
    moved = nudged([{"input": x}], seed=0)[0]["input"]
    steps = (moved.view(np.int32).astype(np.int64) - x.view(np.int32).astype(np.int64)) * np.sign(x)
    assert moved.dtype == np.float32 and set(np.unique(steps)) == {-1, 1}
    assert np.array_equal(moved, nudged([{"input": x}], seed=0)[0]["input"])
    assert not np.array_equal(moved, nudged([{"input": x}], seed=1)[0]["input"])


def test_the_first_divergence_inside_a_dynamic_conv_network():
    """In od_resnet18 (DynamicConv2d nodes, BatchNorms folded into them, attention trunks with tuple outputs) a
    1% error in one ODConv layer is traced back to that layer, not to a module around or before it."""
    import copy

    from deploykit.localize import first_divergence
    from deploykit.export.onnx import onnx_from_model
    from deploykit.export.passes import run_passes

    model = copy.deepcopy(random_model("od_resnet18", input_shape=(3, 64, 64), calibration_batches=1))
    model.layer3[0].conv2 = DivergesWhenExported(model.layer3[0].conv2)
    x = structured_noise(2, (3, 64, 64), torch.Generator().manual_seed(0))
    exported, _ = run_passes(onnx_from_model(model, x))
    divergence = first_divergence(model, exported, {"input": x.numpy()}, 0, 1, TOL)
    assert divergence is not None and divergence.module == "layer3.0.conv2"
    assert divergence.module_class == "DivergesWhenExported" and divergence.e_dep == pytest.approx(0.01, rel=0.05)
