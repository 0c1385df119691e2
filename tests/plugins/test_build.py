"""The GPU code builds where it can be built here: nvcc compiles the kernels (compile only, no GPU needed), the
CMake project builds the kernel library without TensorRT, and the plugin sources compile against TensorRT's
headers where they are available (TENSORRT_INCLUDE_DIR)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from deploykit.errors import DeployError
from deploykit.runtime.kernels import (
    KERNEL_SOURCES,
    LIBRARY_NAME,
    PLUGINS_DIR,
    ConvKernels,
    build_kernels,
    cuda_home,
    nvcc_path,
)

NVCC = nvcc_path()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed: the CUDA kernels cannot be compiled")
ARCHES = ("75", "90")  # the oldest architecture nvcc 13 targets, and Hopper


@needs_nvcc
@pytest.mark.parametrize("source", KERNEL_SOURCES)
def test_kernel_compiles_without_warnings(source, tmp_path):
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHES]
    command = [NVCC, "-std=c++17", "-O3", *gencode, "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra",
               "-c", str(PLUGINS_DIR / source), "-o", str(tmp_path / "kernel.o")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "kernel.o").stat().st_size > 0


@needs_nvcc
def test_kernel_library_builds_and_exports_the_launchers(tmp_path):
    library = build_kernels(tmp_path, arch="sm_90")
    assert library == tmp_path / LIBRARY_NAME and not list(tmp_path.glob("*.partial*"))
    ConvKernels(library)  # resolves every launcher symbol; calling them needs a GPU (tests marked gpu)


@needs_nvcc
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_builds_the_kernels_alone_without_tensorrt(tmp_path):
    env = {**os.environ, "CUDACXX": NVCC, "TENSORRT_ROOT": str(tmp_path / "no-tensorrt")}
    configure = subprocess.run(["cmake", "-S", str(PLUGINS_DIR), "-B", str(tmp_path), "-DCMAKE_CUDA_ARCHITECTURES=90"],
                               capture_output=True, text=True, env=env)
    assert configure.returncode == 0, configure.stdout + configure.stderr
    assert "TensorRT" in configure.stdout and "kernels" in configure.stdout
    build = subprocess.run(["cmake", "--build", str(tmp_path), "-j2"], capture_output=True, text=True, env=env)
    assert build.returncode == 0, build.stdout + build.stderr
    assert (tmp_path / LIBRARY_NAME).is_file() and not (tmp_path / "libdeploykit_plugins.so").exists()


TRT_INCLUDE = os.environ.get("TENSORRT_INCLUDE_DIR")


@pytest.mark.skipif(not TRT_INCLUDE or not (Path(TRT_INCLUDE) / "NvInfer.h").is_file(),
                    reason="TensorRT's headers are not available (set TENSORRT_INCLUDE_DIR to compile the plugins)")
@pytest.mark.parametrize("source", sorted(str(p.relative_to(PLUGINS_DIR)) for p in PLUGINS_DIR.glob("*/*.cpp")))
def test_plugin_compiles_against_tensorrt_headers(source, tmp_path):
    command = ["g++", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-fPIC", f"-I{TRT_INCLUDE}", f"-I{cuda_home() / 'include'}",
               f"-I{PLUGINS_DIR}", "-c", str(PLUGINS_DIR / source), "-o", str(tmp_path / "plugin.o")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_building_without_nvcc_says_so(tmp_path, monkeypatch):
    import deploykit.runtime.kernels as kernels

    monkeypatch.setattr(kernels, "nvcc_path", lambda: None)
    with pytest.raises(DeployError, match="nvcc was not found"):
        kernels.build_kernels(tmp_path)
    assert not list(tmp_path.iterdir())
