r"""Linear backprop: the chapter "Linear backprop".

Ordinary backpropagation multiplies the error by the activation's derivative at every layer,

.. math::

    \delta_{l} = \big(\delta_{l+1} W_{l+1}\big) \odot \sigma'(z_{l}),

while linear backprop (Yazdani 2018) keeps the non-linear forward pass and drops the derivative,

.. math::

    \delta_{l} = \delta_{l+1} W_{l+1},

as if every activation were the identity on the way back. Weight gradients keep their form
:math:`\delta_l^\top h_{l-1}`, with the true (non-linear) activations :math:`h_{l-1}`. The error signal
never vanishes through saturated units and :math:`\sigma'` is never computed. For a hard threshold such as
:math:`\operatorname{sign}`, whose derivative is zero almost everywhere, this is the straight-through
estimator of Bengio et al. (2013).

:class:`LinearBackprop` wraps one activation; :func:`convert_to_linear_backprop` wraps every activation of
a model; :func:`sign_ste` is the sign activation of binary networks with a (clipped) straight-through
backward pass, and :func:`binary_network` a network of such units. :func:`linear_backprop_cosines` compares
the two rules' weight gradients layer by layer on the hand-written MLP of :mod:`revlib.backprop`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from revlib.backprop import MLP, LossName, loss_and_gradient
from revlib.runtime import resolve_device
from revlib.verify import cosine_similarity

__all__ = [
    "ELEMENTWISE_ACTIVATIONS",
    "LinearBackprop",
    "SignSTE",
    "binary_network",
    "convert_to_linear_backprop",
    "linear_backprop_cosines",
    "sign_ste",
]

ELEMENTWISE_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Hardtanh, nn.Softsign,
)
"""The activation modules :func:`convert_to_linear_backprop` replaces by default."""


def _elementwise(activation: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    y = activation(x)
    if not isinstance(y, Tensor) or y.shape != x.shape:
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"linear backprop needs an elementwise activation, but it mapped shape {tuple(x.shape)} to {shape}")
    return y


class _IdentityBackward(torch.autograd.Function):
    """``activation(x)`` forwards, the identity backwards: ∂L/∂x = ∂L/∂y."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, activation: Callable[[Tensor], Tensor]) -> Tensor:
        version = x._version
        y = _elementwise(activation, x)  # nothing is saved for backward: σ' is never needed
        if x._version != version:  # an in-place activation (nn.ReLU(inplace=True)) wrote into x: tell autograd
            if y is not x:
                raise ValueError("an in-place activation must return the tensor it modified")
            ctx.mark_dirty(x)
        return y

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None]:
        return (
            grad_output,  # x: δ passes through unchanged, no ⊙ σ'(z)
            None,  # activation
        )


class LinearBackprop(nn.Module):
    r"""An elementwise activation with an identity backward pass: :math:`y = \sigma(x)`, :math:`\bar x = \bar y`.

    Args:
        activation: an elementwise ``nn.Module`` without trainable parameters (``nn.ReLU()``,
            ``nn.Sigmoid()``, …) or a function (``torch.tanh``, ``torch.sign``, …).

    Raises:
        TypeError: ``activation`` is not callable.
        ValueError: it has trainable parameters (their gradients would be lost), or, when called, it
            changes the shape of its input.
    """

    def __init__(self, activation: nn.Module | Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        if not callable(activation):
            raise TypeError(f"activation must be an nn.Module or a function, got {type(activation).__name__}")
        if isinstance(activation, nn.Module) and any(p.requires_grad for p in activation.parameters()):
            raise ValueError(
                f"activation {type(activation).__name__} has trainable parameters, which linear backprop would never update"
            )
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled() or not x.requires_grad:
            return _elementwise(self.activation, x)
        return _IdentityBackward.apply(x, self.activation)

    def extra_repr(self) -> str:
        return "" if isinstance(self.activation, nn.Module) else getattr(self.activation, "__name__", repr(self.activation))


def convert_to_linear_backprop(
    model: nn.Module, *, activations: tuple[type[nn.Module], ...] = ELEMENTWISE_ACTIVATIONS, inplace: bool = False
) -> nn.Module:
    """Wrap every activation module of ``model``, at any depth of nesting, in :class:`LinearBackprop`.

    Only submodules are found: activations called as functions inside a ``forward`` (``torch.relu(x)``)
    are invisible to the conversion and keep their ordinary backward pass. Activations already wrapped
    are left alone, so converting twice changes nothing.

    Args:
        model: the network.
        activations: the module types to wrap.
        inplace: convert ``model`` itself; otherwise (default) convert and return a deep copy, leaving
            ``model`` unchanged. The copy has its own parameters.

    Returns:
        The converted model (``model`` itself when ``inplace``). A model that is itself an activation
        comes back wrapped.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``activations`` holds something other than module types.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not all(isinstance(kind, type) and issubclass(kind, nn.Module) for kind in activations):
        raise TypeError("activations must be a tuple of nn.Module subclasses, e.g. (nn.ReLU, nn.Tanh)")
    model = model if inplace else copy.deepcopy(model)
    if isinstance(model, activations):
        return LinearBackprop(model)
    _convert_children(model, activations)
    return model


def _convert_children(module: nn.Module, activations: tuple[type[nn.Module], ...]) -> None:
    for name, child in module.named_children():
        if isinstance(child, LinearBackprop):
            continue
        if isinstance(child, activations):
            setattr(module, name, LinearBackprop(child))
        else:
            _convert_children(child, activations)


class _SignStraightThrough(torch.autograd.Function):
    """sign(x) forwards; ∂L/∂x = ∂L/∂y · 1[|x| ≤ clip] backwards (no clipping when clip is None)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, clip: float | None) -> Tensor:
        ctx.clip = clip  # a number, not a tensor
        if clip is not None:
            ctx.save_for_backward(x)
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None]:
        if ctx.clip is None:
            return grad_output, None  # x: the identity, i.e. linear backprop through sign
        (x,) = ctx.saved_tensors
        return (
            grad_output * (x.abs() <= ctx.clip).to(grad_output.dtype),  # x: the derivative of hardtanh
            None,  # clip
        )


def sign_ste(x: Tensor, clip: float | None = 1.0) -> Tensor:
    r"""The binary activation :math:`\operatorname{sign}(x) \in \{-1, +1\}` (with :math:`\operatorname{sign}(0) = +1`)
    and a straight-through gradient.

    The true derivative is zero almost everywhere, so nothing would be learnt through it. The
    straight-through estimator (Bengio et al. 2013) back-propagates as if the forward pass had been
    the identity, :math:`\bar x = \bar y` (``clip=None``: linear backprop of the sign); the clipped variant
    used by binarised networks back-propagates as if it had been :math:`\operatorname{hardtanh}`,
    :math:`\bar x = \bar y \cdot \mathbb 1[|x| \le c]`, which stops the updates of units far in saturation.

    Raises:
        ValueError: ``clip`` is not positive.
    """
    _check_clip(clip)
    return _SignStraightThrough.apply(x, clip)


def _check_clip(clip: float | None) -> None:
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be positive or None, got {clip}")


class SignSTE(nn.Module):
    """:func:`sign_ste` as a module, for ``nn.Sequential`` models.

    Args:
        clip: the clipping threshold :math:`c`, or ``None`` for the unclipped (identity) estimator.
    """

    def __init__(self, clip: float | None = 1.0) -> None:
        super().__init__()
        _check_clip(clip)
        self.clip = clip

    def forward(self, x: Tensor) -> Tensor:
        return sign_ste(x, self.clip)

    def extra_repr(self) -> str:
        return f"clip={self.clip}"


def binary_network(
    in_features: int, width: int, classes: int, *, clip: float | None = 1.0, device: torch.device | str | None = None
) -> nn.Sequential:
    """Two hidden layers of sign units (:class:`SignSTE`), each after a linear map and BatchNorm, and a
    linear output: ``Linear → BatchNorm → sign → Linear → BatchNorm → sign → Linear``, on ``device``
    (``None``: :func:`revlib.runtime.default_device`).

    Raises:
        ValueError: ``clip`` is not positive.
    """
    return nn.Sequential(
        nn.Linear(in_features, width), nn.BatchNorm1d(width), SignSTE(clip),
        nn.Linear(width, width), nn.BatchNorm1d(width), SignSTE(clip), nn.Linear(width, classes),
    ).to(resolve_device(device))


def linear_backprop_cosines(network: MLP, inputs: Tensor, targets: Tensor, loss: LossName = "cross_entropy") -> list[float]:
    r"""How well linear backprop points downhill, layer by layer: for every :math:`l`, the cosine between its
    :math:`\partial J/\partial W_l` and backprop's, both at ``network``'s current weights on one batch.

    The two rules share :math:`\delta_L`, so the last layer's cosine is 1. Below it they differ by the
    factors :math:`\sigma'(z)`; for the layer just below the output and a single example the cosine is
    non-negative when :math:`\sigma' \ge 0` (the chapter's Exercise 2), but over a batch, or further down,
    nothing bounds it. Whichever rule ``network`` trains with, both gradients are computed here.
    """
    outputs, cache = network.forward(inputs)
    _, output_gradient = loss_and_gradient(outputs, targets, loss)
    by_rule = {}
    for linear in (True, False):
        view = copy.copy(network)  # the same weight tensors, the other rule
        view.linear_backprop = linear
        by_rule[linear] = view.backward(cache, output_gradient).weights
    return [cosine_similarity(approximate, exact) for approximate, exact in zip(by_rule[True], by_rule[False])]
