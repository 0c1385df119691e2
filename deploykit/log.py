"""Logging and progress for long pipeline steps.

deploykit logs to stderr through one logger. `stage()` brackets a step so the user sees what is running and how
long it took; the durations are also collected for the report.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator

LOGGER = logging.getLogger("deploykit")

# Third-party loggers that are chatty at INFO/WARNING level during export; silenced unless -v.
_NOISY_LOGGERS = ("torch.onnx", "torch._export", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir")


def configure(verbose: bool = False) -> None:
    """Send deploykit's log to stderr; `verbose` shows debug detail and third-party export chatter."""
    LOGGER.handlers[:] = [_stderr_handler()]
    LOGGER.setLevel(logging.DEBUG if verbose else logging.INFO)
    LOGGER.propagate = False
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.ERROR)


@contextlib.contextmanager
def progress(enabled: bool = True, verbose: bool = False) -> Iterator[None]:
    """Log the stages on stderr during the block, as the CLI does, for Python callers who configured no logging:
    an application that configured the ``deploykit`` logger or the root logger keeps its own configuration, and
    nothing stays behind after the block (no handler added twice, however often it runs)."""
    configured = LOGGER.handlers or LOGGER.level != logging.NOTSET or logging.getLogger().handlers
    if not enabled or configured:
        yield
        return
    handler = _stderr_handler()
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.DEBUG if verbose else logging.INFO)
    try:
        yield
    finally:
        LOGGER.removeHandler(handler)
        LOGGER.setLevel(logging.NOTSET)


def _stderr_handler() -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


@contextlib.contextmanager
def stage(title: str, timings: dict[str, float] | None = None, key: str | None = None) -> Iterator[None]:
    """Log `title`, run the block, then log its duration; record it in `timings[key]` when given."""
    LOGGER.info("%s ...", title)
    start = time.perf_counter()
    yield
    elapsed = time.perf_counter() - start
    if timings is not None:
        timings[key or title] = round(elapsed, 4)
    LOGGER.info("  done in %.2f s", elapsed)


@contextlib.contextmanager
def polygraphy_quiet() -> Iterator[None]:
    """Polygraphy logs every comparison and file save on stdout; deploykit reports the numbers itself."""
    from polygraphy.logger import G_LOGGER

    saved = G_LOGGER.module_severity
    G_LOGGER.module_severity = G_LOGGER.CRITICAL
    try:
        yield
    finally:
        G_LOGGER.module_severity = saved
