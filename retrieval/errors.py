"""User-facing errors: the CLI prints their message (which names the file/field) without a traceback."""


class UserError(Exception):
    """Bad input from the user: a file, a field or a flag. The message says what was expected."""
