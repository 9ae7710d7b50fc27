"""The engine's one error family for failures a user caused.

A :class:`UserError` (a bad config key or value, an argument of the wrong kind, an unreadable or mismatched file, a
refused path) is the user's to fix: the CLI prints its message in one line and exits 2, even when it surfaces inside
a cell. Any other exception is a bug: the CLI exits 1 with the traceback and asks for a report. Subclasses name the
area (``ConfigError``, ...). UserError subclasses ValueError and :class:`UserTypeError` also TypeError, so callers
catching those keep working.
"""


class UserError(ValueError):
    """A failure the user caused; the message names the argument, the value and what is allowed."""


class UserTypeError(UserError, TypeError):
    """A user's argument of the wrong type (still a TypeError for callers catching one)."""
