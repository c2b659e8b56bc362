"""Errors a user can cause and fix.

A `UserError` carries a one-line message that names the input and what would be accepted; the CLI
prints it without a traceback and exits with status 2. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: a path, a flag value, a model that is not SDXL."""


class VerificationError(UserError):
    """An exported model disagrees with torch beyond its stated tolerance (exit status 4)."""


class OutOfMemory(UserError):
    """The host or the GPU had no memory left for a call: it may succeed smaller, or later (a server answers 503)."""
