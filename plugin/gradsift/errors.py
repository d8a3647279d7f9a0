"""The one exception type for a user's mistake.

A `UserError` is something the user can fix (a bad path, a bad value, a folder gradsift did not write): the CLI prints
its message as one line on stderr and exits with status 2. Anything else is a gradsift bug: it keeps its traceback
and exits with status 1. It subclasses `ValueError`, so library callers that caught `ValueError` still do.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in what the user asked for: one line naming the file/row/key, the value received and the fix."""


def chat_template_refusal(error: Exception) -> UserError:
    """A chat template's `raise_exception` (jinja2's `TemplateError`) met where gradsift cannot name the row (inside
    TRL's or lm-eval's rendering), as the user's mistake it is."""
    said = " ".join(str(error).split())
    return UserError(
        f"the tokenizer's chat template refuses a conversation: {said!r}. Fix the rows to the template's rules (e.g. "
        "user and assistant turns alternating), or use a model whose template accepts them."
    )
