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
