"""Verification: the checks every chapter and test uses to show that a gradient is right.

* :func:`relative_error` — how far computed tensors are from reference ones, relative to the reference;
* :func:`finite_difference_gradient` — a gradient by central differences, to check backprop against;
* :func:`central_difference_errors` — how the error of a central difference depends on its step
  (truncation against rounding);
* :func:`flat_gradient` — a network's parameter gradient as one vector, to compare two ways of computing it.

They were first written for the chapters on backpropagation and Neural ODEs, and are still importable from
:mod:`revlib.backprop` and :mod:`revlib.adjoint` under the same names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["central_difference_errors", "cosine_similarity", "finite_difference_gradient", "flat_gradient", "relative_error"]

_TINY = 1e-30  # keeps the relative error finite when the reference is zero


def relative_error(computed: Tensor | Sequence[Tensor], reference: Tensor | Sequence[Tensor]) -> float:
    r"""The relative error of ``computed`` against ``reference``, in float64:

    .. math:: \frac{\lVert a - b\rVert}{\max(\lVert b\rVert, \epsilon)} \quad\text{for two tensors,}\qquad
              \max_k \frac{\lVert a_k - b_k\rVert}{\max(\lVert b_k\rVert, \epsilon)} \quad\text{for two lists,}

    with :math:`\epsilon = 10^{-30}` and Frobenius norms.

    Raises:
        TypeError: one argument is a tensor and the other a list.
        ValueError: the lists differ in length or a pair differs in shape.
    """
    if isinstance(computed, Tensor) != isinstance(reference, Tensor):
        raise TypeError("computed and reference must both be tensors or both be sequences of tensors")
    if isinstance(computed, Tensor):
        computed, reference = [computed], [reference]  # type: ignore[list-item]
    if len(computed) != len(reference):
        raise ValueError(f"computed has {len(computed)} tensors, reference {len(reference)}")
    worst = 0.0
    for a, b in zip(computed, reference):
        if a.shape != b.shape:
            raise ValueError(f"shapes differ: {tuple(a.shape)} and {tuple(b.shape)}")
        difference = (a.double() - b.double()).norm().item()
        worst = max(worst, difference / max(b.double().norm().item(), _TINY))
    return worst


def cosine_similarity(computed: Tensor, reference: Tensor) -> float:
    r"""The cosine of the angle between two tensors of one shape, flattened, in float64:

    .. math:: \cos\angle(a, b) = \frac{\langle a, b\rangle}{\lVert a\rVert\,\lVert b\rVert} .

    It measures direction only: 1 for the same direction at any length, 0 for orthogonal, negative when
    ``computed`` points uphill along ``reference``'s descent direction. A gradient with a large relative
    error can still have a high cosine (it is then mostly a wrongly scaled gradient) and still descend.

    Raises:
        ValueError: the shapes differ or either tensor is zero.
    """
    if computed.shape != reference.shape:
        raise ValueError(f"shapes differ: {tuple(computed.shape)} and {tuple(reference.shape)}")
    a, b = computed.double().flatten(), reference.double().flatten()
    norms = a.norm().item() * b.norm().item()
    if norms == 0:
        raise ValueError("the cosine of a zero tensor is undefined")
    return torch.dot(a, b).item() / norms


def finite_difference_gradient(function: Callable[[], Tensor], tensor: Tensor, epsilon: float = 1e-6) -> Tensor:
    r"""Central finite differences of a scalar function with respect to every entry of ``tensor``:

    .. math:: \frac{\partial f}{\partial \theta_i} \approx \frac{f(\theta + \varepsilon e_i) - f(\theta - \varepsilon e_i)}{2\varepsilon},

    with a truncation error of order :math:`\varepsilon^2` and a rounding error of order
    :math:`u\,|f| / \varepsilon` (:math:`u` the unit roundoff; use float64). At the default
    :math:`\varepsilon = 10^{-6}` in float64 the rounding error, about :math:`10^{-10}` relative for a
    well-scaled :math:`f`, dominates; :func:`central_difference_errors` measures the trade-off. ``tensor`` is perturbed in place
    and restored (also when ``function`` raises); ``function`` must read it.

    Raises:
        ValueError: ``epsilon`` is not positive.
    """
    if epsilon <= 0:
        raise ValueError(f"epsilon must be positive, got {epsilon}")
    gradient = torch.zeros_like(tensor)
    flat, flat_gradient = tensor.view(-1), gradient.view(-1)
    with torch.no_grad():
        for index in range(flat.numel()):
            original = flat[index].item()
            try:
                flat[index] = original + epsilon
                above = function().item()
                flat[index] = original - epsilon
                below = function().item()
            finally:  # the entry is put back even when the function raises
                flat[index] = original
            flat_gradient[index] = (above - below) / (2 * epsilon)
    return gradient


def central_difference_errors(
    function: Callable[[], Tensor],
    tensors: Sequence[Tensor],
    gradients: Sequence[Tensor],
    epsilons: Sequence[float],
    *,
    directions: int = 4,
    seed: int = 0,
) -> list[float]:
    r"""The relative error of a central difference along random directions, for each step :math:`\varepsilon`.

    For a direction :math:`v` (standard normal entries, one per entry of ``tensors``) the central difference
    estimates the directional derivative :math:`\langle \nabla f, v\rangle` (from ``gradients``):

    .. math::
        e(\varepsilon) = \frac{\left|\tfrac{f(\theta + \varepsilon v) - f(\theta - \varepsilon v)}{2\varepsilon}
        - \langle \nabla f, v\rangle\right|}{|\langle \nabla f, v\rangle|} .

    Taylor's theorem gives the *truncation* error :math:`\tfrac{\varepsilon^2}{6} D^3 f(\theta)[v, v, v]`,
    slope 2 in log-log axes; evaluating :math:`f` in floating point adds a *rounding* error of about
    :math:`u\,|f| / \varepsilon` (:math:`u` the unit roundoff), slope :math:`-1`. The sum is a V whose
    bottom lies near :math:`\varepsilon \approx (3u|f| / |D^3 f[v, v, v]|)^{1/3}`.

    Args:
        function: evaluates :math:`f` from the current values of ``tensors`` (which are perturbed in place
            and restored, also when it raises).
        tensors: the point :math:`\theta`.
        gradients: :math:`\nabla f(\theta)`, one tensor per entry of ``tensors``, e.g. from backprop.
        epsilons: the steps.
        directions: how many random directions; the median error over them is returned.
        seed: seeds the directions.

    Returns:
        The median relative error for each step, in the order of ``epsilons``.

    Raises:
        ValueError: a step is not positive, ``directions`` is not positive, or ``gradients`` does not
            match ``tensors``.
    """
    if any(epsilon <= 0 for epsilon in epsilons):
        raise ValueError(f"epsilons must be positive, got {list(epsilons)}")
    if directions < 1:
        raise ValueError(f"directions must be a positive number, got {directions}")
    if len(gradients) != len(tensors) or any(g.shape != t.shape for g, t in zip(gradients, tensors)):
        raise ValueError("gradients must hold one tensor of the same shape for each of the tensors")
    generator = torch.Generator().manual_seed(seed)
    samples = [[torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device) for t in tensors] for _ in range(directions)]
    originals = [t.detach().clone() for t in tensors]

    def at(epsilon: float, direction: list[Tensor]) -> float:
        with torch.no_grad():
            for tensor, original, step in zip(tensors, originals, direction):
                tensor.copy_(original + epsilon * step)
        return function().item()

    errors: list[list[float]] = []
    try:
        for direction in samples:
            exact = sum((g * v).sum() for g, v in zip(gradients, direction)).item()
            errors.append([abs((at(e, direction) - at(-e, direction)) / (2 * e) - exact) / max(abs(exact), _TINY) for e in epsilons])
    finally:  # the point is put back even when the function raises
        with torch.no_grad():
            for tensor, original in zip(tensors, originals):
                tensor.copy_(original)
    return [float(torch.tensor(column).median()) for column in zip(*errors)]


def flat_gradient(network: nn.Module, inputs: Tensor, loss_fn: Callable[[Tensor], Tensor], parameters: Sequence[Tensor]) -> Tensor:
    """The gradient of ``loss_fn(network(inputs))`` with respect to ``parameters``, concatenated into one
    vector (computed with :func:`torch.autograd.grad`; ``.grad`` fields are untouched)."""
    with torch.enable_grad():
        loss = loss_fn(network(inputs))
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(parameters))])
