"""The one exception type that the command line turns into a single line for the user."""


class UserError(Exception):
    """Bad input the user can fix: a path, a key, a row. The message says which and what to do.

    ``lt-posttrain`` prints it as one line (no traceback) and exits with status 2.
    """
