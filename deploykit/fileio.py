"""Writing files so that a failed or interrupted run never leaves a half-written one behind."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from deploykit.errors import DeployError


@contextlib.contextmanager
def atomic_path(destination: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `destination`; rename it onto `destination` only if the block succeeds.

    The rename is atomic on POSIX file systems, so readers see either the old file or the complete new one.
    """
    destination = Path(destination)
    temporary = destination.with_name(f".{destination.name}.{os.getpid()}.partial")
    try:
        yield temporary
        os.replace(temporary, destination)
    except OSError as err:
        raise DeployError(f"Cannot write {destination}: {err.strerror or err}.") from err
    finally:
        temporary.unlink(missing_ok=True)


def ensure_writable_dir(directory: str | os.PathLike) -> Path:
    """Create `directory` if needed and prove it is writable, before any expensive work starts."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".deploykit-write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise DeployError(f"Output directory {directory} is not writable: {err.strerror or err}.") from None
    return directory
