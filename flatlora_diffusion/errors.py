"""User errors: one clear line, a non-zero exit, never a traceback."""


class UserError(ValueError):
    """Bad input from the user (a path, a flag, a file); the message says what and where."""
