"""Python access to deploykit's GPU kernels (``plugins/``) through their plain C launchers.

The TensorRT plugins call the same launchers; this module lets tests and benchmarks run them on PyTorch tensors
without TensorRT. `build_kernels` compiles ``libdeploykit_kernels.so`` with nvcc from a source checkout (the CMake
project in ``plugins/`` builds the same library); `ConvKernels` calls it on CUDA tensors. `ConvKernels` also drives
the host emulator of the tests (`symbol_prefix="emulate"`), which runs the kernels' shared code on CPU tensors.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from deploykit.errors import DeployError
from deploykit.ops.reference import conv_output_size

PLUGINS_DIR = Path(__file__).resolve().parents[2] / "plugins"
KERNEL_SOURCES = ("deform_conv2d/deformConv2dKernel.cu", "dynamic_conv2d/dynamicConv2dKernel.cu")
LIBRARY_NAME = "libdeploykit_kernels.so"

_DATA_TYPES = {torch.float32: 0, torch.float16: 1}
_STATUS = {-1: "the shapes do not describe a valid convolution", -2: "unsupported element type",
           -3: "a required input is missing"}


class ConvShape(ctypes.Structure):
    """`DeploykitConv2dShape` (plugins/common/convShape.h)."""

    _fields_ = [("batch", ctypes.c_int64), ("channels", ctypes.c_int64), ("height", ctypes.c_int64),
                ("width", ctypes.c_int64), ("outChannels", ctypes.c_int64), ("kernelH", ctypes.c_int64),
                ("kernelW", ctypes.c_int64), ("strides", ctypes.c_int32 * 2), ("pads", ctypes.c_int32 * 4),
                ("dilations", ctypes.c_int32 * 2), ("group", ctypes.c_int32)]

    @classmethod
    def of(cls, x: torch.Tensor, out_channels: int, kernel: Sequence[int], strides: Sequence[int],
           pads: Sequence[int], dilations: Sequence[int], group: int) -> ConvShape:
        return cls(*x.shape, out_channels, *kernel, (ctypes.c_int32 * 2)(*strides), (ctypes.c_int32 * 4)(*pads),
                   (ctypes.c_int32 * 2)(*dilations), group)


def cuda_home() -> Path:
    """The CUDA toolkit's root: $CUDA_HOME, else /usr/local/cuda."""
    return Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))


def nvcc_path() -> str | None:
    """nvcc on PATH, else in the CUDA toolkit's bin/."""
    found = shutil.which("nvcc")
    if found:
        return found
    nvcc = cuda_home() / "bin" / "nvcc"
    return str(nvcc) if nvcc.is_file() else None


def build_kernels(build_dir: str | os.PathLike, arch: str = "native", extra_flags: Sequence[str] = ()) -> Path:
    """Compile the kernels' launchers into ``<build_dir>/libdeploykit_kernels.so`` and return its path.

    Args:
        build_dir: output directory (created if missing).
        arch: nvcc ``-arch`` value; "native" targets the GPUs of this machine.
        extra_flags: more nvcc flags.
    """
    nvcc = nvcc_path()
    if nvcc is None:
        raise DeployError("nvcc was not found (looked on PATH and in CUDA_HOME); install the CUDA toolkit to build "
                          "deploykit's kernels.")
    if not (PLUGINS_DIR / KERNEL_SOURCES[0]).is_file():
        raise DeployError(f"The kernel sources are not in {PLUGINS_DIR}; building them needs a source checkout.")
    build_dir = Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    target = build_dir / LIBRARY_NAME
    with tempfile.NamedTemporaryFile(dir=build_dir, suffix=".so", delete=False) as partial:
        command = [nvcc, "-std=c++17", "-O3", f"-arch={arch}", "-shared", "-Xcompiler", "-fPIC", *extra_flags,
                   *(str(PLUGINS_DIR / source) for source in KERNEL_SOURCES), "-o", partial.name]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        Path(partial.name).unlink(missing_ok=True)
        raise DeployError(f"nvcc failed to build the kernels: {result.stderr.strip().splitlines()[-1]}")
    os.replace(partial.name, target)
    return target


class ConvKernels:
    """The launchers of one kernel library, called on PyTorch tensors.

    Args:
        library: path of ``libdeploykit_kernels.so`` (CUDA tensors), or of the tests' host emulator.
        symbol_prefix: "deploykit" for the CUDA launchers, "emulate" for the host emulator (CPU tensors, no
            stream argument).
    """

    def __init__(self, library: str | os.PathLike, symbol_prefix: str = "deploykit") -> None:
        self._library = ctypes.CDLL(str(library))
        self._prefix = symbol_prefix
        self._on_gpu = symbol_prefix == "deploykit"
        self._deform = self._function("DeformConv2dForward")
        self._dynamic = self._function("DynamicConv2dForward")
        self._workspace_size = self._function("DynamicConv2dWorkspaceSize", ctypes.c_size_t)

    def deform_conv2d(self, x: torch.Tensor, weight: torch.Tensor, offset: torch.Tensor, bias: torch.Tensor | None,
                      mask: torch.Tensor | None, strides: Sequence[int], pads: Sequence[int],
                      dilations: Sequence[int], group: int, offset_group: int) -> torch.Tensor:
        """deploykit::DeformConv2d (pads: top, left, bottom, right); bias and mask may be None."""
        shape = ConvShape.of(x, weight.shape[0], weight.shape[2:], strides, pads, dilations, group)
        y = x.new_empty(x.shape[0], weight.shape[0], *conv_output_size(x.shape[2:], weight.shape[2:], strides, pads,
                                                                        dilations))
        self._call("DeformConv2d", self._deform, ctypes.byref(shape), ctypes.c_int32(offset_group),
                   self._type(x), *self._pointers(x, weight, offset, bias, mask, y))
        return y

    def dynamic_conv2d(self, x: torch.Tensor, weight: torch.Tensor, attention: torch.Tensor,
                       bias: torch.Tensor | None, taps: torch.Tensor | None, strides: Sequence[int],
                       pads: Sequence[int], dilations: Sequence[int], group: int) -> torch.Tensor:
        """deploykit::DynamicConv2d (W [K, M, C/g, kH, kW], A [N, K], B [K, M], S [N or 1, kH, kW])."""
        shape = ConvShape.of(x, weight.shape[1], weight.shape[3:], strides, pads, dilations, group)
        y = x.new_empty(x.shape[0], weight.shape[1], *conv_output_size(x.shape[2:], weight.shape[3:], strides, pads,
                                                                        dilations))
        workspace = torch.empty(self._workspace_size(ctypes.byref(shape), self._type(x)), dtype=torch.uint8,
                                device=x.device)
        tap_samples = taps.shape[0] if taps is not None else 1
        self._call("DynamicConv2d", self._dynamic, ctypes.byref(shape), ctypes.c_int64(weight.shape[0]),
                   ctypes.c_int64(tap_samples), self._type(x),
                   *self._pointers(x, weight, attention, bias, taps, y, workspace))
        return y

    def _function(self, name: str, restype=ctypes.c_int):
        function = getattr(self._library, self._prefix + name)
        function.restype = restype
        return function

    def _type(self, x: torch.Tensor) -> int:
        if x.dtype not in _DATA_TYPES:
            raise DeployError(f"The kernels take float32 or float16 tensors, not {x.dtype}.")
        return _DATA_TYPES[x.dtype]

    def _pointers(self, *tensors: torch.Tensor | None) -> list[ctypes.c_void_p]:
        device = "cuda" if self._on_gpu else "cpu"
        dtype = tensors[0].dtype
        pointers = []
        for tensor in tensors:
            if tensor is None:
                pointers.append(ctypes.c_void_p(None))
                continue
            if tensor.device.type != device or not tensor.is_contiguous():
                raise DeployError(f"The kernels take contiguous {device} tensors.")
            if tensor.dtype not in (dtype, torch.uint8):
                raise DeployError(f"Every tensor must be {dtype}, got one of {tensor.dtype}.")
            pointers.append(ctypes.c_void_p(tensor.data_ptr()))
        return pointers

    def _call(self, op: str, function, *args) -> None:
        if self._on_gpu:
            args = (*args, ctypes.c_void_p(torch.cuda.current_stream().cuda_stream))
        status = function(*args)
        if status != 0:
            reason = _STATUS.get(status, f"CUDA error {status}")
            raise DeployError(f"The {op} kernel failed: {reason}.")
