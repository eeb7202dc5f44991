"""The errors a command ends with and their exit codes, stated once for every floor.

Exit codes: 0 done; 2 usage error (:data:`USAGE_ERROR`: bad settings, missing data, an unusable
file, a folder in use); 3 a NaN or infinite loss (:data:`NON_FINITE_LOSS`); 4 no space left
(:data:`NO_SPACE`). An error class names its code in ``exit_code``; :func:`exit_code` reads it.
Imports nothing heavy: the command line's usage errors need neither torch nor Avalanche.
"""

from __future__ import annotations

import errno
import signal

USAGE_ERROR = 2
NON_FINITE_LOSS = 3
NO_SPACE = 4


class ConfigError(ValueError):
    """A usage error in presets or overrides."""

    exit_code = USAGE_ERROR


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss."""

    exit_code = NON_FINITE_LOSS


class AgreedFailure(RuntimeError):
    """Another rank's failure, raised on every rank at the same point of the run."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.exit_code = code
        self.every_rank = True


class Interrupted(KeyboardInterrupt):
    """A SIGTERM (what schedulers send to stop a job), raised where the run is, as Ctrl-C's
    KeyboardInterrupt is: the run stops the same way, its lock released."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


def interrupted_code(stop: KeyboardInterrupt) -> int:
    """The exit status of a command stopped by ``stop``: 128 + the signal (130 for Ctrl-C,
    143 for SIGTERM), as a shell reports a process the signal ended."""
    return getattr(stop, "exit_code", 128 + signal.SIGINT)


def out_of_space(error: BaseException) -> OSError | None:
    """The OSError saying the disk (or quota) is full behind ``error``, if any: writers such as
    torch's serializer report it as another error whose context it is."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def exit_code(error: BaseException) -> int | None:
    """The exit status of a command whose run failed with ``error``: the error class's own
    ``exit_code`` (ConfigError, DataError, CheckpointError, FolderInUse: 2; NonFiniteLossError:
    3; NoSpaceError: 4), 4 for any error a full disk caused, 2 for any other ValueError (a
    combination of settings the schema cannot express); None for anything else, which is a bug
    to let through."""
    code = getattr(error, "exit_code", None)
    if code is None and out_of_space(error) is not None:
        return NO_SPACE
    if code is None and isinstance(error, ValueError):
        return USAGE_ERROR
    return code
