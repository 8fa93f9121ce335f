"""The one base of the errors a user can fix: a config, an input, an output, weights, data.

Each is raised with a message that names the problem; ``skray`` prints it and exits 2, with no
traceback, whichever command raised it. Any other exception is a bug and keeps its traceback.
"""

MESSAGE_MAX_CHARS = 300  # of a message a row or a log line carries


class SkrayError(ValueError):
    """Something the user gave cannot be used; the message says what and where."""


def one_line(message: str) -> str:
    """``message`` on one line of at most MESSAGE_MAX_CHARS: what a row or a metric carries,
    where a member name can hold newlines and an exception a page of text."""
    message = " ".join(message.split())
    return message if len(message) <= MESSAGE_MAX_CHARS else message[: MESSAGE_MAX_CHARS - 1] + "…"
