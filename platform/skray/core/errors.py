"""The one base of the errors a user can fix: a config, an input, an output, weights, data.

Each is raised with a message that names the problem; ``skray`` prints it and exits 2, with no
traceback, whichever command raised it. Any other exception is a bug and keeps its traceback.
"""

MESSAGE_MAX_CHARS = 300  # of a message a row or a log line carries

# Why bytes are not a usable image (``skray.core.images.ImageDecodeError``): kept here, so that
# what reads and reports rows knows the codes without loading torch.
IMAGE_REASONS = ("empty", "not_an_image", "truncated", "too_many_pixels", "undecodable")


class SkrayError(ValueError):
    """Something the user gave cannot be used; the message says what and where."""


def one_line(message: str) -> str:
    """``message`` on one line of at most MESSAGE_MAX_CHARS: what a row or a metric carries,
    where a member name can hold newlines and an exception a page of text."""
    message = " ".join(message.split())
    return message if len(message) <= MESSAGE_MAX_CHARS else message[: MESSAGE_MAX_CHARS - 1] + "…"
