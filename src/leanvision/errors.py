"""The errors leanvision raises for bad input.

Every one of them is a LeanvisionError: a user can fix the cause from the message alone. The command line
prints such an error as one line and exits with status 2; any other exception is a bug in leanvision and
shows its traceback. Each class also derives from the builtin a Python user would expect (ValueError,
FileNotFoundError), so `except ValueError` keeps working.
"""

from __future__ import annotations


class LeanvisionError(Exception):
    """Bad input to leanvision, described so that the message alone says what was expected."""


class InvalidArgumentError(LeanvisionError, ValueError):
    """A value out of range, a wrong shape or size, an unknown option or name."""


class UnknownModelError(InvalidArgumentError):
    """A model name that is not registered (nor a torchvision or timm one)."""


class CheckpointError(LeanvisionError, ValueError):
    """A weights or training-state file that cannot be loaded into what was asked for."""


class DataError(LeanvisionError, ValueError):
    """A dataset spec, folder or file that cannot be read as the dataset asked for."""


class MissingFileError(LeanvisionError, FileNotFoundError):
    """A file or folder that was named but does not exist."""


class OutputError(LeanvisionError, OSError):
    """An output that cannot be written (a full disk, no permission); what was written before stays."""


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when it has none), at most `limit` chars:
    what a one-line error says of a failure deep inside a compiler."""
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:limit]
