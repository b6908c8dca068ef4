r"""Backpropagation written out by hand: the chapter "Backpropagation and its memory bill".

An :class:`MLP` with layers :math:`l = 1, \dots, L` computes, for a mini-batch whose examples are rows,

.. math::

    Z_l = H_{l-1} W_l^\top + \mathbf 1 b_l^\top, \qquad H_l = \sigma(Z_l) \ (l < L), \qquad O = Z_L, \qquad H_0 = X,

and is trained on the objective :math:`\mathcal L_\lambda = \mathcal L + \Omega` with weight decay
:math:`\Omega = \tfrac{\lambda}{2}\sum_l \lVert W_l\rVert_F^2` (biases are not decayed). The backward pass
applies the chain rule layer by layer, from the output down:

.. math::

    \Delta_L = \frac{\partial \mathcal L}{\partial O}, \qquad
    \frac{\partial \mathcal L_\lambda}{\partial W_l} = \Delta_l^\top H_{l-1} + \lambda W_l, \qquad
    \frac{\partial \mathcal L_\lambda}{\partial b_l} = \Delta_l^\top \mathbf 1, \qquad
    \Delta_{l-1} = \left(\Delta_l W_l\right) \odot \sigma'(Z_{l-1}),

with :math:`\Delta_l = \partial \mathcal L_\lambda / \partial Z_l`, whose row :math:`b` is example :math:`b`'s
neuron error :math:`\delta_l^\top` (divided by :math:`B` for a mean loss).

No autograd is involved: the forward pass keeps exactly what these equations read later, the layer
inputs :math:`H_0, \dots, H_{L-1}` (for ReLU, sigmoid and tanh, :math:`\sigma'(z)` is a function of
:math:`h = \sigma(z)`, so :math:`Z` need not be kept). That cache *is* the memory bill of training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from revlib.blocks import ACTIVATIONS
from revlib.data import DataSplits
from revlib.runtime import resolve_device
from revlib.training import History, train_epochs

__all__ = ["MLP", "Gradients", "LossName", "loss_and_gradient"]

LossName = Literal["cross_entropy", "squared"]


def loss_and_gradient(outputs: Tensor, targets: Tensor, loss: LossName) -> tuple[Tensor, Tensor]:
    r"""The mean loss over a batch of :math:`B` examples and its gradient with respect to the outputs.

    * ``"cross_entropy"``: :math:`\mathcal L = -\frac1B\sum_i \log \operatorname{softmax}(o_i)_{y_i}`, with
      :math:`\partial \mathcal L / \partial o = (\operatorname{softmax}(o) - \operatorname{onehot}(y)) / B`.
    * ``"squared"``: :math:`\mathcal L = \frac{1}{2B}\sum_i \lVert o_i - y_i\rVert^2`, with
      :math:`\partial \mathcal L / \partial o = (o - y) / B`.

    Args:
        outputs: ``(B, C)`` logits or predictions.
        targets: ``(B,)`` class indices (cross-entropy) or ``(B, C)`` values (squared loss).
        loss: ``"cross_entropy"`` or ``"squared"``.

    Raises:
        ValueError: unknown ``loss``, or targets of the wrong shape, dtype or range.
    """
    batch = outputs.shape[0]
    if loss == "cross_entropy":
        if targets.dtype != torch.long or targets.shape != (batch,):
            raise ValueError(f"cross-entropy targets must be class indices of shape ({batch},), got {targets.dtype} {tuple(targets.shape)}")
        if batch and (targets.min() < 0 or targets.max() >= outputs.shape[1]):
            raise ValueError(f"cross-entropy targets must lie in [0, {outputs.shape[1] - 1}]")
        log_probabilities = torch.log_softmax(outputs, dim=1)  # (B, C)
        value = -log_probabilities.gather(1, targets.unsqueeze(1)).mean()
        gradient = (log_probabilities.exp() - F.one_hot(targets, outputs.shape[1]).to(outputs.dtype)) / batch
        return value, gradient
    if loss == "squared":
        if targets.shape != outputs.shape:
            raise ValueError(f"squared-loss targets must have the outputs' shape {tuple(outputs.shape)}, got {tuple(targets.shape)}")
        residual = outputs - targets
        return 0.5 * residual.pow(2).sum() / batch, residual / batch
    raise ValueError(f"loss must be 'cross_entropy' or 'squared', got {loss!r}")


@dataclass
class Gradients:
    r""":math:`\partial \mathcal L_\lambda/\partial W_l` and :math:`\partial \mathcal L_\lambda/\partial b_l` for every layer, first layer first."""

    weights: list[Tensor]
    biases: list[Tensor]

    def tensors(self) -> list[Tensor]:
        """All gradients in the order of :meth:`MLP.tensors`: ``W_1, b_1, W_2, b_2, ...``."""
        return [tensor for pair in zip(self.weights, self.biases) for tensor in pair]


class MLP:
    r"""A multilayer perceptron whose backward pass is written by hand from the chapter's equations.

    A teaching object, not an ``nn.Module``: its weights are plain tensors (``weights``, ``biases``,
    :meth:`tensors`), :meth:`forward` returns the outputs *and* the cache of layer inputs, and
    :meth:`backward` turns that cache and :math:`\partial \mathcal L/\partial o` into the gradients. :meth:`to_module`
    gives the same network as an ``nn.Sequential`` for autograd to check it against.

    Weights are drawn as :math:`W_l \sim \mathcal N(0, g^2/n_{l-1})` with gain :math:`g = \sqrt 2` for ReLU
    and :math:`1` otherwise; biases start at zero.

    Args:
        sizes: layer widths ``(n_0, n_1, ..., n_L)``: input size, hidden sizes, output size.
        activation: the hidden layers' non-linearity, a key of :data:`revlib.blocks.ACTIVATIONS` (the output
            layer is linear).
        weight_decay: :math:`\lambda \ge 0`.
        linear_backprop: back-propagate the error without the activation's derivative,
            :math:`\delta_{l-1} = \delta_l W_l` (Yazdani 2018; see :mod:`revlib.linear_backprop`). The forward pass is unchanged.
        seed: seed of the initialisation (a private generator; the global random state is untouched).
        device: where the parameters live.
        dtype: their floating dtype.

    Raises:
        ValueError: fewer than two sizes, a size below 1, an unknown activation or a negative weight decay.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        activation: str = "relu",
        *,
        weight_decay: float = 0.0,
        linear_backprop: bool = False,
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if len(sizes) < 2 or any(int(size) < 1 for size in sizes):
            raise ValueError(f"sizes must list at least an input and an output size, all positive, got {list(sizes)}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be non-negative, got {weight_decay}")
        self.sizes = [int(size) for size in sizes]
        self.activation = ACTIVATIONS[activation]
        self.weight_decay = float(weight_decay)
        self.linear_backprop = linear_backprop
        device = resolve_device(device)
        generator = torch.Generator().manual_seed(seed)
        gain = 2.0**0.5 if activation == "relu" else 1.0
        self.weights = [
            (torch.randn(fan_out, fan_in, generator=generator, dtype=torch.float64) * gain / fan_in**0.5).to(device, dtype)
            for fan_in, fan_out in zip(self.sizes[:-1], self.sizes[1:])
        ]
        self.biases = [torch.zeros(fan_out, device=device, dtype=dtype) for fan_out in self.sizes[1:]]

    @property
    def depth(self) -> int:
        """The number of layers :math:`L` (weight matrices)."""
        return len(self.weights)

    def tensors(self) -> list[Tensor]:
        """``W_1, b_1, W_2, b_2, ...`` (the tensors themselves, not copies)."""
        return [tensor for pair in zip(self.weights, self.biases) for tensor in pair]

    def _check_inputs(self, inputs: Tensor) -> None:
        if not isinstance(inputs, Tensor):
            raise TypeError(f"inputs must be a tensor, got {type(inputs).__name__}")
        if inputs.dim() != 2 or inputs.shape[1] != self.sizes[0]:
            raise ValueError(f"inputs must have shape (B, {self.sizes[0]}), got {tuple(inputs.shape)}")

    def forward(self, inputs: Tensor) -> tuple[Tensor, list[Tensor]]:
        r"""Forward propagation, keeping what the backward pass needs.

        Args:
            inputs: ``(B, n_0)``.

        Returns:
            The outputs :math:`o`, ``(B, n_L)``, and the cache :math:`[h_0, \dots, h_{L-1}]`, the input of
            every layer.
        """
        self._check_inputs(inputs)
        cache = []
        h = inputs
        for layer, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            cache.append(h)  # h_{l-1}: read by ∂ℒ_λ/∂W_l, and through σ'(z_{l-1}) by δ_{l-1}
            z = h @ weight.T + bias  # (B, n_l)
            h = z if layer == self.depth - 1 else self.activation.forward(z)
        return h, cache

    def backward(self, cache: list[Tensor], output_gradient: Tensor) -> Gradients:
        r"""Backward propagation from :math:`\delta_L = \partial \mathcal L/\partial o` down to the first layer.

        Args:
            cache: the cache returned by :meth:`forward`.
            output_gradient: :math:`\partial \mathcal L/\partial o`, ``(B, n_L)``.

        Returns:
            :math:`\partial \mathcal L_\lambda/\partial W_l` (weight decay included) and :math:`\partial \mathcal L_\lambda/\partial b_l`.

        Raises:
            ValueError: the cache or the gradient does not match this network.
        """
        self._check_backward(cache, output_gradient)
        weight_gradients: list[Tensor] = [torch.empty(0)] * self.depth
        bias_gradients: list[Tensor] = [torch.empty(0)] * self.depth
        derivative = self.activation.derivative_from_output
        # Δ_L = ∂ℒ/∂O, (B, n_L): row b is example b's δ_L
        delta = output_gradient
        # layer = l - 1, counting from 0: W_l is weights[layer]
        for layer in reversed(range(self.depth)):
            # H_{l-1}, the input of layer l, (B, n_{l-1})
            h_previous = cache[layer]
            weight = self.weights[layer]
            # Δ_lᵀ H_{l-1} + λ W_l and 1ᵀ Δ_l: sums over the examples
            weight_gradients[layer] = delta.T @ h_previous + self.weight_decay * weight
            bias_gradients[layer] = delta.sum(dim=0)
            # the input x needs no gradient
            if layer > 0:
                # Δ_{l-1} = (Δ_l W_l) ⊙ σ'(Z_{l-1}), σ' read off H_{l-1}
                delta = delta @ weight
                if not self.linear_backprop:
                    delta = delta * derivative(h_previous)
        return Gradients(weight_gradients, bias_gradients)

    def _check_backward(self, cache: list[Tensor], output_gradient: Tensor) -> None:
        if len(cache) != self.depth:
            raise ValueError(f"cache must hold {self.depth} layer inputs, got {len(cache)}")
        expected = (cache[0].shape[0], self.sizes[-1])
        if output_gradient.dim() != 2 or output_gradient.shape != expected:
            raise ValueError(f"output_gradient must have shape {expected}, got {tuple(output_gradient.shape)}")

    def objective(self, inputs: Tensor, targets: Tensor, loss: LossName = "cross_entropy") -> tuple[Tensor, Tensor]:
        r"""The data loss :math:`\mathcal L` and the weight-decay term :math:`\Omega` (so :math:`\mathcal L_\lambda = \mathcal L + \Omega`)."""
        outputs, _ = self.forward(inputs)
        value, _ = loss_and_gradient(outputs, targets, loss)
        return value, self._decay()

    def _decay(self) -> Tensor:
        return 0.5 * self.weight_decay * sum(weight.pow(2).sum() for weight in self.weights)

    def gradients(self, inputs: Tensor, targets: Tensor, loss: LossName = "cross_entropy") -> tuple[Tensor, Gradients]:
        r"""One forward and one backward pass: the objective :math:`\mathcal L_\lambda` and its gradients."""
        outputs, cache = self.forward(inputs)
        value, output_gradient = loss_and_gradient(outputs, targets, loss)
        return value + self._decay(), self.backward(cache, output_gradient)

    def to_module(self) -> nn.Sequential:
        """The same network as an ``nn.Sequential`` of ``nn.Linear`` and activation modules, with copies of
        the current weights: the autograd twin this class is checked against (for the linear-backprop rule,
        wrap its activations with :func:`revlib.linear_backprop.convert_to_linear_backprop`)."""
        layers: list[nn.Module] = []
        for layer, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            linear = nn.Linear(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(weight)
                linear.bias.copy_(bias)
            layers.append(linear)
            if layer < self.depth - 1:
                layers.append(self.activation.module())
        return nn.Sequential(*layers)

    def train_sgd(
        self,
        data: DataSplits,
        epochs: int,
        *,
        learning_rate: float,
        batch_size: int = 64,
        loss: LossName = "cross_entropy",
        seed: int = 0,
        progress: bool = True,
    ) -> History:
        r"""Plain stochastic gradient descent with the hand-written gradients:
        :math:`W_l \leftarrow W_l - \eta\, \partial \mathcal L_\lambda/\partial W_l`, :math:`b_l \leftarrow b_l - \eta\, \partial \mathcal L_\lambda/\partial b_l`.

        Mini-batches are drawn exactly as :func:`revlib.training.fit` draws them, so an autograd twin trained
        with ``fit`` from the same initialisation sees the same batches. The history records the data loss
        :math:`\mathcal L`.
        """
        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {learning_rate}")

        def step(x: Tensor, y: Tensor) -> tuple[float, Tensor]:
            outputs, cache = self.forward(x)
            value, output_gradient = loss_and_gradient(outputs, y, loss)
            gradients = self.backward(cache, output_gradient)
            for parameter, gradient in zip(self.tensors(), gradients.tensors()):
                parameter.sub_(learning_rate * gradient)
            return value.item(), outputs

        def assess(x: Tensor, y: Tensor) -> tuple[float, float]:
            outputs, _ = self.forward(x)
            value, _ = loss_and_gradient(outputs, y, loss)
            accuracy = (outputs.argmax(1) == y).double().mean().item() if loss == "cross_entropy" else float("nan")
            return value.item(), accuracy

        return train_epochs(step, assess, data, epochs, batch_size=batch_size, seed=seed, progress=progress)
