"""The one exception type of the data pipeline, and how loudly its skips are logged."""

from __future__ import annotations


class DataError(ValueError):
    """A problem with the training data or its template.

    Messages name the place (``FILE:LINE`` where there is one), what is wrong, and the fix.
    A ``ValueError`` so callers that catch user mistakes generically still catch it.
    """


class RoleOrderError(DataError):
    """A conversation whose roles are out of order: it must be an optional leading system
    turn, then user and assistant turns alternating, starting with user. Nothing reorders
    or merges turns silently: the line is fixed, or skipped with ``data.skip_invalid``."""


MAX_LOGGED_SKIPS = 5
"""Skipped records logged one by one (with FILE:LINE) before the log goes quiet; every skip
is still counted."""
