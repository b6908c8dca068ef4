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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from revlib.backprop import MLP, LossName, loss_and_gradient
from revlib.runtime import resolve_device
from revlib.verify import cosine_similarity

__all__ = [
    "ELEMENTWISE_ACTIVATIONS",
    "FullBatchRun",
    "LinearBackprop",
    "SignSTE",
    "UpdateRule",
    "binary_network",
    "convert_to_linear_backprop",
    "linear_backprop_cosines",
    "sign_ste",
    "train_full_batch",
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


UpdateRule = Literal["backprop", "linear", "rescaled"]
"""What :func:`train_full_batch` steps along: the gradient, linear backprop's update, or the gradient with
each layer rescaled to the length of linear backprop's update."""


@dataclass
class FullBatchRun:
    r"""The record of :func:`train_full_batch` for :math:`K` networks trained side by side.

    Attributes:
        loss: ``(steps + 1, K)``, the squared loss :math:`L` of every network before each step and after the last.
        descent: ``(steps, K)``, the cosine between each step's update direction :math:`u` (before the
            optimizer's rescaling) and the true gradient :math:`g` over all parameters at once,
            :math:`\langle u, g\rangle / (\lVert u\rVert \lVert g\rVert)`; positive means the update descends for
            small enough steps.
        layer_cosine: ``(steps, K, L)``, per layer the cosine between linear backprop's weight update
            :math:`\tilde G_l` and the gradient :math:`G_l` (what :func:`linear_backprop_cosines` computes), at the
            weights before each step, whichever ``update`` trains.
        scale: ``(steps, K, L)``, per layer :math:`\lVert \tilde G_l\rVert / \lVert G_l\rVert`, the length of linear
            backprop's update of layer :math:`l` (weights and bias together) over the gradient's.
    """

    loss: Tensor
    descent: Tensor
    layer_cosine: Tensor
    scale: Tensor

    def steps_to_fit(self, threshold: float) -> Tensor:
        """``(K,)``, for every network the first step count after which its loss is below ``threshold``
        (0: already at the start), ``inf`` where it never gets there.

        Raises:
            ValueError: ``threshold`` is not positive.
        """
        if not threshold > 0:
            raise ValueError(f"threshold must be positive, got {threshold}")
        below = self.loss < threshold
        first = below.int().argmax(dim=0).double()
        return torch.where(below.any(dim=0), first, torch.inf)


def _stacked_backward(
    weights: list[Tensor], cache: list[Tensor], delta: Tensor, derivative: Callable[[Tensor], Tensor] | None
) -> list[Tensor]:
    """Weight and bias gradients ``[W_1, b_1, ...]`` of K stacked networks, (K, ...) each; no σ' when derivative is None."""
    gradients: list[Tensor] = [torch.empty(0)] * (2 * len(weights))
    for layer in reversed(range(len(weights))):
        gradients[2 * layer] = delta.transpose(1, 2) @ cache[layer]  # δ_lᵀ h_{l-1}, (K, n_l, n_{l-1})
        gradients[2 * layer + 1] = delta.sum(dim=1)  # 1ᵀ δ_l, (K, n_l)
        if layer > 0:
            delta = delta @ weights[layer]  # δ_l W_l, (K, B, n_{l-1})
            if derivative is not None:
                delta = delta * derivative(cache[layer])  # ⊙ σ'(z_{l-1})
    return gradients


def train_full_batch(
    networks: Sequence[MLP],
    inputs: Tensor,
    targets: Tensor,
    steps: int,
    *,
    update: UpdateRule,
    learning_rate: float,
    optimizer: Literal["gd", "adam"] = "gd",
) -> FullBatchRun:
    r"""Train :math:`K` hand-written MLPs of one shape side by side, full batch, on the squared loss
    :math:`L = \tfrac{1}{2B}\sum_b \lVert o_b - y_b\rVert^2`, and write the trained weights back into them.

    Every step computes both the true gradient :math:`G_l = \partial L/\partial W_l` (and of :math:`b_l`) and linear
    backprop's update :math:`\tilde G_l` (the recursion without :math:`\sigma'`), then steps along

    * ``update="backprop"``: :math:`G_l`;
    * ``update="linear"``: :math:`\tilde G_l`;
    * ``update="rescaled"``: :math:`(\lVert \tilde G_l\rVert / \lVert G_l\rVert)\, G_l`, the gradient's direction
      in every layer with linear backprop's length in that layer (norms over :math:`W_l` and :math:`b_l`
      together). It separates the two things dropping :math:`\sigma'` changes: the direction, and the
      per-layer step size (with sigmoid units :math:`\sigma' \le 1/4`, so linear backprop's lower layers
      take larger steps).

    ``optimizer="gd"`` takes :math:`\theta \leftarrow \theta - \eta\,u`; ``"adam"`` hands :math:`u` to
    ``torch.optim.Adam`` (its defaults, learning rate :math:`\eta`), one independent optimizer state per
    network. The networks' own ``linear_backprop`` flags are ignored: ``update`` decides.

    Args:
        networks: MLPs with equal ``sizes``, activation, device and dtype, and no weight decay.
        inputs: ``(B, n_0)``.
        targets: ``(B, n_L)``.
        steps: the number of steps, at least 1.
        update: ``"backprop"``, ``"linear"`` or ``"rescaled"``.
        learning_rate: :math:`\eta > 0`.
        optimizer: ``"gd"`` or ``"adam"``.

    Returns:
        The losses, descent cosines and per-layer length ratios along training (:class:`FullBatchRun`).

    Raises:
        ValueError: no networks, networks of different shapes or with weight decay, bad shapes, a bad
            ``update``, ``optimizer``, ``steps`` or ``learning_rate``.
        TypeError: an element of ``networks`` is not an :class:`~revlib.backprop.MLP`.
    """
    if len(networks) == 0:
        raise ValueError("networks must hold at least one MLP")
    if not all(isinstance(network, MLP) for network in networks):
        raise TypeError("networks must be revlib.backprop.MLP objects")
    first = networks[0]
    if any(n.sizes != first.sizes or n.activation is not first.activation for n in networks):
        raise ValueError("all networks must have the same sizes and activation")
    if any(n.weight_decay != 0 for n in networks):
        raise ValueError("train_full_batch has no weight decay: build the networks with weight_decay=0")
    if update not in ("backprop", "linear", "rescaled"):
        raise ValueError(f"update must be 'backprop', 'linear' or 'rescaled', got {update!r}")
    if optimizer not in ("gd", "adam"):
        raise ValueError(f"optimizer must be 'gd' or 'adam', got {optimizer!r}")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")
    first._check_inputs(inputs)
    if targets.shape != (inputs.shape[0], first.sizes[-1]):
        raise ValueError(f"targets must have shape ({inputs.shape[0]}, {first.sizes[-1]}), got {tuple(targets.shape)}")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: threads only add synchronisation
    try:
        return _train_full_batch(networks, inputs, targets, int(steps), update, learning_rate, optimizer)
    finally:
        torch.set_num_threads(threads)


def _train_full_batch(
    networks: Sequence[MLP], inputs: Tensor, targets: Tensor, steps: int, update: UpdateRule, learning_rate: float,
    optimizer: str,
) -> FullBatchRun:
    first = networks[0]
    depth, batch = first.depth, inputs.shape[0]
    with torch.inference_mode():  # small tensors: the per-operation overhead is the cost
        parameters = [torch.stack([n.tensors()[i] for n in networks]) for i in range(2 * depth)]  # (K, ...) each
        adam = torch.optim.Adam(parameters, lr=learning_rate) if optimizer == "adam" else None
        segments = _layer_segments(parameters, depth)
        losses, descents, layer_cosines, scales = [], [], [], []
        x = inputs.to(parameters[0].dtype).expand(len(networks), *inputs.shape)  # (K, B, n_0)
        y = targets.to(parameters[0].dtype)
        for step in range(steps + 1):
            cache, h = [], x
            for layer in range(depth):
                cache.append(h)  # h_{l-1}
                z = h @ parameters[2 * layer].transpose(1, 2) + parameters[2 * layer + 1].unsqueeze(1)
                h = z if layer == depth - 1 else first.activation.forward(z)
            residual = h - y  # (K, B, n_L)
            losses.append(0.5 * residual.pow(2).sum(dim=(1, 2)) / batch)
            if step == steps:
                break
            delta = residual / batch  # δ_L = ∂L/∂o
            exact = _stacked_backward(parameters[0::2], cache, delta, first.activation.derivative_from_output)
            linear = _stacked_backward(parameters[0::2], cache, delta, None)
            # per network and layer ⟨G̃, G⟩, ‖G̃‖², ‖G‖²: columns :L over (W_l, b_l), L: over W_l alone
            flat_linear = torch.cat([g.flatten(1) for g in linear], dim=1)
            flat_exact = torch.cat([g.flatten(1) for g in exact], dim=1)
            both, linear_squared, exact_squared = (
                torch.stack([flat_linear * flat_exact, flat_linear.square(), flat_exact.square()]) @ segments
            )
            scale = _ratio(linear_squared[:, :depth].sqrt(), exact_squared[:, :depth].sqrt())
            pair_squared = exact_squared[:, :depth]
            if update == "backprop":
                direction = exact
                inner = length_squared = pair_squared.sum(dim=1)
            elif update == "linear":
                direction = linear
                inner, length_squared = both[:, :depth].sum(dim=1), linear_squared[:, :depth].sum(dim=1)
            else:  # the gradient, each layer (weights and bias) stretched by linear backprop's length ratio
                direction = [g * _broadcast(scale[:, i // 2], g) for i, g in enumerate(exact)]
                inner, length_squared = (scale * pair_squared).sum(dim=1), (scale.square() * pair_squared).sum(dim=1)
            descents.append(_cosine(inner, length_squared, pair_squared.sum(dim=1)))
            layer_cosines.append(_cosine(both[:, depth:], linear_squared[:, depth:], exact_squared[:, depth:]))
            scales.append(scale)
            if adam is None:
                for parameter, u in zip(parameters, direction):
                    parameter.sub_(learning_rate * u)
            else:
                for parameter, u in zip(parameters, direction):
                    parameter.grad = u
                adam.step()
    with torch.no_grad():
        for k, network in enumerate(networks):
            for tensor, stacked in zip(network.tensors(), parameters):
                tensor.copy_(stacked[k])
    # clones outside inference mode: ordinary tensors for the caller
    return FullBatchRun(*(torch.stack(record).clone() for record in (losses, descents, layer_cosines, scales)))


def _layer_segments(parameters: list[Tensor], depth: int) -> Tensor:
    """``(P, 2L)`` indicator of the flattened ``[W_1, b_1, ...]`` of one network: column :math:`l` marks
    :math:`W_l` and :math:`b_l`, column :math:`L + l` marks :math:`W_l` alone; a product with it sums per layer."""
    sizes = [tensor[0].numel() for tensor in parameters]
    segments = torch.zeros(sum(sizes), 2 * depth, dtype=parameters[0].dtype, device=parameters[0].device)
    start = 0
    for i, size in enumerate(sizes):
        segments[start : start + size, i // 2] = 1
        if i % 2 == 0:
            segments[start : start + size, depth + i // 2] = 1
        start += size
    return segments


def _ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator, and 1 where both vanish (a network that fits its data exactly takes no step)."""
    return torch.where(denominator > 0, numerator / denominator.clamp_min(torch.finfo(denominator.dtype).tiny), 1.0)


def _broadcast(per_network: Tensor, like: Tensor) -> Tensor:
    return per_network.reshape(-1, *[1] * (like.dim() - 1))


def _cosine(inner: Tensor, squared_a: Tensor, squared_b: Tensor) -> Tensor:
    """cos∠(a, b) from ⟨a, b⟩, ‖a‖² and ‖b‖²; NaN where either vector vanishes."""
    norms = (squared_a * squared_b).sqrt()
    return torch.where(norms > 0, inner / norms.clamp_min(torch.finfo(norms.dtype).tiny), float("nan"))
