"""The one exception type the CLI turns into a clear one-line message (exit code 2)."""


class LmpruneError(Exception):
    """Bad input or a state lmprune cannot work from: the message says what was wrong and what
    to do, and fits on one line."""
