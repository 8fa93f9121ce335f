"""The one base of the errors a user can fix: a config, an input, an output, weights, data.

Each is raised with a message that names the problem; ``skray`` prints it and exits 2, with no
traceback, whichever command raised it. Any other exception is a bug and keeps its traceback.
"""


class SkrayError(ValueError):
    """Something the user gave cannot be used; the message says what and where."""
