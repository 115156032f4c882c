"""Errors caused by the user's input. The CLI prints these without a traceback."""


class ClipkitError(Exception):
    """Base of every error that names bad input and says what to do."""

    exit_code = 2  # of the CLI when it stops on this error
