"""The one exception type users see as a one-line message instead of a traceback."""


class UserError(Exception):
    """Bad input or invocation: the message names the file or option at fault.

    The CLI prints `error: <message>` and exits with status 2.
    """
