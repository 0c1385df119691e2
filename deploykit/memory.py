"""Running out of memory, said as such: a run that cannot fit is refused early where a cheap estimate shows it, and
an allocation failure later is reported as memory (with the size asked for), not as a shape the model cannot take.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

from deploykit.errors import DeployError

_CGROUP = Path("/sys/fs/cgroup")
_ALLOCATION = re.compile(r"allocate (\d+) bytes|buffer of size (\d+)")  # PyTorch's, onnxruntime's words
_OOM_MARKERS = ("can't allocate memory", "DefaultCPUAllocator", "not enough memory", "out of memory",
                "Failed to allocate memory")


def available_bytes() -> int | None:
    """Memory this process may still use: the smaller of the system's available memory and what is left under
    its cgroup's limit (containers, `systemd-run -p MemoryMax`); None where neither can be read."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = (_CGROUP / "memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int((_CGROUP / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def check_fits(needed: int, what: str) -> None:
    """Refuse before the work starts when `needed` bytes (a lower bound of what it takes) exceed what is available:
    never refuses a run that would fit."""
    available = available_bytes()
    if available is not None and needed > available:
        raise DeployError(f"{what} needs at least {_size(needed)} of memory, more than the {_size(available)} "
                          f"available; pass a smaller --input-shape batch or size, or free memory.")


def out_of_memory(err: BaseException, what: str) -> DeployError | None:
    """`err` as an out-of-memory `DeployError` if it is one (MemoryError, or PyTorch's or onnxruntime's allocator
    failing), else None."""
    text = str(err)
    if not (isinstance(err, MemoryError) or any(marker in text for marker in _OOM_MARKERS)):
        return None
    asked = _ALLOCATION.search(text)
    available = available_bytes()
    details = [*([f"one allocation of {_size(int(asked.group(1) or asked.group(2)))} failed"] if asked else []),
               *([f"{_size(available)} is free now"] if available is not None else [])]
    said = f" ({'; '.join(details)})" if details else ""
    return DeployError(f"{what} ran out of memory{said}; pass a smaller --input-shape batch or size, or run "
                       f"on a machine with more memory.")


@contextlib.contextmanager
def memory_errors(what: str) -> Iterator[None]:
    """Turn running out of memory in the block into `out_of_memory`'s `DeployError`; other errors pass (onnxruntime's
    errors are not RuntimeErrors, hence the broad catch)."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - re-raised unless it is out of memory
        oom = out_of_memory(err, what)
        if oom is None:
            raise
        raise oom from err


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"
