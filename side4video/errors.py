"""The one exception type for bad user input (config, CLI, data, URL).

The CLI turns it into one line on stderr and exit status 2; everything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""

    exit_code = 2


class RunFailed(Exception):
    """A run that cannot go on (e.g. the loss diverged): one line, exit status 1."""

    exit_code = 1


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when the message is empty):
    what a one-line report of it shows."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def last_line(output: str) -> str:
    """The last non-blank line of a subprocess's output: where a failed run says why."""
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"
