"""The one exception type for errors a user can cause.

Everything that a user can get wrong (a bad path, an unknown layer, an empty class, a bad
parameter) raises :class:`ExplorerError` with a message that says what to do. The app shows the
message, the command line prints it and exits non-zero. Anything else is a bug.
"""


class ExplorerError(Exception):
    """A user-caused error; ``str(err)`` is a complete message meant for the user."""


class ExplorerWarning(UserWarning):
    """A recoverable problem the user should see (e.g. activations clamped to be non-negative)."""


class Cancelled(ExplorerError):
    """The user cancelled a long job (raised from its progress callback). What the job stored
    before stays consistent: a catalog build resumes where it stopped, cached parts are reused."""
