"""The one exception type for bad user input.

Entry points catch `UsageError` and print its message as a single line with exit code 2, so a
typo in a flag never ends in a traceback or in half-written output.
"""


class UsageError(ValueError):
    """Input the user can fix: a bad flag, a shape that does not divide, missing data."""
