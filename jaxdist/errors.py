"""The one exception type for bad user input, and the exit-code convention.

Entry points catch `UsageError` and print its message as a single line with exit code 2, so a
typo in a flag never ends in a traceback or in half-written output.

Exit codes, which `jaxdist.launch --max_restarts` and the cluster templates act on:
- 0 (`EXIT_OK`): done, or stopped by SIGTERM/SIGINT with a checkpoint saved. Not restarted.
- 1 (`EXIT_DIVERGED`): training diverged with nothing to roll back to. Not restarted (a rerun
  would diverge the same way).
- 2 (`EXIT_USAGE`): bad input. Not restarted.
- 75 (`EXIT_HANG`, EX_TEMPFAIL): the hang watchdog ended a stuck process. Restarted.
- anything else (a crash, a signal, a lost peer): restarted.
"""

EXIT_OK, EXIT_DIVERGED, EXIT_USAGE, EXIT_HANG = 0, 1, 2, 75
NOT_RESTARTED = (EXIT_OK, EXIT_DIVERGED, EXIT_USAGE)


class UsageError(ValueError):
    """Input the user can fix: a bad flag, a shape that does not divide, missing data."""


class DataError(UsageError):
    """A dataset that cannot be read (a damaged file); the message names the file."""


def first_line(e: BaseException) -> str:
    """An exception's first line: enough to say what went wrong inside a one-line message."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
