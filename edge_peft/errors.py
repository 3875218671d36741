"""The one exception type that the CLI turns into a one-line error and exit status 2."""


class UserError(Exception):
    """Bad input from the user: the message names the problem and the fix, in one line."""
