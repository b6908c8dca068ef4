r"""ResNets as Neural ODEs, and adjoint backprop: the chapter "ResNets as Neural ODEs".

A ResNet with :math:`N` blocks and step :math:`h = 1/N`,

.. math::

    x_{n+1} = x_n + h\, f_n(x_n), \qquad n = 0, \dots, N-1,

is the explicit Euler scheme for the ODE :math:`\dot x(t) = f(x(t), \theta(t))` on :math:`t \in [0, 1]`
when :math:`f_n = f(\cdot, \theta(n/N))`. Heun's scheme adds a corrector,

.. math::

    \hat x_{n+1} = x_n + h\, f_n(x_n), \qquad x_{n+1} = x_n + \tfrac h2\big(f_n(x_n) + f_n(\hat x_{n+1})\big),

and is second order for weights constant in depth. With weights that vary in depth, :math:`f_n` in both
stages is only first order; HeunNet (Maleki et al. 2021) evaluates the corrector with the next layer's
function, as Heun's method for the time-varying field evaluates :math:`f(\cdot, \theta(t_{n+1}))`,

.. math::

    \hat x_{n+1} = x_n + h\, f_n(x_n), \qquad x_{n+1} = x_n + \tfrac h2\big(f_n(x_n) + f_{n+1}(\hat x_{n+1})\big),

with :math:`N + 1` functions for :math:`N` steps (``scheme="heunnet"``). Each step can be run backwards
approximately, from :math:`x_{n+1}` alone,

.. math::

    \tilde x_n = \tilde x_{n+1} - h\, f_n(\tilde x_{n+1}) \quad\text{(Euler)},\qquad
    \hat x_n = \tilde x_{n+1} - h\, g(\tilde x_{n+1}),\ \
    \tilde x_n = \tilde x_{n+1} - \tfrac h2\big(g(\tilde x_{n+1}) + f_n(\hat x_n)\big) \quad\text{(Heun)},

with :math:`g = f_n` (Heun) or :math:`g = f_{n+1}` (HeunNet): the same scheme with step :math:`-h` and the
two stages' functions exchanged. So a backward pass can rebuild the activations it needs from the output
instead of storing them (Sander, Ablin and Peyré 2022). The rebuilt activations, and hence the gradients,
are approximate. A step and its reversal together are off by :math:`O(h^2)` for Euler and by :math:`O(h^4)`
for Heun (Heun's leading error term is odd in :math:`h` and cancels in the round trip); for HeunNet by
:math:`O(h^2)` in general, and :math:`O(h^4)` when consecutive layers differ by :math:`O(h)` (weights smooth
in depth). Over :math:`N` steps the local errors add up, each amplified by the later reversed steps by at
most :math:`\exp(h \sum_n L_n)` for Lipschitz constants :math:`L_n` (large where the network contracts,
:func:`revlib.reversible_heun.euler_rebuild_bound`), so for a fixed network the gradient error shrinks like
:math:`1/N` for Euler and :math:`1/N^3` for Heun (and for HeunNet with smooth weights).

:class:`ODEResNet` holds the residual functions and the mechanism; :func:`smooth_in_depth_`,
:func:`interpolate_depth`, :func:`gradient_error` and, for the weights as functions of depth,
:func:`linear_residuals`, :func:`depth_profile`, :func:`roughness_in_depth`, :func:`mean_layer_difference` and
:func:`limit_distance` are what the chapter's
experiments need (trained by :func:`revlib.training.gradient_descent_`).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from revlib._checks import positive_integers
from revlib._recompute import (
    BlockSequence,
    ForwardState,
    accumulate,
    check_parameters_unchanged,
    distinct_parameters,
    module_parameters,
    needs_graph,
    run_checked,
    vector_jacobian_products,
)
from revlib.blocks import mlp_residual
from revlib.runtime import resolve_device
from revlib.verify import flat_gradient, relative_error

__all__ = [
    "SCHEMES",
    "DepthVectorField",
    "ODEResNet",
    "TorchdiffeqResNet",
    "adjoint_and_exact_gradients",
    "depth_profile",
    "fixed_point_reverse",
    "fixed_point_reverse_step",
    "gradient_error",
    "heun_fixed_point_reverse_step",
    "interpolate_depth",
    "limit_distance",
    "linear_residuals",
    "mean_layer_difference",
    "ode_classifier",
    "roughness_in_depth",
    "smooth_in_depth_",
    "tanh_residuals",
]

Scheme = Literal["euler", "heun", "heunnet"]
SCHEMES = ("euler", "heun", "heunnet")


@dataclass(frozen=True)
class _Stage:
    """One step's functions: the predictor :math:`f_n` and the corrector (:math:`f_n` again, or :math:`f_{n+1}`
    for HeunNet), with their indices among the residual functions (for error messages)."""

    predictor: nn.Module
    corrector: nn.Module
    predictor_index: int
    corrector_index: int


def _stages(residuals: Sequence[nn.Module], scheme: Scheme) -> list[_Stage]:
    """Each step's predictor and corrector: f_n twice (Euler, Heun), or f_n then f_{n+1} (HeunNet).

    Raises:
        ValueError: HeunNet with fewer than two functions.
    """
    if scheme == "heunnet":
        if len(residuals) < 2:
            raise ValueError("scheme='heunnet' needs N + 1 residual functions for N steps: at least 2")
        return [_Stage(f, g, n, n + 1) for n, (f, g) in enumerate(zip(residuals[:-1], residuals[1:]))]
    return [_Stage(f, f, n, n) for n, f in enumerate(residuals)]


StepStates = tuple[ForwardState, ...]  # the random and autocast states of a step's predictor (and corrector)


def _evaluate(f: nn.Module, x: Tensor, index: int, state: ForwardState | None) -> Tensor:
    """:math:`f(x)` for residual function ``index``, replaying ``state`` when given (a recomputation)."""
    with state.replayed() if state is not None else contextlib.nullcontext():
        return run_checked(f, x, f"residual function {index}")


def _step(stage: _Stage, x: Tensor, h: float, scheme: Scheme, states: StepStates | None = None) -> Tensor:
    """One step forward in depth: :math:`x_{n+1}` from :math:`x_n` (each stage replaying its state in ``states``)."""
    velocity = _evaluate(stage.predictor, x, stage.predictor_index, states[0] if states else None)
    if scheme == "euler":
        return x + h * velocity  # x_{n+1} = x_n + h f_n(x_n)
    predictor = x + h * velocity  # x̂_{n+1} = x_n + h f_n(x_n)
    correction = _evaluate(stage.corrector, predictor, stage.corrector_index, states[1] if states else None)
    return x + (h / 2) * (velocity + correction)  # x_{n+1} = x_n + h/2 (f_n(x_n) + g(x̂_{n+1})), g = f_n or f_{n+1}


def _reverse_step(stage: _Stage, x_next: Tensor, h: float, scheme: Scheme, states: StepStates | None = None, iterations: int = 1) -> Tensor:
    r"""One step backward in depth, approximately :math:`x_n`: the same scheme with step :math:`-h` and the
    stages exchanged, refined by ``iterations − 1`` fixed-point iterates (:func:`fixed_point_reverse_step`,
    :func:`heun_fixed_point_reverse_step`). The corrector's function is evaluated first, at :math:`x_{n+1}`
    (where the forward pass evaluated it at :math:`\hat x_{n+1}`), and the predictor's at the rebuilt :math:`\hat x_n`;
    each replays the random state of *its* stage in the forward pass, so that dropout draws the same masks."""

    def f(x: Tensor) -> Tensor:
        return _evaluate(stage.predictor, x, stage.predictor_index, states[0] if states else None)

    if scheme == "euler":
        return fixed_point_reverse_step(f, x_next, h, iterations)

    def g(x: Tensor) -> Tensor:
        return _evaluate(stage.corrector, x, stage.corrector_index, states[1] if states else None)

    return heun_fixed_point_reverse_step(f, g, x_next, h, iterations)


def _check_iterations(iterations: int, name: str = "iterations") -> None:
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"{name} must be a positive integer (1 is the plain reversed step), got {iterations!r}")


def _check_step(h: float) -> None:
    if isinstance(h, bool) or not isinstance(h, (int, float)) or not math.isfinite(h) or h <= 0:
        raise ValueError(f"h must be a positive finite step, got {h!r}")


def fixed_point_reverse(increment: Callable[[Tensor], Tensor], x_next: Tensor, iterations: int, *, start: Tensor | None = None) -> Tensor:
    r"""Iterate :math:`x^{(j+1)} = x_{n+1} - \Delta(x^{(j)})` from :math:`x^{(0)} =` ``start`` (default :math:`x_{n+1}`).

    A one-step scheme :math:`x_{n+1} = x_n + \Delta(x_n)` (Euler: :math:`\Delta = h f_n`; Heun:
    :math:`\Delta(x) = \tfrac h2 (f(x) + g(x + h f(x)))`) is undone by the fixed point of
    :math:`x \mapsto x_{n+1} - \Delta(x)`. When :math:`\Delta` is a contraction, Lipschitz with constant
    :math:`q < 1` (:math:`q = hL` for Euler with :math:`f_n` :math:`L`-Lipschitz), every iteration divides the
    distance to the true :math:`x_n` by at least :math:`1/q`; with :math:`q \ge 1` the iteration need not
    converge (for :math:`\Delta(x) = q x` the error is multiplied by :math:`-q` each time).

    ``increment`` is called ``iterations`` times; one that draws random numbers (dropout) must draw the
    forward pass's at every call (evaluate it inside the step's ``ForwardState.replayed`` block each time).

    Args:
        increment: :math:`\Delta`, the step's increment, tensor to tensor of the same shape.
        x_next: :math:`x_{n+1}`.
        iterations: how many times to apply the map, at least 1.
        start: the first guess :math:`x^{(0)}`.

    Returns:
        :math:`x^{(\text{iterations})}`, with the grad mode of the caller.

    Raises:
        ValueError: ``iterations`` is not a positive integer.
    """
    _check_iterations(iterations)
    x = x_next if start is None else start
    for _ in range(iterations):
        x = x_next - increment(x)  # x^{(j+1)} = x_{n+1} − Δ(x^{(j)})
    return x


def fixed_point_reverse_step(f: Callable[[Tensor], Tensor], x_next: Tensor, h: float, iterations: int) -> Tensor:
    r"""Rebuild :math:`x_n` from :math:`x_{n+1} = x_n + h f(x_n)` by ``iterations`` fixed-point iterates.

    .. math::

        x^{(0)} = x_{n+1}, \qquad x^{(j+1)} = x_{n+1} - h\, f(x^{(j)}), \qquad j = 0, \dots, k - 1 .

    The first iterate is the reversed Euler step :math:`x_{n+1} - h f(x_{n+1})` of the approximate adjoint
    (:class:`revlib.adjoint.ODEResNet`). The error starts at :math:`x^{(0)} - x_n = h f(x_n) = O(h)` and is
    multiplied by at most :math:`hL` per iterate (:math:`L` the Lipschitz constant of :math:`f`), so :math:`k`
    iterates have local error :math:`O(h^{k+1})` when :math:`hL < 1`; with :math:`hL \ge 1` they may diverge.
    Costs :math:`k` evaluations of :math:`f`.

    Args:
        f: the step's residual function :math:`f_n` (random ones must replay their draws at every call,
            see :func:`fixed_point_reverse`).
        x_next: :math:`x_{n+1}`.
        h: the step, :math:`1/N`.
        iterations: :math:`k \ge 1`.

    Raises:
        ValueError: ``iterations`` is not a positive integer or ``h`` not a positive finite number.
    """
    _check_step(h)
    return fixed_point_reverse(lambda x: h * f(x), x_next, iterations)


def heun_fixed_point_reverse_step(
    f: Callable[[Tensor], Tensor], g: Callable[[Tensor], Tensor], x_next: Tensor, h: float, iterations: int
) -> Tensor:
    r"""Rebuild :math:`x_n` from the Heun step :math:`x_{n+1} = x_n + \tfrac h2 \big(f(x_n) + g(x_n + h f(x_n))\big)`.

    :math:`g = f` is Heun's step, :math:`g = f_{n+1}` HeunNet's. The first iterate is the reversed step of the
    approximate adjoint (the scheme with step :math:`-h` and the stages exchanged); each further one iterates
    the implicit equation,

    .. math::

        x^{(1)} = x_{n+1} - \tfrac h2 \big(g(x_{n+1}) + f(x_{n+1} - h\, g(x_{n+1}))\big), \qquad
        x^{(j+1)} = x_{n+1} - \tfrac h2 \big(f(x^{(j)}) + g(x^{(j)} + h f(x^{(j)}))\big),

    and gains one order. For :math:`g = f` the first iterate's local error is :math:`O(h^4)`, not
    :math:`O(h^3)`: Heun's leading error term is odd in :math:`h`, so the forward step's and the reversed
    step's cancel, and :math:`k` iterates have local error :math:`O(h^{k+3})`. For HeunNet with unrelated
    :math:`f, g` the first iterate's error is :math:`\tfrac{h^2}{4} (g' - f')(f - g) + O(h^3)`, and :math:`k`
    iterates give :math:`O(h^{k+1})`. The map is a contraction when
    :math:`\tfrac h2 (L_f + L_g + h L_f L_g) < 1`; for :math:`f = g = \lambda\,\mathrm{id}` it multiplies the
    error by :math:`-(h\lambda + (h\lambda)^2/2)`. Costs :math:`2k` evaluations.

    Args:
        f: the predictor's function :math:`f_n`.
        g: the corrector's function, :math:`f_n` (Heun) or :math:`f_{n+1}` (HeunNet).
        x_next: :math:`x_{n+1}`.
        h: the step, :math:`1/N`.
        iterations: :math:`k \ge 1`.

    Raises:
        ValueError: ``iterations`` is not a positive integer or ``h`` not a positive finite number.
    """
    _check_step(h)
    _check_iterations(iterations)
    slope = g(x_next)
    first = x_next - (h / 2) * (slope + f(x_next - h * slope))  # the reversed step: Heun at −h, stages exchanged

    def increment(x: Tensor) -> Tensor:
        slope = f(x)
        return (h / 2) * (slope + g(x + h * slope))  # Δ(x) = h/2 (f(x) + g(x + h f(x)))

    return first if iterations == 1 else fixed_point_reverse(increment, x_next, iterations - 1, start=first)


def _buffers_restored(states: StepStates) -> contextlib.AbstractContextManager[Any]:
    """Put back on leaving the buffers the step's stages updated in the forward pass (nothing to enter when none did)."""
    if not any(state.updated_buffers for state in states):
        return contextlib.nullcontext()
    restoring = contextlib.ExitStack()
    for state in states:
        restoring.enter_context(state.buffers_restored())
    return restoring


class _AdjointFunction(torch.autograd.Function):
    """Run the steps keeping only the output; rebuild each step's input backwards and back-propagate through it."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, residuals: Sequence[nn.Module], scheme: Scheme, iterations: int, preserve_rng: bool,
                *parameters: Tensor) -> Tensor:
        ctx.residuals, ctx.scheme, ctx.iterations = residuals, scheme, iterations  # not tensors: needed to recompute
        ctx.states = []  # per step, its stages' random, autocast and buffer states: a few KiB, no activations
        stages = _stages(residuals, scheme)
        h = 1.0 / len(stages)
        state: ForwardState | None = None
        with torch.no_grad():
            for stage in stages:
                state_f = state = ForwardState.capture(x.device, preserve_rng, previous=state)
                with state_f.recording(stage.predictor):
                    velocity = run_checked(stage.predictor, x, f"residual function {stage.predictor_index}")
                if scheme == "euler":
                    x = x + h * velocity
                    ctx.states.append((state_f,))
                    continue
                state_g = state = ForwardState.capture(x.device, preserve_rng, previous=state)
                with state_g.recording(stage.corrector):
                    correction = run_checked(stage.corrector, x + h * velocity, f"residual function {stage.corrector_index}")
                x = x + (h / 2) * (velocity + correction)
                ctx.states.append((state_f, state_g))
            if state is not None:
                state.finish()
        # the only activation kept is x_N; the parameters are saved so that autograd's version check catches an
        # in-place change to one of them before backward
        ctx.save_for_backward(x, *parameters)
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        x_next, *parameters = ctx.saved_tensors
        check_parameters_unchanged(parameters, distinct_parameters(ctx.residuals), "ODEResNet")
        stages = _stages(ctx.residuals, ctx.scheme)
        h = 1.0 / len(stages)
        adjoint = grad_output  # a_N = ∂L/∂x_N
        parameter_gradients: dict[int, Tensor] = {}  # by id, summed: a residual function may appear twice
        for n in reversed(range(len(stages))):
            stage, states = stages[n], ctx.states[n]
            # a_0 only when the input wants a gradient: otherwise the first step's VJP skips the input's products
            wants_point = n > 0 or ctx.needs_input_grad[0]
            with _buffers_restored(states):  # BatchNorm's statistics as the forward pass left them
                with torch.no_grad():  # each stage's own dropout masks and precisions, run at −h
                    x = _reverse_step(stage, x_next, h, ctx.scheme, states, ctx.iterations)  # x̃_n from x̃_{n+1}
                x = x.detach().requires_grad_(wants_point)
                with torch.enable_grad():
                    recomputed = _step(stage, x, h, ctx.scheme, states)  # the step at x̃_n, with its graph
                # a_n = (∂x_{n+1}/∂x_n)ᵀ a_{n+1}, evaluated at x̃_n; the step's parameter gradients (the step's
                # parameters as its forward pass recorded them, the same objects: checked above)
                step_parameters = states[0].parameters if len(states) == 1 else list(dict.fromkeys(p for s in states for p in s.parameters))
                adjoint, found = vector_jacobian_products(recomputed, x if wants_point else None, step_parameters, adjoint)
            accumulate(parameter_gradients, step_parameters, found)
            x_next = x.detach()
        return (
            adjoint if ctx.needs_input_grad[0] else None,  # x
            None,  # residuals
            None,  # scheme
            None,  # iterations
            None,  # preserve_rng
            *(parameter_gradients.get(id(p)) for p in parameters),  # every parameter, in the order given
        )


def tanh_residuals(depth: int, width: int, *, hidden: int | None = None) -> list[nn.Module]:
    r"""The residual functions the chapter's experiments use, :math:`f_n(x) = W_{n,2} \tanh(W_{n,1} x + b_{n,1}) + b_{n,2}`.

    Args:
        depth: how many functions (the :math:`N` of an :class:`ODEResNet`).
        width: features of :math:`x`, kept by every function.
        hidden: features of the tanh layer (default ``width``).

    Raises:
        ValueError: a size is not positive.
    """
    positive_integers(depth=depth)
    return [mlp_residual(width, hidden, activation="tanh") for _ in range(depth)]


def linear_residuals(depth: int, width: int) -> list[nn.Module]:
    r"""Linear residual functions :math:`f_n(x) = \Theta_n x`, bias-free ``nn.Linear(width, width)`` layers.

    In an :class:`ODEResNet` they make the linear ResNet :math:`x_{n+1} = (I + \Theta_n/N)\, x_n`, the model in
    which Sander, Ablin and Peyré (2022) prove that gradient descent from weights smooth in depth keeps
    them smooth. Each layer has PyTorch's default, independent initialisation (:func:`smooth_in_depth_`
    makes them smooth); the ``weight`` of layer :math:`n` is :math:`\Theta_n`.

    Args:
        depth: how many functions (the :math:`N` of an :class:`ODEResNet`).
        width: features of :math:`x`.

    Raises:
        ValueError: a size is not positive.
    """
    positive_integers(depth=depth, width=width)
    return [nn.Linear(width, width, bias=False) for _ in range(depth)]


class ODEResNet(BlockSequence):
    r"""A ResNet read as an ODE solver: :math:`N` shape-preserving residual functions, step :math:`h = 1/N`.

    ``ODEResNet(f_0, ..., f_{N-1}, scheme="euler")`` computes :math:`x_{n+1} = x_n + h f_n(x_n)`;
    ``scheme="heun"`` :math:`x_{n+1} = x_n + \tfrac h2 [f_n(x_n) + f_n(x_n + h f_n(x_n))]`;
    ``scheme="heunnet"`` HeunNet's :math:`x_{n+1} = x_n + \tfrac h2 [f_n(x_n) + f_{n+1}(x_n + h f_n(x_n))]`,
    with :math:`N + 1` residual functions for :math:`N` steps (:math:`h = 1/N` in every case; ``len`` counts
    the functions, :attr:`depth` the steps).

    With ``memory_saving=True`` (the default) the forward pass stores only the output and the backward pass
    is the *adjoint*: it rebuilds each step's input by running the scheme with step :math:`-h`, then
    back-propagates through that one step. Its memory for backward does not grow with :math:`N`; its
    gradients are approximate (exact in the limit :math:`N\to\infty` when the weights are smooth in depth;
    see :func:`gradient_error`). ``memory_saving=False`` is ordinary backprop through the same steps (every
    step's activations stored, exact gradients); the attribute can be switched at any time. Like
    :class:`revlib.reversible.ReversibleSequence`, and through the same mechanism, the adjoint replays each
    stage's random state (dropout draws the masks of the forward pass, in the rebuilding step and in the
    recomputed one), re-enters its autocast state, and leaves BatchNorm's running statistics as the
    forward pass updated them. It is ``once_differentiable``; it saves the parameters for backward (an
    in-place change to one fails with autograd's error) and recomputes with the modules' own parameters,
    raising a clear error if they were replaced in between. Tensors that a residual function captures by
    closure, rather than holds as parameters or buffers, receive no gradient.

    **Cost.** Count in evaluations of a residual function. Its vector-Jacobian product with respect to its
    input and its parameters costs about two: a linear layer :math:`u = Wv` takes one matrix product forward
    and two backward, :math:`W^\top \bar u` and :math:`\bar u v^\top` (elementwise operations are left out).
    A step has :math:`s` stages, :math:`s = 1` for Euler and :math:`s = 2` for Heun and HeunNet, and the
    rebuild takes :math:`k` iterates (``rebuild_iterations``; each evaluates all :math:`s` stages). Per step,

    .. math::

        \text{backprop:}\ \underbrace{s}_{\text{forward}} + \underbrace{2s}_{\text{VJP}} = 3s, \qquad
        \text{adjoint:}\ \underbrace{s}_{\text{forward}} + \underbrace{sk}_{\text{rebuild}}
        + \underbrace{s}_{\text{recomputed with graph}} + \underbrace{2s}_{\text{VJP}} = s\,(4 + k),

    so the adjoint's time is :math:`(4 + k)/3` times backprop's for every scheme: :math:`5/3` for the
    reversed step, :math:`2` with one fixed-point iterate more. No evaluation can serve twice: the rebuild
    evaluates :math:`f_n` at :math:`\tilde x_{n+1}` (and the next one :math:`f_{n-1}` at :math:`\tilde x_n`),
    the recomputation :math:`f_n` at :math:`\tilde x_n`, another point or another function. The adjoint takes
    backprop's vector-Jacobian products and no more (none with respect to the network's input when it
    wants no gradient). The ratio is reached where the evaluations' arithmetic dominates; each step also
    pays a fixed cost of Python calls (three module calls and one ``torch.autograd.grad`` per Euler step),
    which dominates for narrow layers and small batches (``benchmarks/adjoint.py``).

    Args:
        *residuals: the functions :math:`f_0, \dots, f_{N-1}` (:math:`f_N` too for HeunNet), ``nn.Module``
            objects that preserve the shape of their input.
        scheme: ``"euler"``, ``"heun"`` or ``"heunnet"``.
        memory_saving: the adjoint backward pass (``True``) or ordinary backprop (``False``).
        rebuild_iterations: :math:`k`, the fixed-point iterates that rebuild each step's input in the adjoint
            backward pass (:func:`fixed_point_reverse_step`): 1 is the reversed step; each further one
            multiplies the rebuild's error by about :math:`hL` when :math:`hL < 1` (:math:`L` the residual
            function's Lipschitz constant) and costs one (Euler) or two (Heun) more evaluations per step.
        preserve_rng_state: replay each stage's random state in the adjoint backward pass (needed for
            dropout; one copy of the generator state per stage that draws random numbers, a few KiB).
        device: move the residual functions there; ``None`` leaves them where they are (they exist already).
        dtype: cast their floating-point parameters to it; ``None`` leaves them as they are.

    Raises:
        ValueError: no residual function (fewer than two for HeunNet), an unknown scheme, or
            ``rebuild_iterations`` not a positive integer. A residual function that changes the shape of
            its input raises a ``ValueError`` naming it when the network runs.
        TypeError: a residual function is not an ``nn.Module``.
    """

    def __init__(
        self,
        *residuals: nn.Module,
        scheme: Scheme = "euler",
        memory_saving: bool = True,
        rebuild_iterations: int = 1,
        preserve_rng_state: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if len(residuals) == 1 and isinstance(residuals[0], (list, tuple, nn.ModuleList)):
            raise TypeError("pass the residual functions one by one: ODEResNet(*functions), not ODEResNet(functions)")
        super().__init__(residuals, kind="residual function")
        if not residuals:
            raise ValueError("an ODEResNet needs at least one residual function")
        _stages(residuals, scheme)  # HeunNet needs two functions at least
        self.scheme = scheme  # checked by __setattr__
        self.memory_saving = memory_saving
        _check_iterations(rebuild_iterations, "rebuild_iterations")
        self.rebuild_iterations = rebuild_iterations
        self.preserve_rng_state = preserve_rng_state
        if device is not None or dtype is not None:
            self.to(device=None if device is None else resolve_device(device), dtype=dtype)

    @property
    def residuals(self) -> list[nn.Module]:
        """The residual functions, in order."""
        return self.blocks

    @property
    def depth(self) -> int:
        """The number of steps :math:`N` (one fewer than the residual functions for HeunNet)."""
        return len(_stages(self.residuals, self.scheme))

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "scheme" and value not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {value!r}")
        super().__setattr__(name, value)

    def _like(self, blocks: list[nn.Module]) -> ODEResNet:
        return ODEResNet(*blocks, scheme=self.scheme, memory_saving=self.memory_saving, rebuild_iterations=self.rebuild_iterations,
                         preserve_rng_state=self.preserve_rng_state)

    def forward(self, x: Tensor) -> Tensor:
        stages = _stages(self.residuals, self.scheme)
        h = 1.0 / len(stages)
        parameters = module_parameters(self)  # self.parameters(), walked once
        if not self.memory_saving or not needs_graph([x], parameters):
            for stage in stages:
                x = _step(stage, x, h, self.scheme)
            return x
        return _AdjointFunction.apply(x, self.residuals, self.scheme, self.rebuild_iterations, self.preserve_rng_state, *parameters)

    def inverse(self, y: Tensor) -> Tensor:
        """The approximate input rebuilt from the output, as the adjoint backward pass rebuilds it."""
        stages = _stages(self.residuals, self.scheme)
        h = 1.0 / len(stages)
        for stage in reversed(stages):
            y = _reverse_step(stage, y, h, self.scheme, iterations=self.rebuild_iterations)
        return y

    def extra_repr(self) -> str:
        rebuild = f", rebuild_iterations={self.rebuild_iterations}" if self.rebuild_iterations != 1 else ""
        return f"depth={self.depth}, scheme={self.scheme!r}, memory_saving={self.memory_saving}{rebuild}"


def smooth_in_depth_(model: ODEResNet, *, modes: int = 3, generator: torch.Generator | None = None) -> ODEResNet:
    r"""Give the residual functions weights that vary smoothly with depth, in place.

    Every parameter becomes a smooth function of the depth :math:`t_n = n/(N-1) \in [0, 1]`,

    .. math::

        \theta_n = \frac{1}{\sqrt{K}} \sum_{k=0}^{K-1} A_k \cos(k \pi t_n),

    where the :math:`A_k` are independent copies of what the first residual function's parameter was
    initialised with, shuffled entrywise (so each has that initialisation's distribution). Consecutive
    layers then differ by :math:`O(1/N)`, the condition for the ResNet to have an ODE limit.

    Args:
        model: the network; all residual functions must have the same parameter shapes.
        modes: :math:`K`, the number of cosine modes.
        generator: the source of randomness (on the CPU), for repeatable weights.

    Returns:
        ``model``.

    Raises:
        ValueError: ``modes`` is not positive, or the residual functions differ in their parameter shapes.
    """
    positive_integers(modes=modes)
    names = _check_same_structure(model)
    functions = len(model.residuals)
    depths = torch.linspace(0, 1, functions, dtype=torch.float64) if functions > 1 else torch.zeros(1, dtype=torch.float64)
    basis = torch.stack([torch.cos(k * math.pi * depths) for k in range(modes)]) / math.sqrt(modes)  # (K, N)
    first = dict(model.residuals[0].named_parameters())
    with torch.no_grad():
        for name in names:
            template = first[name].detach().flatten().double().cpu()
            amplitudes = torch.stack([template[torch.randperm(template.numel(), generator=generator)] for _ in range(modes)])  # (K, P)
            values = basis.T @ amplitudes  # (N, P): θ_n for every layer n
            for f, value in zip(model.residuals, values):
                parameter = dict(f.named_parameters())[name]
                parameter.copy_(value.reshape(parameter.shape).to(parameter))
    return model


def _check_same_structure(model: ODEResNet) -> list[str]:
    shapes = [{name: p.shape for name, p in f.named_parameters()} for f in model.residuals]
    if any(s != shapes[0] for s in shapes):
        raise ValueError("all residual functions must have the same parameter names and shapes")
    return list(shapes[0])


def interpolate_depth(model: ODEResNet, depth: int) -> ODEResNet:
    r"""A deeper (or shallower) copy of ``model`` whose weights interpolate the trained ones linearly in depth.

    The new network has ``depth`` residual functions (``depth − 1`` steps for HeunNet). Layer :math:`n` sits
    at depth :math:`s = n/(\text{depth}-1)` and takes the linear interpolation of the two trained layers
    around :math:`s\,(L-1)`, :math:`L` the trained functions; the first and last layers are kept.
    Buffers are copied from the nearest trained layer. The scheme and the other options are kept.

    Raises:
        ValueError: ``depth`` is below 2 while the model has more than one layer, or the residual
            functions differ in their parameter shapes.
    """
    _check_same_structure(model)
    layers = len(model.residuals)
    if not isinstance(depth, int) or depth < 1 or (depth == 1 and layers > 1):
        raise ValueError(f"depth must be an integer ≥ 2 (or 1 for a one-layer model), got {depth!r}")
    states = [f.state_dict() for f in model.residuals]
    residuals = []
    for n in range(depth):
        position = n * (layers - 1) / (depth - 1) if depth > 1 else 0.0
        below = min(int(position), layers - 1)
        above = min(below + 1, layers - 1)
        weight = position - below
        f = copy.deepcopy(model.residuals[below])
        parameters = set(dict(f.named_parameters()))
        f.load_state_dict({
            name: (1 - weight) * states[below][name] + weight * states[above][name] if name in parameters
            else states[round(position)][name]
            for name in states[below]
        })
        residuals.append(f)
    return model._like(residuals)


def adjoint_and_exact_gradients(model: ODEResNet, inputs: Tensor, loss_fn: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """The gradients of ``loss_fn(model(inputs))`` with respect to all of the model's trainable parameters,
    concatenated, once from the adjoint and once from backprop (in that order). The model's ``memory_saving`` and
    ``.grad`` fields are left as they were.

    Raises:
        ValueError: the model has no parameter that requires grad.
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError("the model has no parameter that requires grad")
    original = model.memory_saving
    gradients = {}
    try:
        for memory_saving in (True, False):
            model.memory_saving = memory_saving
            gradients[memory_saving] = flat_gradient(model, inputs, loss_fn, parameters)
    finally:
        model.memory_saving = original
    return gradients[True], gradients[False]


def gradient_error(model: ODEResNet, inputs: Tensor, loss_fn: Callable[[Tensor], Tensor]) -> float:
    r"""The relative error of the adjoint gradient against the exact one, for one batch:

    .. math::

        \frac{\lVert g_{\text{adjoint}} - g_{\text{backprop}} \rVert}{\lVert g_{\text{backprop}} \rVert},

    with :math:`g` the gradient of ``loss_fn(model(inputs))`` with respect to all of the model's
    parameters, concatenated (:func:`adjoint_and_exact_gradients`). (Sander et al. plot the square of a
    per-tensor version of this quantity, so their slopes are twice ours.)

    Raises:
        ValueError: the model has no parameter that requires grad.
    """
    return relative_error(*adjoint_and_exact_gradients(model, inputs, loss_fn))


def depth_profile(model: ODEResNet) -> Tensor:
    r"""The weights as a function of depth: row :math:`n` holds all of residual function :math:`n`'s parameters,
    flattened and concatenated in ``named_parameters`` order, as a detached float64 copy of shape
    :math:`(N, P)` (on the CPU).

    Column :math:`j` is one weight :math:`\theta_n[j]` against the layer :math:`n`; differences of rows (the
    change training made, for instance) are profiles too, for :func:`roughness_in_depth`.

    Raises:
        ValueError: the residual functions differ in their parameter shapes.
    """
    _check_same_structure(model)
    with torch.no_grad():
        return torch.stack([torch.cat([p.detach().double().cpu().flatten() for p in f.parameters()]) for f in model.residuals])


def roughness_in_depth(weights: ODEResNet | Tensor) -> float:
    r"""How much the weights change from one residual function to the next, relative to their size:

    .. math:: \rho = \frac{1}{N-1} \sum_{n=0}^{N-2} \frac{\lVert \theta_{n+1} - \theta_n \rVert}{\lVert \theta_n \rVert},

    with :math:`\theta_n` all of function :math:`n`'s parameters, concatenated. Weights that are samples of a
    smooth :math:`\theta(t)` give :math:`\rho = O(1/N)`; independent draws of equal size give
    :math:`\rho \approx \sqrt2`, at any depth.

    Args:
        weights: an :class:`ODEResNet`, or a depth profile: a tensor whose first dimension is the depth
            :math:`n` (:func:`depth_profile`; the other dimensions are flattened).

    Raises:
        ValueError: fewer than two residual functions (rows), or functions of different parameter shapes.
    """
    layers = _depth_rows(weights, "roughness_in_depth")
    steps = (layers[1:] - layers[:-1]).norm(dim=1) / layers[:-1].norm(dim=1)
    return steps.mean().item()


def _depth_rows(weights: ODEResNet | Tensor, caller: str) -> Tensor:
    """A network's depth profile, or a given profile flattened to ``(N, P)`` float64 rows."""
    layers = depth_profile(weights) if isinstance(weights, ODEResNet) else weights.detach().double().reshape(len(weights), -1)
    if len(layers) < 2:
        raise ValueError(f"{caller} needs at least two residual functions (rows), got {len(layers)}")
    return layers


def mean_layer_difference(weights: ODEResNet | Tensor) -> float:
    r"""The mean distance between consecutive residual functions' weights, *not* divided by their size:

    .. math:: \frac{1}{N-1} \sum_{n=0}^{N-2} \lVert \theta_{n+1} - \theta_n \rVert .

    :func:`roughness_in_depth` divides each term by :math:`\lVert\theta_n\rVert`; this undivided mean tells
    whether a change of :math:`\rho` comes from the differences between layers or from the weights' size.

    Args:
        weights: an :class:`ODEResNet`, or a depth profile (:func:`depth_profile`).

    Raises:
        ValueError: fewer than two residual functions (rows), or functions of different parameter shapes.
    """
    layers = _depth_rows(weights, "mean_layer_difference")
    return (layers[1:] - layers[:-1]).norm(dim=1).mean().item()


def limit_distance(shallow: ODEResNet | Tensor, deep: ODEResNet | Tensor) -> float:
    r"""How far the weights of two networks of different depths are from being samples of one function of
    depth-time :math:`t \in [0, 1]`:

    .. math:: d = \frac{\sum_n \lVert\theta^{(N)}_n - \theta^{(M)}(t_n)\rVert}{\sum_n \lVert\theta^{(N)}_n\rVert},

    with the :math:`N` rows of ``shallow`` read as samples at :math:`t_n = n/(N-1)` and the :math:`M` rows of
    ``deep`` at :math:`t_m = m/(M-1)` (the grid of :func:`smooth_in_depth_`), and :math:`\theta^{(M)}(t_n)`
    the deep profile interpolated linearly at the shallow grid. Two samplings of one smooth function give
    only the interpolation's error, :math:`O(1/M^2)`; trained weights that converge to a limit function at
    the rate :math:`1/N` give :math:`d = O(1/N)`; weights with no limit give a :math:`d` that does not fall.

    Args:
        shallow: an :class:`ODEResNet` or its depth profile, :math:`N \ge 2` rows.
        deep: the same for the other depth, :math:`M \ge 2` rows of the same width.

    Raises:
        ValueError: fewer than two rows, profiles of different widths, or a shallow profile of zero norm.
    """
    rows = _depth_rows(shallow, "limit_distance")
    other = _depth_rows(deep, "limit_distance")
    if rows.shape[1] != other.shape[1]:
        raise ValueError(f"limit_distance needs profiles of the same width, got {rows.shape[1]} and {other.shape[1]} parameters per row")
    position = torch.linspace(0, len(other) - 1, len(rows), dtype=torch.float64)
    below = position.floor().long().clamp(max=len(other) - 2)
    weight = (position - below).unsqueeze(1)
    interpolated = (1 - weight) * other[below] + weight * other[below + 1]
    size = rows.norm(dim=1).sum()
    if size == 0:
        raise ValueError("limit_distance needs a shallow profile that is not zero: d divides by its norm")
    return ((rows - interpolated).norm(dim=1).sum() / size).item()


class DepthVectorField(nn.Module):
    r"""The vector field of an :class:`ODEResNet` in layer time, :math:`F(s, x) = f_{\lfloor s\rfloor}(x)/N` on :math:`[0, N)`.

    Layer time :math:`s = Nt`, for depth-time :math:`t \in [0, 1]`, runs over the integers at the layers' boundaries, so the field is
    :math:`f_n/N` on the interval :math:`[n, n+1)` that belongs to layer :math:`n`: an Euler step of size 1
    from :math:`s = n` is the network's step :math:`x + f_n(x)/N`, and the grid points are exact in
    floating point for any depth. The field jumps at the integers; a solver must evaluate it inside the
    step's interval (``torchdiffeq``'s ``perturb`` option), so that a step taken backwards from
    :math:`n + 1` also sees :math:`f_n`. Called as ``field(s, x)``, as ``torchdiffeq.odeint`` expects.

    Raises:
        ValueError: ``s`` outside :math:`[0, N)` (a step evaluated at a jump without ``perturb``).
    """

    def __init__(self, model: ODEResNet) -> None:
        super().__init__()
        self.residuals = nn.ModuleList(model.residuals)

    def forward(self, s: Tensor, x: Tensor) -> Tensor:
        depth = len(self.residuals)
        position = float(s.detach())
        if not 0 <= position < depth:
            raise ValueError(f"layer time s must lie in [0, {depth}), got {position}: evaluate inside each step (perturb=True)")
        return (1.0 / depth) * self.residuals[math.floor(position)](x)


class TorchdiffeqResNet(nn.Module):
    r"""The Euler :class:`ODEResNet` run by ``torchdiffeq``'s fixed-step Euler solver, for comparisons.

    ``odeint`` integrates :class:`DepthVectorField` over layer time :math:`[0, N]` with steps of 1, evaluating
    the field just inside each step (``perturb=True``): the forward pass is the same computation as
    ``model``'s, bit for bit. With ``adjoint=True`` the gradient comes from ``odeint_adjoint``: the
    *continuous* adjoint equation :math:`\dot a = -(\partial F/\partial x)^\top a` solved backwards by the
    same solver. Each of its reverse steps, from :math:`n + 1` to :math:`n`, uses layer :math:`n`'s function,
    as the discrete adjoint does, but evaluates its Jacobian at the step's start :math:`\tilde x_{n+1}`
    where the network's derivative is taken at :math:`\tilde x_n`: optimise-then-discretise rather than
    discretise-then-optimise. With ``adjoint=False`` autograd differentiates through the solver (exact,
    memory growing with depth). Shares its parameters with ``model``. Needs the optional package
    ``torchdiffeq``.

    Raises:
        ValueError: ``model`` uses Heun steps (``torchdiffeq``'s Heun evaluates its corrector at the next
            layer's time, a different network).
        ImportError: ``torchdiffeq`` is not installed (when the network first runs).
    """

    def __init__(self, model: ODEResNet, adjoint: bool = True) -> None:
        super().__init__()
        if model.scheme != "euler":
            raise ValueError(f"TorchdiffeqResNet reproduces Euler steps only, but the model uses scheme={model.scheme!r}")
        self.field, self.adjoint = DepthVectorField(model), adjoint
        self.depth = model.depth

    def forward(self, x: Tensor) -> Tensor:
        try:
            from torchdiffeq import odeint, odeint_adjoint
        except ImportError as error:
            raise ImportError("TorchdiffeqResNet needs torchdiffeq: pip install torchdiffeq") from error
        span = torch.tensor([0.0, float(self.depth)], device=x.device, dtype=x.dtype)
        options = {"step_size": 1.0, "perturb": True}  # the adjoint's solver gets the same options
        if self.adjoint:
            return odeint_adjoint(self.field, x, span, method="euler", options=options, adjoint_params=tuple(self.field.parameters()))[-1]
        return odeint(self.field, x, span, method="euler", options=options)[-1]


def ode_classifier(
    in_features: int,
    classes: int,
    depth: int,
    *,
    hidden: int,
    memory_saving: bool = True,
    smooth: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> nn.Sequential:
    """The chapter's classifier: an :class:`ODEResNet` of ``depth`` tanh steps on the ``in_features`` input
    features (:func:`tanh_residuals` with ``hidden`` units), then a frozen random linear read-out, so that all
    learning happens in the ODE block. With ``smooth`` the weights are made smooth in depth
    (:func:`smooth_in_depth_` with ``generator``); otherwise every layer keeps PyTorch's independent
    initialisation. The read-out is created first, then the residual functions, both from the global
    random state.
    """
    readout = nn.Linear(in_features, classes).requires_grad_(False)
    ode = ODEResNet(*tanh_residuals(depth, in_features, hidden=hidden), memory_saving=memory_saving)
    if smooth:
        smooth_in_depth_(ode, generator=generator)
    return nn.Sequential(ode, readout).to(resolve_device(device))
