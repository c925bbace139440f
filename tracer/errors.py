"""The error the CLI turns into a one-line message instead of a traceback."""


class AnontraceError(Exception):
    """A problem the user can act on; the message says what to do."""
