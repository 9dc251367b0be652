"""The one exception type the CLI turns into a clear one-line message (exit code 2), and the
one line for anything else that escapes a command."""

from __future__ import annotations

import json
import os
import re
import sys

# the exit codes scripts and CI rely on (README): a failed --fail-above/--fail-below gate is 1
EXIT_OK, EXIT_GATE_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def warn(message: str) -> None:
    """Something a user should know that does not stop the command: one line on stderr."""
    print(f"lmprune: warning: {message}", file=sys.stderr, flush=True)


def first_line(err: Exception) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


class LmpruneError(Exception):
    """Bad input or a state lmprune cannot work from: the message says what was wrong and what
    to do, and fits on one line."""


class ConfigError(LmpruneError):
    """A bad setting. `key` is the config field: the message names it as a flag (`--batch-size
    must be at least 1`); a recipe runner names it as `section.key` (`recipe_message`)."""

    def __init__(self, key: str, problem: str):
        self.key, self.problem = key, problem
        super().__init__(f"--{key.replace('_', '-')} {problem}")

    def recipe_message(self, section: str) -> str:
        return f"{section}.{self.key}: {self.problem}"


def describe(err: BaseException) -> str:
    """One line for any exception that reached the command line: what failed, naming the file
    where the exception knows it, and what to do."""
    if isinstance(err, LmpruneError):
        return first_line(err)
    if isinstance(err, OSError) and err.filename:
        where = err.filename if not err.filename2 else f"{err.filename} -> {err.filename2}"
        return (f"{where}: {err.strerror or first_line(err)}: check that the path exists and "
                f"can be written, or choose another")
    if isinstance(err, json.JSONDecodeError):
        return f"a JSON file is corrupt or truncated ({err.msg}, line {err.lineno})"
    if type(err).__name__ == "SafetensorError":
        return (f"a safetensors file is corrupt or truncated ({first_line(err)}): write it "
                f"again")
    return (f"unexpected {type(err).__name__}: {first_line(err)} (run `lmprune --debug ...` "
            f"for the traceback)")


_TOKEN = re.compile(r"hf_[A-Za-z0-9]{6,}")


def redact(text: str) -> str:
    """Hugging Face tokens (`hf_...` and the value of HF_TOKEN) replaced by ***."""
    token = os.environ.get("HF_TOKEN")
    if token:
        text = text.replace(token, "***")
    return _TOKEN.sub("***", text)
