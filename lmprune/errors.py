"""The one exception type the CLI turns into a clear one-line message (exit code 2)."""


def first_line(err: Exception) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


class LmpruneError(Exception):
    """Bad input or a state lmprune cannot work from: the message says what was wrong and what
    to do, and fits on one line."""
