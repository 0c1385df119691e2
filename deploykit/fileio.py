"""Writing files so that a failed or interrupted run never leaves a half-written one behind."""

from __future__ import annotations

import contextlib
import errno
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from deploykit.errors import DeployError


@contextlib.contextmanager
def atomic_path(destination: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `destination`; rename it onto `destination` only if the block succeeds.

    The rename is atomic on POSIX file systems, so readers see either the old file or the complete new one.
    """
    destination = Path(destination)
    temporary = destination.with_name(partial_name(destination.name))
    try:
        yield temporary
        os.replace(temporary, destination)
    except OSError as err:
        raise DeployError(f"Cannot write {destination}: {err.strerror or err}.") from err
    finally:  # also on an interrupt (KeyboardInterrupt, SIGTERM via the CLI): never leave the temporary behind
        temporary.unlink(missing_ok=True)


def partial_name(name: str) -> str:
    """A hidden temporary name for `name`, unique per process and call (two threads never share one)."""
    return f".{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial"


def missing_reason(path: str | os.PathLike) -> str:
    """Why `path` is not a file that can be opened, as the completion of "<path> ...": "does not exist", "is a
    symbolic link loop", "is a symbolic link to X, which does not exist", "is a directory", ..."""
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "is a symbolic link loop" if os.path.islink(path) else "lies under a symbolic link loop"
        if os.path.islink(path):
            return f"is a symbolic link to {os.readlink(path)}, which does not exist"
        if err.errno == errno.EACCES:
            return "cannot be reached (permission denied)"
        return "does not exist"
    return "is a directory" if os.path.isdir(path) else "is not a regular file"


def nearest_existing(path: Path) -> Path:
    """`path`, or its closest ancestor that exists: where creating it would start."""
    return next((p for p in (path, *path.parents) if p.exists()), Path("."))


def check_writable_dir(directory: str | os.PathLike, option: str = "--output-dir") -> Path:
    """Prove, before any expensive work and without creating anything, that `directory` can be created or written:
    it is a directory already, or its nearest existing ancestor is a writable directory."""
    directory = Path(directory)
    existing = nearest_existing(directory)
    if not existing.is_dir():
        where = "it is a file" if existing == directory else f"{existing} is a file"
        raise DeployError(f"Output directory {directory} is not writable: {where}; choose another {option}.")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "permission denied" if existing == directory else f"{existing} is read-only"
        raise DeployError(f"Output directory {directory} is not writable: {where}; choose another {option}.")
    return directory


LOCK_FILE = ".deploykit.lock"
LOCK_WAIT_S = 120.0  # how long a run waits for another one writing the same directory before it gives up


@contextlib.contextmanager
def output_directory(directory: str | os.PathLike, option: str = "--output-dir") -> Iterator[Path]:
    """Create `directory` (and missing parents) for the block, holding an exclusive lock in it; on any error or
    interrupt in the block, remove again the directories this call created (if still empty).

    The lock (``flock`` on ``.deploykit.lock``, removed when the block ends) serialises runs that write the same
    directory, so their files never mix: a second run waits for the first one's write to finish (up to
    `LOCK_WAIT_S`), then writes its own complete set.
    """
    directory = Path(directory)
    created: list[Path] = []
    try:
        for path in reversed((directory, *directory.parents)):
            if not path.exists():
                try:
                    path.mkdir()
                    created.insert(0, path)  # innermost first
                except FileExistsError:  # another run made it at the same moment
                    pass
        with _directory_lock(directory):
            yield directory
    except BaseException as err:
        for path in created:
            with contextlib.suppress(OSError):  # not empty: someone else's files are in it now
                path.rmdir()
        if isinstance(err, OSError):
            raise DeployError(f"Cannot create the output directory {directory}: {err.strerror or err}; choose "
                              f"another {option}.") from err
        raise


@contextlib.contextmanager
def _directory_lock(directory: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    path = directory / LOCK_FILE
    deadline = time.monotonic() + LOCK_WAIT_S
    waiting = False
    while True:
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(handle)
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            if time.monotonic() > deadline:
                raise DeployError(f"Another deploykit run has been writing to {directory} for over "
                                  f"{LOCK_WAIT_S:.0f} s; wait for it to finish or choose another output "
                                  f"directory.") from None
            if not waiting:
                from deploykit.log import LOGGER

                LOGGER.info("  waiting for another deploykit run writing to %s", directory)
                waiting = True
            time.sleep(0.05)
            continue
        # The holder before us removes the file before unlocking it: a lock on a removed file locks nothing.
        try:
            same = os.path.samestat(os.fstat(handle), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(handle)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(handle)
