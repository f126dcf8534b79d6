"""The one error type for user mistakes: the CLI prints its one-line message, without a traceback."""


class UserError(Exception):
    """Bad input (config, data, arguments, build); the message names the problem and the fix."""
