"""The errors a user can fix, and how every command line reports them: one line, exit code 2.

Each part of the package raises its own subclass of :class:`UserError` (a bad config key, an
unreadable image, a damaged checkpoint, a run directory in use, ...). Entry points catch
:data:`USER_ERRORS` once and call :func:`print_user_error`; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

USER_ERROR_EXIT = 2


class UserError(Exception):
    """Bad input the user can fix; its message names the file or key and what was expected."""


# FileNotFoundError: a path the user typed does not exist (its message names it)
USER_ERRORS = (UserError, FileNotFoundError)


def print_user_error(err: BaseException) -> int:
    """Print ``err`` as one ``error:`` line on stderr and return the user-error exit code."""
    # Our messages are one line already; a library's or the OS's may not be, and one line is what
    # logs, CI and `grep error:` rely on.
    message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    print(f"error: {message}", file=sys.stderr)
    return USER_ERROR_EXIT
