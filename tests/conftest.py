"""Shared test setup: deterministic seeds and small helpers.

Markers (pyproject.toml): `slow`, `gpu`, `trt` are deselected by default; every skip states its reason.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    np.random.seed(0)
    yield


def randomize_batchnorm(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters (never identity)."""
    for norm in module.modules():
        if isinstance(norm, nn.modules.batchnorm._BatchNorm):
            c = norm.num_features
            norm.running_mean.copy_(0.2 * torch.randn(c, generator=generator))
            norm.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=generator))
            norm.weight.data.copy_(0.5 + torch.rand(c, generator=generator))
            norm.bias.data.copy_(0.2 * torch.randn(c, generator=generator))
    return module


def random_conv_config(seed: int) -> dict:
    """A conv layer shape: kernel 1/3/5, stride 1/2, dilation 1/2, groups 1/2/depthwise, K 1/4/8 kernels,
    batch 1/3, non-square input."""
    import random

    rng = random.Random(seed)
    channels = rng.choice([4, 8, 12])
    kind = rng.choice(["dense", "grouped", "depthwise"])
    groups = {"dense": 1, "grouped": 2, "depthwise": channels}[kind]
    return dict(in_channels=channels, out_channels=channels if kind == "depthwise" else rng.choice([4, 6, 10]),
                kernel=rng.choice([1, 3, 5]), stride=rng.choice([1, 2]), dilation=rng.choice([1, 2]), groups=groups,
                experts=rng.choice([1, 4, 8]), batch=rng.choice([1, 3]), height=rng.randint(9, 15),
                width=rng.randint(9, 15))


def conv_input(config: dict, batch: int | None = None, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (batch or config["batch"], config["in_channels"], config["height"], config["width"])
    return torch.randn(shape, generator=generator)


def assert_trains(module: nn.Module, x: torch.Tensor, steps: int = 30) -> None:
    """A few Adam steps towards a random target: every parameter gets a gradient and the loss falls."""
    module.train()
    with torch.no_grad():
        target = torch.randn_like(module(x))
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(module(x), target)
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
    assert all(p.grad is not None for p in module.parameters() if p.requires_grad)
    assert losses[-1] < 0.9 * losses[0]
    module.eval()


def assert_export_matches(module: nn.Module, make_input, batches=(1, 2, 5), tolerance: float = 1e-4,
                          custom_node: bool = True):
    """Export with a dynamic batch once; onnxruntime matches the module at every batch size. `custom_node`: the
    graph must (True) or must not (False) contain a ``deploykit::`` node. Returns the exported model."""
    from deploykit.export.onnx import onnx_from_model
    from deploykit.export.passes import run_passes
    from deploykit.runtime.ort import session_from_onnx
    from deploykit.verify import rel_to_range

    model, _ = run_passes(onnx_from_model(module.eval(), make_input(2)))
    assert bool([n for n in model.graph.node if n.domain == "deploykit"]) == custom_node, "deploykit:: nodes"
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    session = session_from_onnx(model, ["cpu"])
    for batch in batches:
        x = make_input(batch)
        with torch.no_grad():
            expected = module(x).numpy()
        assert rel_to_range(session.run(None, {"input": x.numpy()})[0], expected) <= tolerance
    return model


def tiny_conv_net(seed: int = 0) -> nn.Module:
    """Conv, ReLU, global pool, linear: exports in about a second and computes something no constant can fake."""
    with torch.random.fork_rng():  # seeded weights without moving the caller's random stream
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(4, 5)).eval()


def export_tiny(module: nn.Module, batch: int = 2, dynamic_batch: bool = True):
    """`module` exported as the pipeline does it (dynamo export, then the graph passes), 3x16x16 inputs."""
    from deploykit.export.onnx import onnx_from_model
    from deploykit.export.passes import run_passes

    example = torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return run_passes(onnx_from_model(module, example, dynamic_batch=dynamic_batch))[0]


def assert_one_sentence(error: BaseException, *fragments: str) -> None:
    """The error reads as one sentence (one line, one final full stop) and names the problem."""
    import re

    message = str(error)
    assert "\n" not in message and message.endswith("."), message
    assert not re.search(r"\.\s+[A-Z]", message), f"more than one sentence: {message}"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


class DivergesWhenExported(nn.Module):
    """Wraps a layer; its exported output is 1% off (`torch.compiler.is_exporting()`), so a verification of the
    wrapping model fails exactly here."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        y = self.inner(x)
        return y * 1.01 if torch.compiler.is_exporting() else y
