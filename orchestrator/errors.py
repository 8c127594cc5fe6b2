"""Errors the entry points turn into exit codes; importing this module costs nothing."""


class RunError(RuntimeError):
    """A run could not start or go on; the message says what failed, where, and what to do."""
