"""The one base class of every error a user can fix: the front doors (``train.py``, ``crackclf``) print these as one
paragraph and let every other exception show its traceback, so a real bug is never mistaken for bad input."""

from __future__ import annotations

__all__ = ["CrackclfError", "UsageError", "short_error"]


class CrackclfError(Exception):
    """Bad input or an environment problem the user can fix; ``str()`` names the file or value and what to do.

    Subclasses also derive from the builtin that describes them (``ValueError``, ``OSError``) so that code catching
    those keeps working."""


class UsageError(CrackclfError, ValueError):
    """A value given on the command line or in the configuration that cannot be used; the message names it and
    says what would work."""


def short_error(error: BaseException, limit: int = 200) -> str:
    """``"TypeName: first line of the message"``, at most ``limit`` characters of that line: how a message for the
    user quotes the exception underneath (a library's message can be a page long). An empty message gives the type
    name alone."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:limit]}" if lines else type(error).__name__
