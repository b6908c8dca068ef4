r"""Momentum residual networks (Sander, Ablin, Blondel and Peyré 2021): invertible for any residual function.

A momentum block carries a velocity :math:`v` beside the activations :math:`x`,

.. math::

    v_{n+1} = \gamma v_n + (1 - \gamma) f_n(x_n), \qquad x_{n+1} = x_n + v_{n+1},

and every block can be undone, whatever :math:`f_n` is, by

.. math::

    x_n = x_{n+1} - v_{n+1}, \qquad v_n = \big(v_{n+1} - (1 - \gamma) f_n(x_n)\big) / \gamma .

Unlike additive coupling (:mod:`revlib.reversible`) nothing is split in halves: :math:`f_n` is any
shape-preserving residual function, as in an ordinary ResNet, which is the case :math:`\gamma = 0` (and the
one that cannot be inverted). The inverse divides by :math:`\gamma`: one inverse step's Jacobian with respect to
:math:`(x_{n+1}, v_{n+1})` has determinant :math:`\gamma^{-d}` whatever :math:`f_n` is, but how much it
stretches a rounding error also depends on :math:`f_n`'s Jacobian (more where :math:`f_n` expands, less where
it contracts moderately, more again where it contracts strongly), so :math:`\gamma^{-N}` over :math:`N`
blocks is an estimate, not a bound. The reconstruction is exact to rounding for :math:`\gamma` near 1 and
degrades as :math:`\gamma` gets small. From :math:`v_0 = 0` the output is
:math:`x_N = x_0 + \sum_n (1 - \gamma^{N-n}) f_n(x_n)`: as :math:`\gamma \to 1` block :math:`n`'s contribution
shrinks to about :math:`(N - n)(1 - \gamma)` of its residual (a different model).

**Backward pass without stored activations.** :class:`MomentumSequence` keeps only :math:`(x_N, v_N)`.
Going back through block :math:`n` with the gradients :math:`\bar x_{n+1}, \bar v_{n+1}` of the loss, it
rebuilds :math:`x_n`, evaluates :math:`f_n(x_n)` once with its graph, and with
:math:`u = \bar v_{n+1} + \bar x_{n+1}` (the velocity feeds both outputs)

.. math::

    \bar v_n = \gamma u, \qquad
    \bar x_n = \bar x_{n+1} + (1 - \gamma) \Big(\frac{\partial f_n}{\partial x_n}\Big)^{\!\top} u, \qquad
    \bar\theta_n = (1 - \gamma) \Big(\frac{\partial f_n}{\partial \theta_n}\Big)^{\!\top} u .

The same evaluation gives :math:`f_n(x_n)` for :math:`v_n`, so each block costs one extra evaluation, as a
reversible block does. Random, autocast and BatchNorm state are replayed through the mechanism shared with
the reversible, adjoint and checkpointed sequences (``revlib._recompute``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from revlib._recompute import BlockSequence, ForwardState, accumulate, check_parameters_unchanged, distinct_parameters, needs_graph, run_checked


__all__ = ["MomentumSequence"]


class _MomentumFunction(torch.autograd.Function):
    """Run the momentum blocks keeping only (x_N, v_N); rebuild and back-propagate block by block."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, v: Tensor, sequence: MomentumSequence, *parameters: Tensor) -> Tensor:
        ctx.sequence = sequence  # the modules (not tensors): needed to recompute the residual functions
        ctx.states = []  # per block, the random, autocast and buffer states: a few KiB, no activations
        gamma = sequence.gamma
        state = None
        with torch.no_grad():
            for index, function in enumerate(sequence.functions):
                state = ForwardState.capture(x.device, sequence.preserve_rng_state, previous=state)
                with state.recording(function):
                    v = gamma * v + (1 - gamma) * run_checked(function, x, f"residual function {index}")
                x = x + v
                ctx.states.append(state)
            if state is not None:
                state.finish()
        # the output and its velocity are all that is kept; the parameters are saved so that autograd's
        # version check catches an in-place change before backward
        ctx.save_for_backward(x, v, *parameters)
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        x, v, *parameters = ctx.saved_tensors
        sequence = ctx.sequence
        check_parameters_unchanged(parameters, distinct_parameters(sequence.functions), "MomentumSequence")
        gamma = sequence.gamma
        x, v = x.detach(), v.detach()
        grad_x, grad_v = grad_output, torch.zeros_like(grad_output)  # the loss sees x_N only
        parameter_gradients: dict[int, Tensor] = {}  # by id, summed: a function may appear twice
        for function, state in zip(reversed(sequence.functions), reversed(ctx.states)):
            x = (x - v).detach().requires_grad_(True)  # x_n = x_{n+1} − v_{n+1}
            u = grad_v + grad_x  # the velocity v_{n+1} feeds both v_{n+1} and x_{n+1}
            fx, grad_f, found = state.pull_back(function, x, (1 - gamma) * u)  # f_n(x_n) again; its VJPs
            accumulate(parameter_gradients, state.parameters, found)
            with torch.no_grad():
                v = (v - (1 - gamma) * fx) / gamma  # v_n = (v_{n+1} − (1 − γ) f_n(x_n)) / γ
            x = x.detach()
            grad_x, grad_v = grad_x + grad_f, gamma * u
        return (
            grad_x if ctx.needs_input_grad[0] else None,  # x_0
            grad_v if ctx.needs_input_grad[1] else None,  # v_0
            None,  # sequence
            *(parameter_gradients.get(id(p)) for p in parameters),  # every parameter, in the order given
        )


class MomentumSequence(BlockSequence):
    r"""Momentum residual blocks :math:`v \leftarrow \gamma v + (1-\gamma) f_n(x)`, :math:`x \leftarrow x + v`,
    trained without storing activations.

    ``MomentumSequence(f_0, f_1, ..., gamma=0.9)`` maps :math:`x_0` (and an initial velocity, zero by
    default) to :math:`x_N`. With gradients enabled and ``memory_saving=True`` (the default) the forward pass
    keeps only :math:`(x_N, v_N)` and the backward pass rebuilds each block's input by the inverse (see the
    module documentation); its gradients equal ordinary autograd's to rounding, which grows as
    :math:`\gamma` gets small. ``memory_saving=False`` runs the same blocks with ordinary autograd.

    Parameters are saved for backward (an in-place change before backward fails with autograd's error;
    replaced parameters with a clear one). Tensors a residual function captures by closure rather than
    holds as a parameter or buffer receive no gradient. A double backward raises an error. ``len``,
    iteration, indexing and slicing go over the residual functions, as for the other sequences.

    Args:
        *functions: the residual functions :math:`f_n`, shape-preserving ``nn.Module`` objects.
        gamma: the momentum :math:`\gamma`, in :math:`(0, 1)`.
        memory_saving: rebuild activations in the backward pass instead of storing them.
        preserve_rng_state: replay each function's random state in the recomputation (needed for dropout).

    Raises:
        TypeError: a function is not an ``nn.Module``, or ``gamma`` is not a number.
        ValueError: ``gamma`` outside :math:`(0, 1)`.
    """

    def __init__(self, *functions: nn.Module, gamma: float = 0.9, memory_saving: bool = True, preserve_rng_state: bool = True) -> None:
        super().__init__(functions, kind="residual function")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
            raise TypeError(f"gamma must be a number in (0, 1), got {type(gamma).__name__}")
        if not 0 < gamma < 1:
            raise ValueError(f"gamma must lie in (0, 1) (0 is an ordinary ResNet, which cannot be inverted), got {gamma}")
        self.gamma = float(gamma)
        self.memory_saving = memory_saving
        self.preserve_rng_state = preserve_rng_state

    @property
    def functions(self) -> list[nn.Module]:
        r"""The residual functions :math:`f_0, \dots, f_{N-1}`, in order."""
        return self.blocks

    def _like(self, blocks: list[nn.Module]) -> MomentumSequence:
        return MomentumSequence(*blocks, gamma=self.gamma, memory_saving=self.memory_saving, preserve_rng_state=self.preserve_rng_state)

    def forward(self, x: Tensor, v: Tensor | None = None) -> Tensor:
        """:math:`x_N` from :math:`x_0` and the initial velocity ``v`` (zeros when ``None``).

        Raises:
            ValueError: ``v`` has another shape than ``x``; a residual function returns another shape than
                its input's (it would broadcast into the velocity), or changes its input in place.
        """
        v = self._initial_velocity(x, v)
        parameters = distinct_parameters(self.functions)
        if self.memory_saving and self.functions and needs_graph([x, v], parameters):
            return _MomentumFunction.apply(x, v, self, *parameters)
        return self.run(x, v)[0]

    def run(self, x: Tensor, v: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """:math:`(x_N, v_N)` with ordinary autograd (every activation stored when gradients are on)."""
        v = self._initial_velocity(x, v)
        for index, function in enumerate(self.functions):
            v = self.gamma * v + (1 - self.gamma) * run_checked(function, x, f"residual function {index}")
            x = x + v
        return x, v

    def inverse(self, x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """:math:`(x_0, v_0)` rebuilt from :math:`(x_N, v_N)` by undoing the blocks in reverse order.

        Like the other sequences' ``inverse``, it runs in the caller's grad mode (wrap it in
        ``torch.no_grad()`` when no gradient is wanted). Residual functions with BatchNorm should be in eval
        mode, so that the inverse evaluates the same functions as the forward pass (in training mode the
        statistics of the batch differ).
        """
        for function in reversed(self.functions):
            x = x - v
            v = (v - (1 - self.gamma) * function(x)) / self.gamma
        return x, v

    @staticmethod
    def _initial_velocity(x: Tensor, v: Tensor | None) -> Tensor:
        if v is None:
            return torch.zeros_like(x)
        if v.shape != x.shape:
            raise ValueError(f"v must have the shape of x, {tuple(x.shape)}, got {tuple(v.shape)}")
        return v

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, memory_saving={self.memory_saving}"
