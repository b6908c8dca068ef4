"""Analysis of measured series: straight-line and power-law fits.

The chapters measure a quantity against depth, budget or step size and read off a slope: memory growing
linearly in depth, an error falling like :math:`1/N` (slope :math:`-1` on log-log axes). :func:`fit_line`
is that fit, with its :math:`R^2`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

__all__ = ["LineFit", "fit_line"]


@dataclass(frozen=True)
class LineFit:
    r"""A least-squares line :math:`y \approx \text{slope}\cdot x + \text{intercept}` and its :math:`R^2`."""

    slope: float
    intercept: float
    r_squared: float
    loglog: bool = False

    def predict(self, x: float) -> float:
        r"""The line's value at ``x``: :math:`\text{slope}\cdot x + \text{intercept}`, or for a log-log fit the
        power law :math:`e^{\text{intercept}}\, x^{\text{slope}}`."""
        if self.loglog:
            return math.exp(self.intercept) * x**self.slope
        return self.slope * x + self.intercept


def fit_line(x: Iterable[float], y: Iterable[float], *, loglog: bool = False) -> LineFit:
    r"""Fit a straight line by least squares, e.g. saved bytes against depth.

    With ``loglog=True`` the line is fitted to :math:`(\log x, \log y)`, so the slope is the exponent
    :math:`p` of a power law :math:`y \propto x^p` (an error of order :math:`1/N` has slope :math:`-1`).

    Raises:
        ValueError: fewer than two points, lengths differ, or non-positive values with ``loglog``.
    """
    xs, ys = torch.tensor(list(x), dtype=torch.float64), torch.tensor(list(y), dtype=torch.float64)
    if xs.shape != ys.shape or len(xs) < 2:
        raise ValueError(f"x and y must hold the same number (at least 2) of values, got {len(xs)} and {len(ys)}")
    if loglog:
        if (xs <= 0).any() or (ys <= 0).any():
            raise ValueError("a log-log fit needs positive x and y")
        xs, ys = xs.log(), ys.log()
    design = torch.stack((xs, torch.ones_like(xs)), dim=1)  # (n, 2)
    solution = torch.linalg.lstsq(design, ys.unsqueeze(1)).solution.squeeze(1)
    residual = ys - design @ solution
    total = (ys - ys.mean()).pow(2).sum()
    r_squared = 1.0 - (residual.pow(2).sum() / total).item() if total > 0 else 1.0
    return LineFit(solution[0].item(), solution[1].item(), r_squared, loglog)
