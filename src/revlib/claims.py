"""Claims: the book's assertions about measured quantities, each with the margin by which it held.

A chapter states a finding ("the RevNet is within three points of the ResNet") and checks it on the
numbers it measured. Trained and accumulated quantities differ from machine to machine in their last
digits, so such a check is a bound with room to spare, and the room is worth knowing: :func:`claim`
asserts that a value lies beyond a lower bound and/or below an upper one, and measures the *margin*

.. math::

    m = \\min_{b} \\frac{\\text{distance from the value to the bound } b}{|b|}
    \\qquad (\\text{absolute distance when } b = 0),

positive when the claim holds. A claim with margin 0.5 holds with half its bound to spare; a margin
of 0.01 means the finding rests on luck. When the environment variable ``REVLIB_CLAIMS`` names a file,
every claim appends one JSON line to it, which is how ``tools/portability.py`` reports the smallest
margin of every claim over machines and seeds (see the book's Reproducibility appendix).

Exact identities (saved byte counts, equal predictions) stay plain ``assert`` statements: they have no
margin, and they must hold on every machine to the last bit.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from numbers import Real

__all__ = ["CLAIMS_VARIABLE", "Claim", "claim"]

CLAIMS_VARIABLE = "REVLIB_CLAIMS"


@dataclass(frozen=True)
class Claim:
    """One checked claim: the statement, the measured value, its bounds and the margin it held by."""

    statement: str
    value: float
    above: float | None
    below: float | None
    margin: float


def _relative_distance(distance: float, bound: float) -> float:
    return distance / abs(bound) if bound != 0 else distance


def claim(statement: str, value: float, *, above: float | None = None, below: float | None = None) -> None:
    """Assert ``above < value < below`` for a measured ``value`` and record the margin it held by.

    Args:
        statement: the finding in words; it is the assertion's message and names the claim in reports.
        value: the measured quantity (a Python or NumPy number, or a one-element tensor).
        above: the value must be strictly greater than this, or ``None`` for no lower bound.
        below: the value must be strictly less than this, or ``None`` for no upper bound.

    Raises:
        AssertionError: the value is not strictly between the bounds (or is NaN); the message gives the
            statement, the value and the bounds.
        TypeError: ``statement`` is not a string, or a number is not a real number.
        ValueError: ``statement`` is empty, neither bound is given, or ``above >= below``.
    """
    if not isinstance(statement, str):
        raise TypeError(f"statement must be a string, got {type(statement).__name__}")
    if not statement.strip():
        raise ValueError("statement must say what is claimed, got an empty string")
    if above is None and below is None:
        raise ValueError("claim needs a bound: give above=..., below=... or both")
    value = _as_float(value, "value")
    lower = None if above is None else _as_float(above, "above")
    upper = None if below is None else _as_float(below, "below")
    if lower is not None and upper is not None and not lower < upper:
        raise ValueError(f"above must be less than below, got above={lower} and below={upper}")
    margins = []
    if lower is not None:
        margins.append(_relative_distance(value - lower, lower))
    if upper is not None:
        margins.append(_relative_distance(upper - value, upper))
    margin = min(margins) if not math.isnan(value) else -math.inf
    log = os.environ.get(CLAIMS_VARIABLE)
    if log:
        with open(log, "a", encoding="utf-8") as file:
            file.write(json.dumps(asdict(Claim(statement, value, lower, upper, margin))) + "\n")
    bounds = " and ".join(part for part in (lower is not None and f"> {lower:.4g}", upper is not None and f"< {upper:.4g}") if part)
    if not margin > 0:  # raised, not asserted: a claim must hold under python -O too
        raise AssertionError(f"{statement}: measured {value:.4g}, expected {bounds}")


def _as_float(number: object, argument: str) -> float:
    if isinstance(number, bool) or not isinstance(number, Real) and not hasattr(number, "item"):
        raise TypeError(f"{argument} must be a real number, got {type(number).__name__}")
    try:
        return float(number)  # type: ignore[arg-type]
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"{argument} must be a real number (or a one-element tensor), got {number!r}") from error
