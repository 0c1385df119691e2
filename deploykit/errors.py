"""The one exception type deploykit raises for problems a user can fix.

Anything a user can cause (a bad path, a wrong shape, a checkpoint that does not fit the architecture) becomes a
`DeployError` whose message is one complete sentence saying what is wrong and what to do. The CLI prints it on
stderr and exits with status 2; any other exception is a bug in deploykit and keeps its traceback.
"""

from __future__ import annotations


class DeployError(Exception):
    """A problem with the user's input or environment, explained in one sentence."""


class VerificationFailed(DeployError):
    """The deployed model ran but does not match PyTorch within tolerance (CLI exit status 1)."""


def first_line(err: BaseException) -> str:
    """The first line of `err`'s message without its full stop (its type name if it has none), to quote inside
    a one-sentence `DeployError`."""
    text = str(err).strip().splitlines()
    return text[0].rstrip(".") if text else type(err).__name__
