"""Which failures are worth a retry.

A :class:`PermanentError` (a bad config, a refused checkpoint, bad input data, inputs that do not fit
together) fails the same way every time: neither Prefect's stage retries nor Ray Train's worker restarts
repeat it. Python's own errors of the same nature (a missing file, a wrong value or type, a non-finite loss)
count as permanent too; anything else (a lost worker, a timeout, a crashed process) is retried.
"""

from __future__ import annotations


class PermanentError(Exception):
    """Base of mqgen's errors that a retry cannot fix; the message says what to do instead."""


# Errors that do not go away by running the same code on the same inputs again.
_DETERMINISTIC = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError,
                  TypeError, KeyError, IndexError, AttributeError, AssertionError, NotImplementedError,
                  FloatingPointError, ImportError)


def is_permanent(exc: BaseException) -> bool:
    """Whether retrying the work that raised ``exc`` would fail the same way (Ctrl-C / SIGTERM included)."""
    return isinstance(exc, (PermanentError, KeyboardInterrupt, *_DETERMINISTIC))
