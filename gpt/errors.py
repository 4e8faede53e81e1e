"""User-facing errors.

A `GPTError` is a mistake the user can fix (a wrong path, an impossible shape, a bad option). The entry
points print its message as one line and exit non-zero; any other exception is a bug and keeps its
traceback. Messages say what is wrong *and* what to do about it.
"""


class GPTError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""
