"""The exception types entry points turn into exit codes, and the one table of those codes.

Entry points catch `UsageError` and print its message as a single line with exit code 2, so a
typo in a flag never ends in a traceback or in half-written output.

Exit codes, which `jaxdist.launch --max_restarts`, `deploy/slurm.sbatch` and the Kubernetes
template act on (a test checks that both templates list exactly `FINAL`):

| code | name | meaning | restarted |
|---|---|---|---|
| 0 | `EXIT_OK` | done, or stopped by SIGTERM/SIGINT with a checkpoint saved | no (nothing to do) |
| 2 | `EXIT_USAGE` | bad input: a flag, a shape, missing data | no: it would recur |
| 65 | `EXIT_DIVERGED` | diverged with nothing to roll back to (EX_DATAERR) | no: it would recur |
| 69 | `EXIT_UNAVAILABLE` | a `TransientError`: the job not joined in time, ... | yes |
| 75 | `EXIT_HANG` | the hang watchdog ended a stuck process (EX_TEMPFAIL) | yes |
| any other | | a crash (an uncaught exception exits 1), a signal, a lost peer | yes |

Only a code no failure of another kind can produce may be final. Python exits 1 for every
uncaught exception (and for `sys.exit("message")`), so 1 means "a crash" and is restarted. 2 is
what argparse and the interpreter itself (`python nosuch.py`, `python -Q`) exit with for a bad
command line, and no uncaught exception ever produces it: bad flags and `UsageError` share it and
stay final without a special case for argparse. Divergence takes 65 from BSD's sysexits.h
(EX_DATAERR, "the input data was incorrect"): no interpreter or library exits with it on its own.
69 (EX_UNAVAILABLE) and 75 (EX_TEMPFAIL) are sysexits' codes for "try again later"."""

EXIT_OK, EXIT_USAGE, EXIT_DIVERGED, EXIT_UNAVAILABLE, EXIT_HANG = 0, 2, 65, 69, 75
FINAL = (EXIT_USAGE, EXIT_DIVERGED)  # failures a restart would repeat
NOT_RESTARTED = (EXIT_OK, *FINAL)


def restartable(code: int) -> bool:
    """Whether a process that ended with `code` (negative: killed by that signal) is restarted."""
    return code not in NOT_RESTARTED


class UsageError(ValueError):
    """Input the user can fix: a bad flag, a shape that does not divide, missing data."""


class DataError(UsageError):
    """A dataset that cannot be read (a damaged file); the message names the file."""


class TransientError(RuntimeError):
    """A failure a restart may cure: the coordinator not reachable yet, a resource (a checkpoint,
    the work dir's lock) not available in time.

    Raised once retrying within the allowed time did not help; entry points print it as one line
    and exit `EXIT_UNAVAILABLE`, which the launcher and the cluster templates restart.
    """


def first_line(e: BaseException) -> str:
    """An exception's first line: enough to say what went wrong inside a one-line message."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
