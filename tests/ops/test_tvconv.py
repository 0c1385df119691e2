"""TVConv: float64 reference, the official unfold formulation and state_dict, folded export, fixed resolution."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from conftest import assert_trains
from deploykit.errors import DeployError
from deploykit.export.onnx import onnx_from_model
from deploykit.export.passes import fold_constants, run_passes
from deploykit.nn.tvconv import TVConv
from deploykit.ops.tvconv import SPEC
from deploykit.runtime.ort import session_from_onnx
from deploykit.verify import rel_to_range


def random_config(seed: int) -> dict:
    """Kernel 3/5, stride 1/2, non-square maps, 0-2 intermediate layers, bias on/off, batch 1/3."""
    rng = random.Random(seed)
    return dict(channels=rng.choice([4, 6, 8]), TVConv_k=rng.choice([3, 5]), stride=rng.choice([1, 2]),
                TVConv_posi_chans=rng.choice([2, 4]), TVConv_inter_chans=rng.choice([4, 8]),
                TVConv_inter_layers=rng.choice([0, 1, 2]), TVConv_Bias=rng.random() < 0.4, h=rng.randint(4, 9),
                w=rng.randint(4, 9), batch=rng.choice([1, 3]))


def make_layer(config: dict, seed: int) -> TVConv:
    """A layer with trained-looking parameters: affinity maps and per-pixel LayerNorm affines away from 1/0."""
    layer = TVConv(**{k: v for k, v in config.items() if k != "batch"})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            scale = 0.5 if p.dim() > 3 and "posi_map" not in name else 0.3
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return layer.eval()


def layer_input(layer: TVConv, batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, layer.channels_, *layer.input_size, generator=torch.Generator().manual_seed(seed))


CONFIGS = [random_config(seed) for seed in range(12)]


@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_matches_float64_reference(index):
    config = CONFIGS[index]
    layer = make_layer(config, index)
    x = layer_input(layer, config["batch"])
    with torch.no_grad():
        actual = layer(x).numpy()
    assert rel_to_range(actual, SPEC.reference(layer, x.double().numpy())) <= SPEC.tolerance["float32"]


@pytest.mark.parametrize("index", [0, 3, 5])
def test_matches_the_official_unfold_formulation(index):
    """The official forward: nn.Unfold(k, 1, (k-1)/2, stride), times the weights, summed over taps."""
    config = CONFIGS[index]
    layer = make_layer(config, index)
    x = layer_input(layer, 2)
    k, (h, w) = layer.kernel_size, layer.out_size
    with torch.no_grad():
        weights = layer.weight_layers(layer.posi_map).view(1, layer.channels_, k * k, h, w)
        windows = nn.Unfold(k, 1, (k - 1) // 2, layer.stride_)(x).view(2, layer.channels_, k * k, h, w)
        expected = (weights * windows).sum(dim=2)
        if layer.bias_layers is not None:
            expected = expected + layer.bias_layers(layer.posi_map)
        assert rel_to_range(layer(x).numpy(), expected.numpy()) <= 1e-6


def test_state_dict_is_the_official_one():
    layer = TVConv(8, 3, 2, TVConv_posi_chans=4, TVConv_inter_chans=16, TVConv_inter_layers=1, TVConv_Bias=True,
                   h=5, w=6)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}

    def generator(prefix: str, out: int) -> dict:  # [conv3x3 -> LayerNorm([16, h, w]) -> ReLU] x 2, conv3x3
        return {f"{prefix}.0.0.weight": (16, 4, 3, 3), f"{prefix}.0.1.weight": (16, 5, 6),
                f"{prefix}.0.1.bias": (16, 5, 6), f"{prefix}.1.0.weight": (16, 16, 3, 3),
                f"{prefix}.1.1.weight": (16, 5, 6), f"{prefix}.1.1.bias": (16, 5, 6),
                f"{prefix}.2.weight": (out, 16, 3, 3)}

    expected = {"TVConv_k": (), "TVConv_k_square": (), "stride": (), "channels": (), "h": (), "w": (),
                "posi_map": (1, 4, 5, 6), **generator("weight_layers", 8 * 9), **generator("bias_layers", 8)}
    assert shapes == expected
    state = layer.state_dict()
    assert [int(state[k]) for k in ("TVConv_k", "TVConv_k_square", "stride", "channels", "h", "w")] == [3, 9, 2, 8, 5, 6]
    assert state["TVConv_k"].dtype == torch.int64 and torch.equal(state["posi_map"], torch.ones(1, 4, 5, 6))


def test_refuses_another_resolution_in_one_sentence():
    layer = make_layer(CONFIGS[1], 1)
    h, w = layer.input_size
    with pytest.raises(ValueError, match=f"{h}x{w} input"):
        layer(torch.randn(1, layer.channels_, h + 2, w))


def test_trains():
    layer = make_layer(dict(CONFIGS[2], TVConv_Bias=True), 2)
    assert_trains(layer, layer_input(layer, 4))


@pytest.mark.parametrize("index", [0, 4, 7])
def test_export_folds_the_weight_generator_and_runs_at_any_batch(index):
    config = CONFIGS[index]
    layer = make_layer(config, index)
    raw = onnx_from_model(layer, layer_input(layer, 2))
    model, report = run_passes(raw)
    counts = Counter(n.op_type for n in model.graph.node)
    # Only the per-pixel conv is left: one shift Conv, Mul, ReduceSum (+ Add of the folded bias maps).
    assert set(counts) <= {"Conv", "Reshape", "Mul", "ReduceSum", "Add"} and counts["Conv"] == 1, counts
    assert report.after.nodes <= report.before.nodes  # small generators are folded by the exporter already
    folded = session_from_onnx(model, ["cpu"])
    unfolded = session_from_onnx(raw, ["cpu"])
    for batch in (1, 2, 5):
        x = layer_input(layer, batch, seed=batch)
        with torch.no_grad():
            expected = layer(x).numpy()
        actual = folded.run(None, {"input": x.numpy()})[0]
        assert rel_to_range(actual, expected) <= 1e-4
        # The folded graph computes what the unfolded one computes (same kernels evaluated once at export).
        np.testing.assert_allclose(actual, unfolded.run(None, {"input": x.numpy()})[0], rtol=0, atol=1e-6 *
                                   np.abs(expected).max())


def test_folding_touches_nothing_that_depends_on_the_input():
    layer = make_layer(CONFIGS[0], 0)
    raw = onnx_from_model(layer, layer_input(layer, 2))
    assert sum(n.op_type == "Conv" for n in raw.graph.node) > 1, "the exporter left the generator for the pass"
    folded = fold_constants(raw)
    dependent = {"Conv": 1, "Reshape": 1, "Mul": 1, "ReduceSum": 1}  # the shift conv and what follows it
    assert Counter(n.op_type for n in folded.graph.node) == dependent
    assert len(raw.graph.node) > len(folded.graph.node)


def test_pipeline_names_the_fixed_resolution(tmp_path):
    from deploykit import ExportConfig, export_model

    with pytest.raises(DeployError, match="takes only 3x96x96 inputs"):
        export_model(ExportConfig(model=torch.nn.Identity(), arch="tvconv_mobilenet_v2_x0_1",
                                  input_shape=(1, 3, 112, 112), output_dir=tmp_path))
