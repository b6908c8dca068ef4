r"""Residual learning: the chapter "Residual learning".

A residual block adds its input to what its layers compute (He et al. 2016),

.. math::

    x_{l+1} = x_l + f_l(x_l),

where a plain block computes :math:`x_{l+1} = f_l(x_l)` with the very same layers. Chaining
blocks, the derivative of the output with respect to a block's input is a product of Jacobians,

.. math::

    \frac{\partial x_N}{\partial x_l} = \prod_{k=l}^{N-1} \Big(I + \frac{\partial f_k}{\partial x_k}\Big)
    \quad\text{instead of}\quad \prod_{k=l}^{N-1} \frac{\partial f_k}{\partial x_k},

and the identity in every factor keeps the product from vanishing when the Jacobians of
:math:`f_k` are small.

This module builds plain and residual networks that differ *only* in the skip connection (so they have
identical parameters), can bypass chosen blocks at test time (the lesion study of Veit et al. 2016), and
measures what the chapter plots: the gradient reaching each block, and slices of the loss surface along
filter-normalised random directions (Li et al. 2018) with how far each falls again after rising, and the
effective rank of the representations block by block (the degeneracy that Orhan and Pitkow 2018 show skip
connections remove).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from revlib._checks import positive_integers
from revlib.blocks import ResidualBlock, make_activation, pre_activation_residual
from revlib.data import DataSplits
from revlib.runtime import evaluation_mode, resolve_device
from revlib.training import History, fit

__all__ = [
    "DeepNetwork",
    "GradientFlow",
    "LossSlices",
    "conv_network",
    "deletion_accuracies",
    "effective_rank",
    "filter_normalized_direction",
    "gradient_flow",
    "jacobian_ranks",
    "largest_deletion_share",
    "largest_dip",
    "lesion_accuracies",
    "loss_slices",
    "loss_surface",
    "mlp_network",
    "representation_ranks",
    "train_with_cosine_schedule",
]

LossFunction = Callable[[Tensor, Tensor], Tensor]


class DeepNetwork(nn.Module):
    r"""``stem → block 0 → … → block L−1 → head``, where any block can be bypassed at test time.

    Block :math:`l` is :math:`x_{l+1} = x_l + f_l(x_l)` in a residual network and
    :math:`x_{l+1} = f_l(x_l)` in a plain one, with the very same functions :math:`f_l`
    (so the two have the same parameters, under the same names). Bypassing block :math:`l` replaces it by the
    identity, :math:`x_{l+1} = x_l`: for a residual block that deletes :math:`f_l` and keeps the
    shortcut, for a plain block it deletes the layer outright. Build one with :func:`mlp_network` or
    :func:`conv_network`.

    Args:
        stem: maps the input to the blocks' width.
        functions: the shape-preserving :math:`f_l`.
        head: maps the last block's output to class scores.
        residual: add the identity shortcut around every function.
    """

    def __init__(self, stem: nn.Module, functions: Sequence[nn.Module], head: nn.Module, *, residual: bool) -> None:
        super().__init__()
        self.stem, self.functions, self.head = stem, nn.ModuleList(functions), head
        self.residual = residual
        # the blocks as modules (ResidualBlock wrappers share the functions' parameters; not registered twice)
        self._blocks = [ResidualBlock(f) for f in functions] if residual else list(functions)

    @property
    def blocks(self) -> list[nn.Module]:
        """The blocks as modules, in order; a :class:`~revlib.blocks.ResidualBlock` around each function, or
        the functions themselves for a plain network (to run them elsewhere, e.g. in a
        :class:`~revlib.checkpoint.CheckpointedSequence`)."""
        return list(self._blocks)

    def forward(self, x: Tensor, bypass: Collection[int] = ()) -> Tensor:
        """Class scores; the blocks whose indices are in ``bypass`` are replaced by the identity.

        Raises:
            ValueError: an index in ``bypass`` names no block.
        """
        bad = [index for index in bypass if not 0 <= index < len(self.functions)]
        if bad:
            raise ValueError(f"bypass must hold block indices in [0, {len(self.functions)}), got {sorted(bad)}")
        x = self.stem(x)
        for index, f in enumerate(self.functions):
            if index not in bypass:
                x = x + f(x) if self.residual else f(x)
        return self.head(x)

    def extra_repr(self) -> str:
        return f"residual={self.residual}"


def mlp_network(
    in_features: int,
    width: int,
    depth: int,
    classes: int,
    *,
    residual: bool,
    activation: str = "relu",
    batch_norm: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> DeepNetwork:
    r"""A fully connected network with ``depth`` blocks of two linear layers each.

    Each block is pre-activation style (He et al. 2016b), :math:`f(x) = W_2\,\sigma(W_1 \sigma(x) + b_1) + b_2`,
    so the plain network is the ordinary alternation linear → σ → linear → σ …, with :math:`2\,\text{depth}`
    hidden layers between the stem ``Linear(in_features, width)`` and the head ``σ → Linear(width, classes)``.
    Plain and residual networks built with the same arguments and seed have the same parameters.

    Args:
        in_features: input features.
        width: features inside the blocks.
        depth: number of blocks.
        classes: outputs.
        residual: add identity shortcuts around the blocks.
        activation: a name in :data:`revlib.blocks.ACTIVATIONS` (``"relu"``, ``"tanh"``, ``"sigmoid"``, ``"identity"``).
        batch_norm: put a BatchNorm before every activation (He et al. 2016's setting).
        device: where the parameters live (``None``: :func:`revlib.runtime.default_device`).
        dtype: their dtype.

    Raises:
        ValueError: a size is not a positive integer or the activation is unknown.
    """
    positive_integers(in_features=in_features, width=width, depth=depth, classes=classes)
    make_activation(activation)  # checks the name
    return _pre_activation_network(
        stem=nn.Linear(in_features, width),
        layer=lambda: nn.Linear(width, width),
        norm=(lambda: nn.BatchNorm1d(width)) if batch_norm else None,
        head=lambda: [nn.Linear(width, classes)],
        depth=depth, residual=residual, activation=activation,
    ).to(device=resolve_device(device), dtype=dtype)


def conv_network(
    in_channels: int,
    channels: int,
    depth: int,
    classes: int,
    *,
    residual: bool,
    activation: str = "relu",
    batch_norm: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> DeepNetwork:
    r"""A convolutional network for small images with ``depth`` blocks of two 3×3 convolutions each.

    Block: :math:`f` = [BatchNorm →] σ → conv → [BatchNorm →] σ → conv on ``channels`` channels
    (pre-activation, He et al. 2016b); stem: a 3×3 convolution from ``in_channels``; head: [BatchNorm →]
    σ → global average pooling → linear. Inputs are ``(B, in_channels, H, W)``.

    Args:
        in_channels: channels of the input images.
        channels: channels inside the blocks.
        depth: number of blocks.
        classes: outputs.
        residual: add identity shortcuts around the blocks.
        activation: a name in :data:`revlib.blocks.ACTIVATIONS` (``"relu"``, ``"tanh"``, ``"sigmoid"``, ``"identity"``).
        batch_norm: put a BatchNorm before every activation.
        device: where the parameters live (``None``: :func:`revlib.runtime.default_device`).
        dtype: their dtype.

    Raises:
        ValueError: a size is not a positive integer or the activation is unknown.
    """
    positive_integers(in_channels=in_channels, channels=channels, depth=depth, classes=classes)
    make_activation(activation)  # checks the name
    return _pre_activation_network(
        stem=nn.Conv2d(in_channels, channels, 3, padding=1),
        layer=lambda: nn.Conv2d(channels, channels, 3, padding=1),
        norm=(lambda: nn.BatchNorm2d(channels)) if batch_norm else None,
        head=lambda: [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes)],
        depth=depth, residual=residual, activation=activation,
    ).to(device=resolve_device(device), dtype=dtype)


def _pre_activation_network(
    *,
    stem: nn.Module,
    layer: Callable[[], nn.Module],
    norm: Callable[[], nn.Module] | None,
    head: Callable[[], list[nn.Module]],
    depth: int,
    residual: bool,
    activation: str,
) -> DeepNetwork:
    """``stem → depth × [norm → σ → layer → norm → σ → layer] → norm → σ → head``, shared by the builders.

    Layers are created in that order (stem, blocks, head), so seeded initialisations are reproducible.
    """

    functions = [pre_activation_residual(layer, activation=activation, norm=norm) for _ in range(depth)]
    head_layers = [norm(), make_activation(activation)] if norm is not None else [make_activation(activation)]
    return DeepNetwork(stem, functions, nn.Sequential(*head_layers, *head()), residual=residual)


@dataclass(frozen=True)
class GradientFlow:
    """Gradient norms per block, from the first block to the last.

    Attributes:
        inputs: :math:`\\lVert \\partial L / \\partial x_l \\rVert`, the error signal reaching the input of block ``l``.
        weights: the norm of the gradient of all parameters of block ``l`` together.
    """

    inputs: tuple[float, ...]
    weights: tuple[float, ...]


def gradient_flow(model: DeepNetwork, inputs: Tensor, targets: Tensor, *, loss_fn: LossFunction = F.cross_entropy) -> GradientFlow:
    """Back-propagate the loss of one batch and record, per block, the gradient norms of its input and weights.

    The model's parameter gradients are left as they were (they are computed with
    :func:`torch.autograd.grad`, not accumulated into ``.grad``).

    Raises:
        TypeError: ``model`` is not a :class:`DeepNetwork`.
    """
    if not isinstance(model, DeepNetwork):
        raise TypeError(f"model must be a DeepNetwork (from mlp_network or conv_network), got {type(model).__name__}")
    block_inputs: list[Tensor] = []
    handles = [block.register_forward_pre_hook(lambda _, args: block_inputs.append(args[0])) for block in model.functions]
    try:
        with torch.enable_grad():
            loss = loss_fn(model(inputs), targets)
    finally:
        for handle in handles:
            handle.remove()
    block_parameters = [list(block.parameters()) for block in model.functions]
    flat_parameters = [p for parameters in block_parameters for p in parameters]
    gradients = torch.autograd.grad(loss, [*block_inputs, *flat_parameters])
    input_norms = tuple(g.norm().item() for g in gradients[: len(block_inputs)])
    weight_gradients = iter(gradients[len(block_inputs) :])
    weight_norms = tuple(
        torch.stack([next(weight_gradients).norm() for _ in parameters]).norm().item() for parameters in block_parameters
    )
    return GradientFlow(input_norms, weight_norms)


def lesion_accuracies(model: DeepNetwork, inputs: Tensor, targets: Tensor) -> list[float]:
    """Test accuracy with each block bypassed in turn: entry ``l`` is the accuracy without block ``l``.

    Runs in eval mode without gradients; the model's mode is restored afterwards (Veit et al. 2016).
    """
    with evaluation_mode(model):
        return [_accuracy_without(model, inputs, targets, {index}) for index in range(len(model.functions))]


def _accuracy_without(model: DeepNetwork, inputs: Tensor, targets: Tensor, bypass: Collection[int]) -> float:
    """The share of ``inputs`` classified correctly with the blocks in ``bypass`` deleted."""
    return (model(inputs, bypass=bypass).argmax(dim=1) == targets).float().mean().item()


def deletion_accuracies(
    model: DeepNetwork,
    inputs: Tensor,
    targets: Tensor,
    counts: Sequence[int],
    *,
    trials: int = 20,
    generator: torch.Generator | None = None,
) -> list[list[float]]:
    """Test accuracy with several blocks bypassed at once (Veit et al. 2016's ensemble experiment).

    For every ``count`` in ``counts``, ``trials`` subsets of that many blocks are drawn uniformly without
    replacement and the model runs without them. Eval mode, no gradients; the model's mode is restored.

    Args:
        model: a :class:`DeepNetwork`.
        inputs: the test inputs.
        targets: their classes.
        counts: how many blocks to delete, each between 0 and the number of blocks.
        trials: random subsets per count.
        generator: the source of the subsets (on the CPU), for repeatable draws.

    Returns:
        One list of ``trials`` accuracies per count, in the order of ``counts``.

    Raises:
        ValueError: a count is outside ``[0, len(model.blocks)]`` or ``trials`` is not positive.
    """
    blocks = len(model.functions)
    if any(not 0 <= count <= blocks for count in counts):
        raise ValueError(f"counts must lie between 0 and the number of blocks ({blocks}), got {list(counts)}")
    positive_integers(trials=trials)
    accuracies = []
    with evaluation_mode(model):
        for count in counts:
            subsets = [set(torch.randperm(blocks, generator=generator)[:count].tolist()) for _ in range(trials)]
            accuracies.append([_accuracy_without(model, inputs, targets, subset) for subset in subsets])
    return accuracies


def largest_deletion_share(counts: Sequence[int], accuracies: Sequence[float]) -> float:
    r"""The largest share of the accuracy lost by deleting blocks that one extra deleted block accounts for.

    With mean accuracies :math:`a_0, \dots, a_m` after deleting :math:`c_0 < \dots < c_m` blocks, it is the
    largest loss per deleted block between neighbouring counts, as a share of the whole loss:

    .. math:: s = \max_j \frac{(a_j - a_{j+1}) / (c_{j+1} - c_j)}{a_0 - a_m}.

    An ensemble of many paths loses its accuracy gradually (:math:`s` near :math:`1/c_m`); a network
    whose first deletion destroys it has :math:`s \approx 1`.

    Raises:
        ValueError: fewer than two counts, counts not increasing, lengths differing, or no accuracy lost.
    """
    if len(counts) != len(accuracies) or len(counts) < 2:
        raise ValueError(f"give at least two counts and one accuracy per count, got {len(counts)} counts and {len(accuracies)} accuracies")
    if any(later <= earlier for earlier, later in zip(counts, counts[1:])):
        raise ValueError(f"counts must be increasing, got {list(counts)}")
    total = accuracies[0] - accuracies[-1]
    if total <= 0:
        raise ValueError(f"deleting blocks lost no accuracy ({accuracies[0]:.3g} to {accuracies[-1]:.3g}): there is no share to measure")
    steps = [(before - after) / (c_after - c_before)
             for before, after, c_before, c_after in zip(accuracies, accuracies[1:], counts, counts[1:])]
    return max(steps) / total


def filter_normalized_direction(model: nn.Module, *, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    r"""A random direction in parameter space, scaled filter by filter (Li et al. 2018).

    For every weight with at least two dimensions, each filter :math:`i` (an output neuron of a linear
    layer, an output channel of a convolution) of a Gaussian direction :math:`u` is rescaled to the norm
    of the same filter of the weights,

    .. math::

        u_i \leftarrow \frac{u_i}{\lVert u_i \rVert}\,\lVert \theta_i \rVert,

    so that a step along :math:`u` perturbs every filter in proportion to its size and the picture does
    not depend on the scale invariances of the network. Biases and BatchNorm parameters (one dimension)
    get a zero direction.

    Args:
        model: the network; its parameters are read, not changed.
        generator: the source of randomness (on the CPU), for repeatable directions.

    Returns:
        A direction per parameter name, with the parameters' shapes, devices and dtypes.
    """
    direction = {}
    for name, parameter in model.named_parameters():
        if parameter.dim() < 2:
            direction[name] = torch.zeros_like(parameter)
            continue
        weights = parameter.detach()
        gaussian = torch.randn(weights.shape, generator=generator, dtype=torch.float64).to(weights)
        filter_dims = tuple(range(1, weights.dim()))
        filter_norm = torch.linalg.vector_norm(weights, dim=filter_dims, keepdim=True)  # (out, 1, …)
        scale = filter_norm / torch.linalg.vector_norm(gaussian, dim=filter_dims, keepdim=True).clamp_min(1e-12)
        direction[name] = gaussian * scale
    return direction


def loss_surface(
    model: nn.Module,
    directions: Sequence[dict[str, Tensor]],
    coordinates: Sequence[Tensor],
    inputs: Tensor,
    targets: Tensor,
    *,
    loss_fn: LossFunction = F.cross_entropy,
) -> Tensor:
    r"""The loss on a grid around the model's parameters: :math:`\mathcal L(\theta + \sum_k a_k u_k)`.

    With one direction this is a 1-D slice, with two a 2-D surface (Li et al. 2018). The model is
    evaluated in eval mode with :func:`torch.func.functional_call`; its parameters are not changed.

    Args:
        model: the network at the centre :math:`\theta`.
        directions: one or two directions, e.g. from :func:`filter_normalized_direction`.
        coordinates: one 1-D tensor of step sizes :math:`a_k` per direction.
        inputs: the batch the loss is evaluated on.
        targets: its targets.
        loss_fn: the loss.

    Returns:
        The losses, of shape ``(len(coordinates[0]), …)``: one axis per direction, in order.

    Raises:
        ValueError: the number of coordinate tensors differs from the number of directions, or a
            direction does not cover exactly the model's parameters.
    """
    if len(directions) != len(coordinates) or not directions:
        raise ValueError(f"give one coordinate tensor per direction: {len(directions)} directions, {len(coordinates)} coordinate tensors")
    centre = {name: p.detach() for name, p in model.named_parameters()}
    for index, direction in enumerate(directions):
        if set(direction) != set(centre):
            raise ValueError(f"direction {index} must have one tensor per parameter of the model, named as in named_parameters()")
    grid = torch.cartesian_prod(*[torch.as_tensor(c, dtype=torch.float64).flatten() for c in coordinates]).reshape(-1, len(directions))
    losses = []
    with evaluation_mode(model):
        for point in grid.tolist():
            shifted = {name: value + sum(a * d[name] for a, d in zip(point, directions)) for name, value in centre.items()}
            losses.append(float(loss_fn(functional_call(model, shifted, (inputs,)), targets)))
    return torch.tensor(losses, dtype=torch.float64).reshape([len(c) for c in coordinates])


def largest_dip(line: Tensor, *, ceiling: float | None = None) -> float:
    r"""How far a 1-D loss slice falls again after rising, walking outward from its lowest point.

    From the slice's minimum the loss of a bowl only rises, on both sides. The dip is the largest fall of
    the log-loss below its running maximum on the way out,

    .. math::

        \operatorname{dip} = \max_{\text{both sides}}\ \max_{k}\Big(\max_{j \le k} \log L_j - \log L_k\Big),

    with :math:`j, k` counting grid points outward from the minimum: 0 for a bowl (a slice with a single
    valley, wherever its lowest point lies), :math:`\log(h/l)` when the loss climbs to a ridge :math:`h`
    and falls back to :math:`l` before it rises again. Measured on the log-loss, a dip is a relative fall
    (0.1: about 10 %) whatever the scale of the loss, so a deep valley and a shallow one compare fairly.

    With a ``ceiling`` the walk on each side stops before the first loss above it: the dip then measures
    the roughness of the *basin* around the minimum (e.g. where the loss is below chance level,
    :math:`\ln C` for :math:`C` classes) and ignores what happens far out in the tails.

    Args:
        line: the losses along the slice.
        ceiling: stop walking outward at the first loss above this (``None``: walk to the ends).

    Raises:
        ValueError: ``line`` is not 1-D with at least three positive, finite losses, or ``ceiling`` is
            not above the slice's lowest loss.
    """
    if line.dim() != 1 or len(line) < 3:
        raise ValueError(f"line must be a 1-D slice of at least 3 losses, got shape {tuple(line.shape)}")
    if not (torch.isfinite(line).all() and (line > 0).all()):
        raise ValueError("line must hold positive, finite losses (a cross-entropy is positive; an overflow is not a loss)")
    lowest = int(line.argmin())
    if ceiling is not None and not ceiling > line[lowest].item():
        raise ValueError(f"ceiling must lie above the slice's lowest loss {line[lowest].item():.4g}, got {ceiling}")
    log_loss = line.double().log()
    dips = []
    for side in (log_loss[lowest:], log_loss[: lowest + 1].flip(0)):
        if ceiling is not None:
            above = (side > torch.tensor(ceiling, dtype=torch.float64).log()).nonzero()
            side = side[: int(above[0])] if len(above) else side
        dips.append((side.cummax(0).values - side).max())
    return max(dips).item()


def effective_rank(matrix: Tensor) -> float:
    r"""The effective rank of a matrix (Roy and Vetterli 2007): the exponential of the entropy of its
    normalised singular values.

    With singular values :math:`s_1 \ge \dots \ge s_r` and :math:`p_i = s_i / \sum_j s_j`,

    .. math:: \operatorname{erank}(A) = \exp\Big(-\sum_i p_i \log p_i\Big),

    which is :math:`k` for a matrix with :math:`k` equal non-zero singular values and falls towards 1 as
    one direction dominates. Computed in float64.

    Raises:
        ValueError: ``matrix`` is not 2-D, is empty, or is zero or not finite.
    """
    if matrix.dim() != 2 or matrix.numel() == 0:
        raise ValueError(f"matrix must be a non-empty 2-D tensor, got shape {tuple(matrix.shape)}")
    if not torch.isfinite(matrix).all():
        raise ValueError("matrix must be finite to have an effective rank")
    singular = torch.linalg.svdvals(matrix.detach().double())
    if singular.sum() <= 0:
        raise ValueError("matrix must be finite and non-zero to have an effective rank")
    p = singular / singular.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def representation_ranks(model: DeepNetwork, inputs: Tensor) -> list[float]:
    r"""The effective rank of the centred representation entering each block and the head.

    Runs ``inputs`` through the model without gradients (in its current mode) and records
    :math:`x_0, \dots, x_N`, the inputs of the :math:`N` blocks and of the head. Each is flattened to a
    matrix with one row per example, centred over the examples (so a common offset does not count as a
    direction), and measured with :func:`effective_rank`. In a network whose units respond alike the
    representation collapses towards low rank (Orhan and Pitkow 2018).

    Returns:
        :math:`N + 1` effective ranks, from :math:`x_0` (the stem's output) to :math:`x_N`.

    Raises:
        TypeError: ``model`` is not a :class:`DeepNetwork`.
        ValueError: fewer than two inputs.
    """
    if not isinstance(model, DeepNetwork):
        raise TypeError(f"model must be a DeepNetwork (from mlp_network or conv_network), got {type(model).__name__}")
    if len(inputs) < 2:
        raise ValueError(f"give at least two inputs to centre the representations, got {len(inputs)}")
    captured: list[Tensor] = []
    modules = [*model.functions, model.head]
    handles = [m.register_forward_pre_hook(lambda _, args: captured.append(args[0].detach())) for m in modules]
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    ranks = []
    for x in captured:
        flat = x.flatten(1)
        ranks.append(effective_rank(flat - flat.mean(dim=0)))
    return ranks


def jacobian_ranks(model: DeepNetwork, inputs: Tensor) -> list[float]:
    r"""The effective rank of the blocks' input–output Jacobian at each of ``inputs``.

    For every example the stem's output :math:`x_0` is computed and the Jacobian of the map through all
    blocks, :math:`\partial x_N / \partial x_0` (a product of the blocks' Jacobians
    :math:`J_{N-1}\cdots J_0`, or of :math:`(I + J_k)` with shortcuts), is measured with
    :func:`effective_rank`. The effective rank ignores the Jacobian's size: a product of random
    matrices whose singular values spread apart collapses towards rank 1 even when it is rescaled, the
    degeneracy that Orhan and Pitkow (2018) find in deep plain networks and not in residual ones. The model
    runs in eval mode (BatchNorm with its running statistics) on one example at a time; its mode is
    restored afterwards.

    Returns:
        One effective rank per example, in the order of ``inputs``.

    Raises:
        TypeError: ``model`` is not a :class:`DeepNetwork`.
        ValueError: ``inputs`` is empty.
    """
    if not isinstance(model, DeepNetwork):
        raise TypeError(f"model must be a DeepNetwork (from mlp_network or conv_network), got {type(model).__name__}")
    if len(inputs) == 0:
        raise ValueError("give at least one input")

    def through_blocks(x: Tensor) -> Tensor:
        x = x[None]
        for f in model.functions:
            x = x + f(x) if model.residual else f(x)
        return x[0]

    ranks = []
    with evaluation_mode(model):
        with torch.no_grad():
            starts = model.stem(inputs)
        for start in starts:
            jacobian = torch.func.jacrev(through_blocks)(start)
            ranks.append(effective_rank(jacobian.reshape(start.numel(), start.numel())))
    return ranks


def train_with_cosine_schedule(
    model: nn.Module,
    data: DataSplits,
    *,
    epochs: int,
    learning_rate: float,
    momentum: float = 0.9,
    batch_size: int = 64,
    seed: int = 0,
) -> History:
    r"""Train with SGD and momentum on a cosine schedule (Loshchilov and Hutter 2017), He et al.'s setting.

    Over the :math:`T = \text{epochs}\cdot\lceil n_\text{train} / \text{batch\_size}\rceil` optimiser steps the
    learning rate at step :math:`t` is

    .. math:: \eta_t = \tfrac12\,\eta_0\,\big(1 + \cos(\pi t / T)\big),

    falling from :math:`\eta_0` = ``learning_rate`` to 0 at the end of training. The batches are drawn
    as in :func:`revlib.training.fit`, without a progress bar.

    Returns:
        The :class:`revlib.training.History` of the run.

    Raises:
        ValueError: ``learning_rate`` is not positive, ``momentum`` is not in ``[0, 1)``, or ``epochs`` or
            ``batch_size`` is not positive.
    """
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
    positive_integers(epochs=epochs, batch_size=batch_size)
    steps = epochs * math.ceil(len(data.x_train) / batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    return fit(model, data, optimizer, epochs, batch_size=batch_size, seed=seed, progress=False,
               scheduler=schedule)


@dataclass(frozen=True)
class LossSlices:
    """Slices of the loss around a model along random filter-normalised directions (:func:`loss_slices`).

    Attributes:
        lines: one 1-D tensor of losses per direction, on the given coordinates.
        dips: :func:`largest_dip` of each line, walking to its ends.
        basin_dips: :func:`largest_dip` of each line with the ``ceiling``, in its basin only.
        plane: the losses on the plane of the first two directions (rows: the first coordinate), or
            ``None`` when no plane was asked for.
    """

    lines: list[Tensor]
    dips: list[float]
    basin_dips: list[float]
    plane: Tensor | None


def loss_slices(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    coordinates: Tensor,
    *,
    directions: int,
    ceiling: float,
    plane_stride: int | None = None,
    generator: torch.Generator | None = None,
    loss_fn: LossFunction = F.cross_entropy,
) -> LossSlices:
    r"""The loss along ``directions`` random filter-normalised directions and how rough each slice is.

    Draws the directions :math:`u_1, \dots, u_k` with :func:`filter_normalized_direction` (in order, from
    ``generator``), evaluates each slice :math:`a \mapsto \mathcal L(\theta + a\,u_i)` on ``coordinates``
    with :func:`loss_surface`, and measures its :func:`largest_dip`, over the whole slice and in the basin
    below ``ceiling``. With ``plane_stride`` it also evaluates the plane
    :math:`\mathcal L(\theta + a_1 u_1 + a_2 u_2)` on every ``plane_stride``-th coordinate in both
    directions.

    Raises:
        ValueError: ``coordinates`` is not 1-D, ``directions`` is not positive (or below 2 with a plane),
            ``plane_stride`` is not positive, or a slice is not a valid argument of :func:`largest_dip`.
    """
    if coordinates.dim() != 1:
        raise ValueError(f"coordinates must be 1-D, got shape {tuple(coordinates.shape)}")
    positive_integers(directions=directions)
    if plane_stride is not None:
        positive_integers(plane_stride=plane_stride)
        if directions < 2:
            raise ValueError(f"a plane needs at least two directions, got {directions}")
    drawn = [filter_normalized_direction(model, generator=generator) for _ in range(directions)]
    lines = [loss_surface(model, [u], [coordinates], inputs, targets, loss_fn=loss_fn) for u in drawn]
    plane = None
    if plane_stride is not None:
        grid = [coordinates[::plane_stride]] * 2
        plane = loss_surface(model, drawn[:2], grid, inputs, targets, loss_fn=loss_fn)
    return LossSlices(
        lines=lines,
        dips=[largest_dip(line) for line in lines],
        basin_dips=[largest_dip(line, ceiling=ceiling) for line in lines],
        plane=plane,
    )
