"""The one exception type for bad user input.

Entry points catch `UsageError` and print its message as a single line with exit code 2, so a
typo in a flag never ends in a traceback or in half-written output.
"""


class UsageError(ValueError):
    """Input the user can fix: a bad flag, a shape that does not divide, missing data."""


class DataError(UsageError):
    """A dataset that cannot be read (a damaged file); the message names the file."""


def first_line(e: BaseException) -> str:
    """An exception's first line: enough to say what went wrong inside a one-line message."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
