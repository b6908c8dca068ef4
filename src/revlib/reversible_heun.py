r"""The reversible Heun method: an ODE-ResNet with exact gradients in memory that does not grow with depth.

For the chapter "ResNets as Neural ODEs" (``chapters/04_neural_odes``), beside :mod:`revlib.adjoint`, whose
``ODEResNet`` rebuilds each step approximately (better with ``rebuild_iterations``):
:class:`ReversibleHeunResNet` rebuilds exactly.

**The scheme** (Kidger, Foster, Li and Lyons 2021; McCallum and Foster 2024). Two states :math:`(y_n, z_n)`,
step :math:`h = 1/N`, and :math:`N + 1` residual functions :math:`f_0, \dots, f_N` (function :math:`f_n` is
evaluated at layer :math:`n`, depth-time :math:`t_n = n/N`, the indexing of HeunNet in :mod:`revlib.adjoint`):

.. math::

    z_{n+1} &= 2 y_n - z_n + h\, f_n(z_n), \\
    y_{n+1} &= y_n + \tfrac h2 \big(f_n(z_n) + f_{n+1}(z_{n+1})\big), \qquad n = 0, \dots, N-1,

from :math:`y_0 = z_0 = x_0`; the network's output is :math:`y_N`. :math:`z` is an auxiliary state that
leap-frogs around :math:`y`; :math:`y` is updated by the trapezoidal (Heun) rule with the slopes taken at
:math:`z`. Each step evaluates one new function, :math:`f_{n+1}(z_{n+1})`, which the next step reuses as its
:math:`f_n(z_n)`: :math:`N + 1` evaluations in all, about the cost of Euler and half that of Heun.

**Exact reversal.** From :math:`(y_{n+1}, z_{n+1})` alone: the :math:`y`-update gives
:math:`2y_n = 2y_{n+1} - h f_n(z_n) - h f_{n+1}(z_{n+1})`; put it into the :math:`z`-update and
:math:`h f_n(z_n)` cancels,

.. math::

    z_n &= 2 y_{n+1} - z_{n+1} - h\, f_{n+1}(z_{n+1}), \\
    y_n &= y_{n+1} - \tfrac h2 \big(f_n(z_n) + f_{n+1}(z_{n+1})\big)
    \quad\text{(with } z_n \text{ from the line above).}

In exact arithmetic this undoes the step exactly, for any residual functions and any :math:`h`; in floating
point each reversed step adds a rounding error of order :math:`\epsilon\,(|y| + |z|)`. One evaluation per
reversed step again: :math:`f_n(z_n)` serves :math:`y_n` here and :math:`z_{n-1}` in the next reversed step.

**Backward pass.** :class:`ReversibleHeunResNet` keeps only :math:`(y_N, z_N)` (not :math:`f_N(z_N)`: the
backward pass evaluates :math:`f_N` at :math:`z_N` with its graph anyway, for its vector-Jacobian product,
and gets the value with it). Write :math:`F_n = f_n(z_n)`, :math:`J_n = \partial f_n/\partial z` at
:math:`z_n`, and :math:`\bar y_n, \bar z_n` for the gradients of the loss with respect to :math:`y_n, z_n`
through everything downstream. :math:`F_n` feeds :math:`z_{n+1}` (weight :math:`h`), :math:`y_{n+1}` and,
for :math:`n \ge 1`, :math:`y_n` (weight :math:`h/2` each); :math:`y_n` feeds :math:`z_{n+1}` (weight 2)
and :math:`y_{n+1}`; :math:`z_n` feeds :math:`z_{n+1}` (weight :math:`-1`) and :math:`F_n`. Hence, from
:math:`\bar y_N = \partial L/\partial y_N` and

.. math::

    \bar F_N = \tfrac h2\, \bar y_N, \qquad \bar z_N = \frac{\partial L}{\partial z_N} + J_N^\top \bar F_N,

one reversed step, for :math:`n = N-1, \dots, 0`, is

.. math::

    \bar y_n &= \bar y_{n+1} + 2\, \bar z_{n+1}, \\
    \bar F_n &= h\, \bar z_{n+1} + \tfrac h2\, \bar y_{n+1} + [n \ge 1]\, \tfrac h2\, \bar y_n
              \;\;(= h\, \bar y_n \text{ for } n \ge 1), \\
    \bar z_n &= -\bar z_{n+1} + J_n^\top \bar F_n, \qquad
    \bar\theta_n \mathrel{+}= \Big(\frac{\partial f_n}{\partial \theta_n}\Big)^{\!\top} \bar F_n ,

with :math:`\bar\theta_N = (\partial f_N/\partial\theta_N)^\top \bar F_N`, and the input's gradient is
:math:`\bar x_0 = \bar y_0 + \bar z_0`. :math:`\bar y_n` is complete before :math:`F_n` is touched, so
every step needs one evaluation of :math:`f_n` with its graph, at the rebuilt :math:`z_n`, and one
vector-Jacobian product: the backward pass costs one extra evaluation per layer, like a reversible
(RevNet) block, and its gradient is ordinary backprop's through the same computation, up to rounding.
Random, autocast and BatchNorm state are replayed through the mechanism shared with the other recomputing
networks (``revlib._recompute``).

**Stability.** For :math:`f(x) = -\lambda x` one step multiplies :math:`(y, z)` by

.. math::

    R = \begin{pmatrix} 1 - h\lambda & \tfrac12 (h\lambda)^2 \\ 2 & -(1 + h\lambda) \end{pmatrix},
    \qquad \operatorname{tr} R = -2h\lambda, \quad \det R = -1,

with eigenvalues :math:`\nu = -h\lambda \pm \sqrt{1 + (h\lambda)^2}`: the solution's root
:math:`\approx e^{-h\lambda}` and a parasitic one :math:`\approx -e^{h\lambda}`. Both have modulus 1 only for
:math:`h\lambda` on the imaginary segment :math:`[-i, i]`; for a contracting field (:math:`\lambda > 0`) the
parasitic mode grows like :math:`e^{\lambda t}` in the forward pass, and the reversal — any exact
reversal — expands the solution's mode by :math:`e^{\lambda t}`, amplifying rounding errors alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from revlib._recompute import ForwardState, accumulate, check_parameters_unchanged, distinct_parameters
from revlib.adjoint import ODEResNet, _reverse_step, _stages
from revlib.adjoint import _step as _ode_step

__all__ = ["DampedResidual", "EulerRebuildBound", "ReversibleHeunResNet", "euler_rebuild_bound", "lipschitz_upper_bound", "trajectories"]


def _residual(f: nn.Module, z: Tensor, index: int) -> Tensor:
    """:math:`f_n(z)`, refusing a function that does not preserve the shape of its input."""
    out = f(z)
    if not isinstance(out, Tensor) or out.shape != z.shape:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"residual function {index} must preserve the shape of its input: it maps an input of shape "
            f"{tuple(z.shape)} to an output of shape {shape}"
        )
    return out


def _step(y: Tensor, z: Tensor, velocity: Tensor, f_next: nn.Module, index: int, h: float) -> tuple[Tensor, Tensor, Tensor]:
    """One step forward: :math:`(y_{n+1}, z_{n+1}, f_{n+1}(z_{n+1}))` from :math:`(y_n, z_n, f_n(z_n))`.

    ``index`` is :math:`n + 1`, the index of ``f_next``. The one helper both forward paths use, so that they
    compute the same floating-point operations in the same order.
    """
    z_next = 2 * y - z + h * velocity  # z_{n+1} = 2 y_n − z_n + h f_n(z_n)
    velocity_next = _residual(f_next, z_next, index)  # f_{n+1}(z_{n+1}), reused by the next step
    y_next = y + (h / 2) * (velocity + velocity_next)  # y_{n+1} = y_n + h/2 (f_n(z_n) + f_{n+1}(z_{n+1}))
    return y_next, z_next, velocity_next


def _unstep_z(y_next: Tensor, z_next: Tensor, velocity_next: Tensor, h: float) -> Tensor:
    """:math:`z_n = 2 y_{n+1} - z_{n+1} - h f_{n+1}(z_{n+1})`."""
    return 2 * y_next - z_next - h * velocity_next


def _unstep_y(y_next: Tensor, velocity: Tensor, velocity_next: Tensor, h: float) -> Tensor:
    """:math:`y_n = y_{n+1} - \\tfrac h2 (f_n(z_n) + f_{n+1}(z_{n+1}))`."""
    return y_next - (h / 2) * (velocity + velocity_next)


class _ReversibleHeunFunction(torch.autograd.Function):
    """Run the reversible Heun steps keeping only (y_N, z_N); rebuild and back-propagate step by step."""

    @staticmethod
    def forward(ctx: Any, y: Tensor, z: Tensor, network: ReversibleHeunResNet, *parameters: Tensor) -> tuple[Tensor, Tensor]:
        ctx.network = network  # the modules (not tensors): needed to recompute the residual functions
        ctx.states = []  # per residual function, its random, autocast and buffer states: a few KiB, no activations
        residuals = network.residuals
        h = 1.0 / network.depth
        with torch.no_grad():
            state = ForwardState.capture(y.device, network.preserve_rng_state)
            with state.recording(residuals[0]):
                velocity = _residual(residuals[0], z, 0)  # F_0 = f_0(z_0)
            ctx.states.append(state)
            for index in range(1, len(residuals)):
                state = ForwardState.capture(y.device, network.preserve_rng_state, previous=state)
                with state.recording(residuals[index]):
                    y, z, velocity = _step(y, z, velocity, residuals[index], index, h)
                ctx.states.append(state)
            state.finish()
        # y_N and z_N are all that is kept (f_N(z_N) is not: backward evaluates f_N at z_N with its graph anyway);
        # the parameters are saved so that autograd's version check catches an in-place change before backward
        ctx.save_for_backward(y, z, *parameters)
        return y, z

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: Tensor, grad_z: Tensor) -> tuple[Tensor | None, ...]:
        y, z, *parameters = ctx.saved_tensors
        network = ctx.network
        residuals = network.residuals
        check_parameters_unchanged(tuple(parameters), distinct_parameters(list(residuals)), "ReversibleHeunResNet")
        h = 1.0 / network.depth
        last = len(residuals) - 1  # N
        parameter_gradients: dict[int, Tensor] = {}  # by id, summed: a residual function may appear twice

        def through(index: int, point: Tensor, grad_velocity: Tensor) -> tuple[Tensor, Tensor]:
            """F_n = f_n(z_n) replayed at the rebuilt z_n, and J_nᵀ F̄_n; adds (∂f_n/∂θ_n)ᵀ F̄_n to the parameters'."""
            state = ctx.states[index]
            point = point.detach().requires_grad_(True)
            # F_n, with its graph, and its VJPs
            velocity, grad_point, found = state.pull_back(lambda z: _residual(residuals[index], z, index), point, grad_velocity)
            accumulate(parameter_gradients, state.parameters, found)
            return velocity.detach(), grad_point

        grad_velocity = (h / 2) * grad_y  # F̄_N = h/2 ȳ_N: F_N feeds y_N only
        velocity, grad_from_velocity = through(last, z, grad_velocity)  # F_N = f_N(z_N); J_Nᵀ F̄_N
        grad_z = grad_z + grad_from_velocity  # z̄_N = ∂L/∂z_N + J_Nᵀ F̄_N
        for index in range(last - 1, -1, -1):  # n = N−1, …, 0; (y, z, velocity) hold (y_{n+1}, z_{n+1}, F_{n+1})
            with torch.no_grad():
                z_previous = _unstep_z(y, z, velocity, h)  # z_n = 2 y_{n+1} − z_{n+1} − h F_{n+1}
            grad_y_previous = grad_y + 2 * grad_z  # ȳ_n = ȳ_{n+1} + 2 z̄_{n+1}: y_n feeds y_{n+1} and z_{n+1}
            grad_velocity = h * grad_z + (h / 2) * grad_y  # F̄_n from z_{n+1} (weight h) and y_{n+1} (weight h/2) …
            if index > 0:
                grad_velocity = grad_velocity + (h / 2) * grad_y_previous  # … and from y_n (weight h/2) unless y_0 is an input
            velocity_previous, grad_from_velocity = through(index, z_previous, grad_velocity)  # F_n = f_n(z_n); J_nᵀ F̄_n
            grad_z = -grad_z + grad_from_velocity  # z̄_n = −z̄_{n+1} + J_nᵀ F̄_n: z_n feeds z_{n+1} and F_n
            grad_y = grad_y_previous
            with torch.no_grad():
                y = _unstep_y(y, velocity_previous, velocity, h)  # y_n = y_{n+1} − h/2 (F_n + F_{n+1})
            z, velocity = z_previous, velocity_previous
        return (
            grad_y if ctx.needs_input_grad[0] else None,  # y_0
            grad_z if ctx.needs_input_grad[1] else None,  # z_0
            None,  # network
            *(parameter_gradients.get(id(p)) for p in parameters),  # every parameter, in the order given
        )


class ReversibleHeunResNet(nn.Module):
    r"""An ODE-ResNet integrated by the reversible Heun method, with exact gradients in memory flat in depth.

    .. math::

        z_{n+1} = 2 y_n - z_n + h f_n(z_n), \qquad
        y_{n+1} = y_n + \tfrac h2 \big(f_n(z_n) + f_{n+1}(z_{n+1})\big), \qquad h = 1/N,

    from :math:`y_0 = z_0 = x` to the output :math:`y_N`, with :math:`N + 1` residual functions for
    :math:`N` steps (see :mod:`revlib.reversible_heun` for the reversal and the backward recursion). With
    gradients enabled and ``memory_saving=True`` the forward pass keeps only :math:`(y_N, z_N)`, and the
    backward pass rebuilds :math:`(y_n, z_n)` step by step through the exact inverse and back-propagates
    through one evaluation of :math:`f_n` at a time: its gradients equal ordinary backprop's through the same
    network to rounding (unlike :class:`revlib.adjoint.ODEResNet`'s adjoint, which is approximate), at one
    extra evaluation of each function. ``memory_saving=False`` runs the same steps with ordinary autograd.

    Like the other recomputing networks it replays each function's random state (dropout draws its forward
    masks again), re-enters its autocast state and leaves BatchNorm's running statistics as the forward pass
    updated them (once); it saves the parameters for backward (an in-place change to one fails with
    autograd's error; a replaced one with a clear error). It is ``once_differentiable``. Tensors a residual
    function captures by closure rather than holds as a parameter or buffer receive no gradient.

    Its stability region is small (see the module documentation): on a strongly contracting field the
    parasitic mode grows in the forward pass and the reversal amplifies rounding errors roughly like
    :math:`e^{2c}`, :math:`c` the field's total contraction. With :math:`f_n(x) = -16x` and :math:`N = 64` the
    float64 rebuild of :math:`x_0` keeps only five digits and the float32 gradient is useless (relative error
    :math:`10^4`), where ordinary float32 backprop is accurate to :math:`10^{-5}`; on tanh residual functions
    of ordinary size the rebuilt gradient is as accurate as backprop's.

    Args:
        *residuals: the functions :math:`f_0, \dots, f_N`, at least two shape-preserving ``nn.Module`` objects.
        memory_saving: rebuild the states in the backward pass instead of storing them.
        preserve_rng_state: replay each function's random state in the recomputation (needed for dropout).

    Raises:
        TypeError: a residual function is not an ``nn.Module`` (or a list is passed instead of the functions).
        ValueError: fewer than two residual functions. A residual function that changes the shape of its
            input raises a ``ValueError`` naming its index and both shapes when the network runs.
    """

    def __init__(self, *residuals: nn.Module, memory_saving: bool = True, preserve_rng_state: bool = True) -> None:
        super().__init__()
        if len(residuals) == 1 and isinstance(residuals[0], (list, tuple)):
            raise TypeError("pass the residual functions one by one: ReversibleHeunResNet(*functions)")
        if len(residuals) < 2:
            raise ValueError(f"the reversible Heun method needs N + 1 residual functions for N steps: at least 2, got {len(residuals)}")
        for index, f in enumerate(residuals):
            if not isinstance(f, nn.Module):
                raise TypeError(f"residual function {index} must be an nn.Module, got {type(f).__name__}")
        self.residuals = nn.ModuleList(residuals)
        self.memory_saving = memory_saving
        self.preserve_rng_state = preserve_rng_state

    @property
    def depth(self) -> int:
        """The number of steps :math:`N`, one fewer than the residual functions."""
        return len(self.residuals) - 1

    def forward(self, x: Tensor) -> Tensor:
        """:math:`y_N` from :math:`y_0 = z_0 = x`."""
        return self.run(x)[0]

    def run(self, y: Tensor, z: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Both final states :math:`(y_N, z_N)` from :math:`(y_0, z_0)`; ``z=None`` starts from :math:`z_0 = y_0`.

        Raises:
            ValueError: ``z`` has another shape than ``y``, or a residual function changes the shape of its input.
        """
        z = y if z is None else z
        if z.shape != y.shape:
            raise ValueError(f"z must have the shape of y, {tuple(y.shape)}, got {tuple(z.shape)}")
        parameters = distinct_parameters(list(self.residuals))
        needs_graph = torch.is_grad_enabled() and (y.requires_grad or z.requires_grad or any(p.requires_grad for p in parameters))
        if self.memory_saving and needs_graph:
            return _ReversibleHeunFunction.apply(y, z, self, *parameters)
        h = 1.0 / self.depth
        velocity = _residual(self.residuals[0], z, 0)  # F_0 = f_0(z_0)
        for index in range(1, len(self.residuals)):
            y, z, velocity = _step(y, z, velocity, self.residuals[index], index, h)
        return y, z

    @torch.no_grad()
    def inverse(self, y: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        r""":math:`(y_0, z_0)` rebuilt from :math:`(y_N, z_N)`, as the backward pass rebuilds them: exact up to rounding.

        Residual functions with BatchNorm should be in eval mode, so that the inverse evaluates the same
        functions as the forward pass; random ones (dropout) draw other masks here than in forward.

        Raises:
            ValueError: ``z`` has another shape than ``y``.
        """
        if z.shape != y.shape:
            raise ValueError(f"z must have the shape of y, {tuple(y.shape)}, got {tuple(z.shape)}")
        h = 1.0 / self.depth
        last = len(self.residuals) - 1
        velocity = _residual(self.residuals[last], z, last)  # F_N = f_N(z_N)
        for index in range(last - 1, -1, -1):
            z_previous = _unstep_z(y, z, velocity, h)  # z_n = 2 y_{n+1} − z_{n+1} − h F_{n+1}
            velocity_previous = _residual(self.residuals[index], z_previous, index)  # F_n = f_n(z_n)
            y = _unstep_y(y, velocity_previous, velocity, h)  # y_n = y_{n+1} − h/2 (F_n + F_{n+1})
            z, velocity = z_previous, velocity_previous
        return y, z

    def extra_repr(self) -> str:
        return f"depth={self.depth}, memory_saving={self.memory_saving}"


# --------------------------------------------------------------- the chapter's tools for looking at a rebuild


class DampedResidual(nn.Module):
    r"""A residual function with a linear term subtracted, :math:`x \mapsto f(x) - \lambda x` or :math:`f(x) - Mx`.

    With a number :math:`\lambda > 0` the field pulls every state towards where :math:`f(x) = \lambda x`: the
    forward pass contracts, by about :math:`e^{-\lambda}` over :math:`t \in [0, 1]`, and any backward rebuild
    expands errors by about :math:`e^{\lambda}` (the chapter's unstable backsolves). A skew-symmetric matrix
    :math:`M = -M^\top` adds a rotation, which neither contracts nor expands; :math:`M = \lambda I + S`, with
    :math:`S` skew, spirals inwards. ``rate`` is a constant, not a parameter.

    Args:
        function: :math:`f`, a shape-preserving ``nn.Module`` of ``(..., d)`` inputs.
        rate: :math:`\lambda`, a finite number (negative values expand), or a finite ``(d, d)`` matrix :math:`M`.

    Raises:
        TypeError: ``function`` is not an ``nn.Module``.
        ValueError: ``rate`` is not a finite number or a finite square matrix.
    """

    def __init__(self, function: nn.Module, rate: float | Tensor) -> None:
        super().__init__()
        if not isinstance(function, nn.Module):
            raise TypeError(f"function must be an nn.Module, got {type(function).__name__}")
        self.function = function
        self.rate: float | None = None
        self.matrix: Tensor | None
        if isinstance(rate, Tensor):
            if rate.dim() != 2 or rate.shape[0] != rate.shape[1] or not torch.isfinite(rate).all():
                raise ValueError(f"rate must be a finite square matrix, got a tensor of shape {tuple(rate.shape)}")
            self.register_buffer("matrix", rate.detach().clone())
            return
        self.register_buffer("matrix", None)
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate):
            raise ValueError(f"rate must be a finite number or a square matrix, got {rate!r}")
        else:
            self.rate = float(rate)

    def forward(self, x: Tensor) -> Tensor:
        if self.matrix is not None:
            return self.function(x) - x @ self.matrix.T  # f(x) − M x, rows of x transformed
        return self.function(x) - self.rate * x  # f(x) − λ x

    def linear_norm(self) -> float:
        r""":math:`|\lambda|` or :math:`\lVert M\rVert_2`, the Lipschitz constant of the subtracted term."""
        if self.matrix is not None:
            return torch.linalg.matrix_norm(self.matrix.double(), 2).item()
        assert self.rate is not None
        return abs(self.rate)

    def extra_repr(self) -> str:
        return f"rate={self.rate}" if self.matrix is None else f"matrix of shape {tuple(self.matrix.shape)}"


_ONE_LIPSCHITZ = (nn.Tanh, nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Sigmoid, nn.GELU, nn.SiLU)


def lipschitz_upper_bound(function: nn.Module) -> float:
    r"""An upper bound on the Lipschitz constant of a residual function in the Euclidean norm.

    For a chain of ``nn.Linear`` layers and activations of slope at most one (tanh, ReLU; sigmoid's is
    1/4 and GELU's and SiLU's about 1.1, so those count as 1 only approximately — see below),
    :math:`\operatorname{Lip}(W_2\,\sigma(W_1 x + b_1) + b_2) \le \lVert W_2\rVert_2\, \lVert W_1\rVert_2`,
    the product of the layers' largest singular values; for :class:`DampedResidual`,
    :math:`\operatorname{Lip}(f) + |\lambda|` (or :math:`+ \lVert M\rVert_2`). The bound is attained only when the largest singular
    directions line up and the activations are at their steepest; the largest Jacobian norm over the data
    is often well below it. GELU and SiLU have slopes up to about 1.1 and are not accepted.

    Args:
        function: an ``nn.Linear``, one of ``nn.Tanh``, ``nn.ReLU``, ``nn.LeakyReLU`` (slope at most 1),
            ``nn.Identity``, ``nn.Sigmoid``, an ``nn.Sequential`` of these, or a :class:`DampedResidual`.

    Raises:
        TypeError: another kind of module, whose Lipschitz constant this function cannot bound.
    """
    if isinstance(function, DampedResidual):
        return lipschitz_upper_bound(function.function) + function.linear_norm()
    if isinstance(function, nn.Sequential):
        return math.prod(lipschitz_upper_bound(layer) for layer in function)
    if isinstance(function, nn.Linear):
        return torch.linalg.matrix_norm(function.weight.detach().double(), 2).item()  # largest singular value
    if isinstance(function, nn.LeakyReLU) and abs(function.negative_slope) > 1:
        raise TypeError(f"a LeakyReLU with slope {function.negative_slope} is not 1-Lipschitz")
    if isinstance(function, (nn.Tanh, nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Sigmoid)):
        return 1.0
    raise TypeError(
        "lipschitz_upper_bound handles nn.Linear, tanh/ReLU/LeakyReLU/sigmoid/identity activations, nn.Sequential "
        f"chains of them and DampedResidual, got {type(function).__name__}"
    )


@torch.no_grad()
def trajectories(model: ODEResNet | ReversibleHeunResNet, x: Tensor) -> tuple[Tensor, Tensor]:
    r"""The forward states :math:`x_0, \dots, x_N` and the states a memory-saving backward pass rebuilds.

    For an :class:`revlib.adjoint.ODEResNet` the rebuilt states are :math:`\tilde x_N = x_N` and
    :math:`\tilde x_n` = the scheme's reversed step (with the model's ``rebuild_iterations``) from
    :math:`\tilde x_{n+1}`, exactly as its adjoint backward pass computes them; for a
    :class:`ReversibleHeunResNet` they are the :math:`y_n` of its exact reversal from :math:`(y_N, z_N)`,
    and the forward states are its :math:`y_n`. Random residual functions (dropout) draw other masks here
    than in a training step; BatchNorm should be in eval mode.

    Args:
        model: the network.
        x: ``(..., d)`` inputs.

    Returns:
        ``(forward, rebuilt)``, each ``(N + 1, ...)``: index :math:`n` holds the state after :math:`n` steps.

    Raises:
        TypeError: ``model`` is neither an ``ODEResNet`` nor a ``ReversibleHeunResNet``.
    """
    if isinstance(model, ReversibleHeunResNet):
        h = 1.0 / model.depth
        residuals = model.residuals
        y, z = x, x
        velocity = _residual(residuals[0], z, 0)
        forward = [y]
        for index in range(1, len(residuals)):
            y, z, velocity = _step(y, z, velocity, residuals[index], index, h)
            forward.append(y)
        velocity = _residual(residuals[-1], z, len(residuals) - 1)  # F_N = f_N(z_N)
        rebuilt = [y]
        for index in range(len(residuals) - 2, -1, -1):
            z_previous = _unstep_z(y, z, velocity, h)  # z_n = 2 y_{n+1} − z_{n+1} − h F_{n+1}
            velocity_previous = _residual(residuals[index], z_previous, index)  # F_n = f_n(z_n)
            y = _unstep_y(y, velocity_previous, velocity, h)  # y_n = y_{n+1} − h/2 (F_n + F_{n+1})
            z, velocity = z_previous, velocity_previous
            rebuilt.append(y)
        return torch.stack(forward), torch.stack(rebuilt[::-1])
    if not isinstance(model, ODEResNet):
        raise TypeError(f"model must be an ODEResNet or a ReversibleHeunResNet, got {type(model).__name__}")
    stages = _stages(model.residuals, model.scheme)
    h = 1.0 / len(stages)
    forward = [x]
    for stage in stages:
        forward.append(_ode_step(stage, forward[-1], h, model.scheme))
    rebuilt = [forward[-1]]
    for stage in reversed(stages):
        rebuilt.append(_reverse_step(stage, rebuilt[-1], h, model.scheme, iterations=model.rebuild_iterations))
    return torch.stack(forward), torch.stack(rebuilt[::-1])


@dataclass(frozen=True)
class EulerRebuildBound:
    r"""The Euler adjoint's rebuild error and its discrete Grönwall bound, per sample (:func:`euler_rebuild_bound`).

    Attributes:
        error: ``(B,)`` :math:`\lVert \tilde x_0 - x_0\rVert`, the rebuilt input's distance from the true one.
        local_errors: ``(B,)`` :math:`\sum_n \lVert\tau_n\rVert`, the reversed steps' own errors,
            :math:`\tau_n = x_{n+1} - h f_n(x_{n+1}) - x_n`.
        amplification: :math:`\exp(h \sum_n L_n)`, the bound on how much the rebuild can amplify them
            (:math:`L_n` = :func:`lipschitz_upper_bound` of :math:`f_n`), the same for every sample.
        bound: ``(B,)`` ``amplification * local_errors``, which ``error`` cannot exceed.
    """

    error: Tensor
    local_errors: Tensor
    amplification: float
    bound: Tensor


@torch.no_grad()
def euler_rebuild_bound(model: ODEResNet, x: Tensor) -> EulerRebuildBound:
    r"""How far the Euler adjoint's rebuilt input lands from the true one, and the bound that limits it.

    The reversed step :math:`\tilde x_n = \tilde x_{n+1} - h f_n(\tilde x_{n+1})` applied to the *true*
    :math:`x_{n+1}` misses :math:`x_n` by the local error :math:`\tau_n = x_{n+1} - h f_n(x_{n+1}) - x_n`.
    The rebuild error :math:`e_n = \tilde x_n - x_n` therefore obeys

    .. math::

        e_n = e_{n+1} - h\big(f_n(\tilde x_{n+1}) - f_n(x_{n+1})\big) + \tau_n, \qquad
        \lVert e_n\rVert \le (1 + hL_n)\lVert e_{n+1}\rVert + \lVert\tau_n\rVert, \qquad e_N = 0,

    and unrolling it (:math:`1 + u \le e^u`, the discrete Grönwall inequality)

    .. math::

        \lVert e_0\rVert \le \sum_{n=0}^{N-1} \prod_{m<n} (1 + hL_m)\,\lVert\tau_n\rVert
        \le \exp\Big(h\sum_{m=0}^{N-1} L_m\Big) \sum_{n=0}^{N-1} \lVert\tau_n\rVert,

    the discrete form of :math:`\exp(\int_0^1 \operatorname{Lip} f(\cdot, s)\, ds)`.

    Args:
        model: an Euler ``ODEResNet`` (``rebuild_iterations=1``) whose residual functions
            :func:`lipschitz_upper_bound` can bound.
        x: ``(B, d)`` inputs.

    Raises:
        ValueError: another scheme, more rebuild iterations, or ``x`` not two-dimensional.
        TypeError: ``model`` is not an ``ODEResNet``, or a residual function that cannot be bounded.
    """
    if not isinstance(model, ODEResNet):
        raise TypeError(f"model must be an ODEResNet, got {type(model).__name__}")
    if model.scheme != "euler" or model.rebuild_iterations != 1:
        raise ValueError(f"the bound is for the plain Euler rebuild, got scheme={model.scheme!r}, "
                         f"rebuild_iterations={model.rebuild_iterations}")
    if x.dim() != 2:
        raise ValueError(f"x must be (batch, features), got shape {tuple(x.shape)}")
    forward, rebuilt = trajectories(model, x)  # (N + 1, B, d) each
    h = 1.0 / model.depth
    local = sum((forward[n + 1] - h * f(forward[n + 1]) - forward[n]).norm(dim=-1) for n, f in enumerate(model.residuals))
    amplification = math.exp(h * sum(lipschitz_upper_bound(f) for f in model.residuals))
    assert isinstance(local, Tensor)
    return EulerRebuildBound((rebuilt[0] - forward[0]).norm(dim=-1), local, amplification, amplification * local)
