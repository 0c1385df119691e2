"""Every registered variant has all its layers, under one stem: module, export contract, test, plugin."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from deploykit.variants import VARIANTS

REPO = Path(__file__).resolve().parents[1]
NAMES = [spec.name for spec in VARIANTS]


@pytest.mark.parametrize("spec", VARIANTS, ids=NAMES)
def test_variant_has_every_layer(spec):
    assert spec.module.__module__ == f"deploykit.nn.{spec.name}", "the module lives in deploykit/nn/<name>.py"
    assert importlib.import_module(f"deploykit.ops.{spec.name}").SPEC is spec, "its contract in deploykit/ops/<name>.py"
    assert (REPO / "tests" / "ops" / f"test_{spec.name}.py").is_file(), "its tests in tests/ops/test_<name>.py"
    if spec.plugin is not None:
        assert (REPO / "plugins" / spec.plugin).is_dir(), "its TensorRT plugin in plugins/<plugin>/"
    assert spec.tolerance.get("float32", 1) <= 1e-4, "fp32 tolerance is at most 1e-4 unless documented"


def test_every_module_file_is_a_registered_variant():
    files = {p.stem for p in (REPO / "deploykit" / "nn").glob("*.py") if p.stem != "__init__"}
    assert files == set(NAMES)


def test_every_contract_file_is_a_variant_or_an_op_they_share():
    """ops/<name>.py is a variant (it has a SPEC) or defines a custom op that variants export; each has tests."""
    shared_ops = {op for spec in VARIANTS for op in spec.custom_ops}
    for path in (REPO / "deploykit" / "ops").glob("*.py"):
        if path.stem in ("__init__", "spec", "reference", "autograd"):
            continue
        module = importlib.import_module(f"deploykit.ops.{path.stem}")
        defines_shared_op = any(value in shared_ops for value in vars(module).values()
                                if value.__class__.__name__ == "CustomOp")
        is_variant = getattr(module, "SPEC", None) in VARIANTS
        assert is_variant or (defines_shared_op and "SPEC" not in vars(module)), path.name
        assert (REPO / "tests" / "ops" / f"test_{path.stem}.py").is_file(), f"tests/ops/test_{path.stem}.py"


def test_readme_support_matrix_names_every_variant():
    readme = (REPO / "README.md").read_text()
    for spec in VARIANTS:
        assert f"`{spec.name}`" in readme, f"README support matrix lacks {spec.name}"
