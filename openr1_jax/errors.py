"""Errors a user can act on."""


class UserError(Exception):
    """Bad input a user can fix: the CLI prints the message as one sentence and exits 2, no traceback."""
