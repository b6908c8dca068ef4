"""Checks of arguments at the public boundary, shared by every module: one message for one mistake."""

from __future__ import annotations


def positive_integers(**values: object) -> None:
    """Raise a ``ValueError`` naming the first argument that is not a positive integer (``bool`` is not one).

    ``positive_integers(depth=depth, width=width)``.
    """
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
