"""The one exception type for a user's mistake.

A `UserError` is something the user can fix (a bad path, a bad value, a folder gradsift did not write): the CLI prints
its message as one line on stderr and exits with status 2. Anything else is a gradsift bug: it keeps its traceback
and exits with status 1. It subclasses `ValueError`, so library callers that caught `ValueError` still do.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in what the user asked for: one line naming the file/row/key, the value received and the fix."""
