"""The one exception type of the data pipeline."""

from __future__ import annotations


class DataError(ValueError):
    """A problem with the training data or its template.

    Messages name the place (``FILE:LINE`` where there is one), what is wrong, and the fix.
    A ``ValueError`` so callers that catch user mistakes generically still catch it.
    """
