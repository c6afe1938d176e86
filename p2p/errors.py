"""Errors meant for the person at the terminal: the CLI prints them as one line, no traceback."""


class P2PError(Exception):
    """A problem with the user's input or environment that a clear message can explain."""
