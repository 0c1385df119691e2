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
    for plugin in spec.plugins:
        assert_plugin_folder(plugin)
    assert spec.tolerance.get("float32", 1) <= 1e-4, "fp32 tolerance is at most 1e-4 unless documented"


def assert_plugin_folder(name: str) -> None:
    """plugins/<op>/ holds <op>Kernel.h/.cu (the C launcher), <op>Plugin.h/.cpp (TensorRT) and a README."""
    folder = REPO / "plugins" / name
    stem = name.split("_")[0] + "".join(part.capitalize() for part in name.split("_")[1:])
    for file in (f"{stem}Kernel.h", f"{stem}Kernel.cu", f"{stem}Plugin.h", f"{stem}Plugin.cpp", "README.md"):
        assert (folder / file).is_file(), f"plugins/{name}/{file}"
    assert name in (REPO / "plugins" / "CMakeLists.txt").read_text(), "plugins/CMakeLists.txt builds it"


def test_every_plugin_folder_belongs_to_a_custom_op():
    plugins = {plugin for spec in VARIANTS for plugin in spec.plugins}
    folders = {p.name for p in (REPO / "plugins").iterdir() if p.is_dir() and p.name != "common"}
    assert folders == plugins == {"deform_conv2d", "dynamic_conv2d"}


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
