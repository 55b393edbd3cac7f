"""The one exception type that the command line turns into a single line for the user."""

import re


class UserError(Exception):
    """Bad input the user can fix: a path, a key, a row. The message says which and what to do.

    ``lt-posttrain`` prints it as one line (no traceback) and exits with status 2.
    """


def reason_of(error: BaseException) -> str:
    """The first useful line of ``error``, for a one-line message: the operating system's reason where there is one
    (torch and safetensors wrap a failed write in their own errors), the refused class of a weights-only load."""
    cause = error.__context__ if isinstance(error.__context__, OSError) else error
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    text = str(error).strip()
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if refused:
        return f"{refused.group(1)} is not allowed"
    os_error = re.search(r"I/O error: (.+?) \(os error \d+\)", text)  # safetensors' (Rust's) I/O error
    if os_error:
        return os_error.group(1)
    return text.splitlines()[0].split(". ")[0][:200] if text else type(error).__name__
