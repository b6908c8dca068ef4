"""A small, explicit training loop, and one training step.

:func:`fit` is the loop every chapter uses: mini-batch gradient descent with any optimiser, a ``tqdm``
progress bar that can be switched off, and a :class:`History` with one row per epoch that
:mod:`revlib.plotting` knows how to draw. Shuffling uses its own seeded generator, so a run is repeatable
without touching the global random state. :func:`train_epochs` is that loop for models that update
themselves (the hand-written MLP of chapter 01).

:func:`make_optimizer` and :func:`training_step` are the single step whose memory bill the book measures:
cross-entropy, backward, the optimiser's update. :func:`gradient_descent_` is full-batch gradient descent
on the squared loss, the setting of chapter 04's theorem on linear ResNets.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from revlib._checks import positive_integers
from revlib.data import DataSplits
from revlib.runtime import evaluation_mode, resolve_device

__all__ = [
    "OPTIMIZERS",
    "History",
    "LossFunction",
    "evaluate",
    "fit",
    "gradient_descent_",
    "make_optimizer",
    "train_epochs",
    "training_step",
]

LossFunction = Callable[[Tensor, Tensor], Tensor]
OPTIMIZERS = ("sgd", "momentum", "adam")


@dataclass
class History:
    """Per-epoch record of a training run.

    ``train_loss`` and ``train_accuracy`` average the mini-batches of each epoch (measured while the
    weights change); ``test_loss`` and ``test_accuracy`` evaluate the whole test set after the epoch.
    Accuracies are fractions in [0, 1]; they are ``nan`` when the targets are not class labels.
    """

    train_loss: list[float] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)

    @property
    def epochs(self) -> int:
        """The number of epochs recorded."""
        return len(self.train_loss)

    def __repr__(self) -> str:
        if not self.epochs:
            return "History(no epochs)"
        return (
            f"History({self.epochs} epochs: train loss {self.train_loss[-1]:.4f}, "
            f"test loss {self.test_loss[-1]:.4f}, test accuracy {self.test_accuracy[-1]:.4f})"
        )


def _correct(outputs: Tensor, targets: Tensor) -> int:
    """Number of correct class predictions, or 0 when the targets are not class labels."""
    if targets.dtype != torch.long or outputs.dim() != 2:
        return 0
    return int((outputs.argmax(dim=1) == targets).sum())


def evaluate(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    loss_fn: LossFunction = F.cross_entropy,
    batch_size: int = 512,
) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` on a data set, without gradients and in eval mode.

    The model's training/eval mode is restored afterwards, also when it raises.

    Returns:
        ``(loss, accuracy)``; the accuracy is ``nan`` when ``targets`` are not class labels.
    """
    total_loss, correct = 0.0, 0
    with evaluation_mode(model):
        for start in range(0, len(inputs), batch_size):
            x, y = inputs[start : start + batch_size], targets[start : start + batch_size]
            outputs = model(x)
            total_loss += float(loss_fn(outputs, y)) * len(x)
            correct += _correct(outputs, y)
    accuracy = correct / len(inputs) if targets.dtype == torch.long else math.nan
    return total_loss / len(inputs), accuracy


Step = Callable[[Tensor, Tensor], tuple[float, Tensor]]
"""One update on a mini-batch ``(x, y)``: returns the batch's mean loss and the outputs it computed."""

Assess = Callable[[Tensor, Tensor], tuple[float, float]]
"""Loss and accuracy of the current model on a whole data set ``(x, y)``, without updating it."""


def _check_loop_arguments(epochs: int, batch_size: int, data: DataSplits) -> None:
    positive_integers(epochs=epochs, batch_size=batch_size)
    if len(data.x_train) == 0:
        raise ValueError("data has an empty training set")


def train_epochs(
    step: Step,
    assess: Assess,
    data: DataSplits,
    epochs: int,
    *,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> History:
    """The mini-batch loop behind :func:`fit`, for models that update themselves.

    Each epoch visits the training set once in an order drawn from a generator seeded with
    ``seed + epoch`` (the global random state is untouched), calls ``step(x, y)`` on every mini-batch,
    then ``assess(data.x_test, data.y_test)``. :func:`fit` uses it with an autograd step;
    :meth:`revlib.backprop.MLP.train_sgd` with the hand-written backward pass, so that both see the same
    batches in the same order.

    Raises:
        ValueError: ``epochs`` or ``batch_size`` is not positive, or the training set is empty.
    """
    _check_loop_arguments(epochs, batch_size, data)
    from tqdm import tqdm

    history = History()
    samples = len(data.x_train)
    device = data.x_train.device
    bar = tqdm(total=epochs * math.ceil(samples / batch_size), disable=not progress, file=sys.stderr, unit="step")
    for epoch in range(epochs):
        order = torch.randperm(samples, generator=torch.Generator().manual_seed(seed + epoch)).to(device)
        total_loss, correct = 0.0, 0
        for start in range(0, samples, batch_size):
            batch = order[start : start + batch_size]
            x, y = data.x_train[batch], data.y_train[batch]
            batch_loss, outputs = step(x, y)
            total_loss += batch_loss * len(batch)
            correct += _correct(outputs, y)
            bar.update()
            bar.set_postfix(epoch=epoch + 1, loss=f"{batch_loss:.3f}", refresh=False)
        history.train_loss.append(total_loss / samples)
        history.train_accuracy.append(correct / samples if data.y_train.dtype == torch.long else math.nan)
        test_loss, test_accuracy = assess(data.x_test, data.y_test)
        history.test_loss.append(test_loss)
        history.test_accuracy.append(test_accuracy)
    bar.close()
    return history


def fit(
    model: nn.Module,
    data: DataSplits,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    *,
    batch_size: int = 64,
    loss_fn: LossFunction = F.cross_entropy,
    seed: int = 0,
    progress: bool = True,
    device: torch.device | str | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> History:
    """Train ``model`` on ``data.x_train`` with mini-batches and record a :class:`History`.

    Every mini-batch makes one step: ``loss_fn(model(x), y).backward()``, then ``optimizer.step()`` and,
    when given, ``scheduler.step()``; the batches are drawn as in :func:`train_epochs`.

    Args:
        model: the network; moved to ``device``.
        data: the data set; moved to ``device`` if it lives elsewhere.
        optimizer: an optimiser over ``model``'s parameters.
        epochs: number of passes over the training set.
        batch_size: mini-batch size (the last batch of an epoch may be smaller).
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar mean loss.
        seed: seed of the shuffling order.
        progress: show a ``tqdm`` progress bar (on standard error) with the running loss.
        device: where to train (``None``: the data's device).
        scheduler: a learning-rate schedule of ``optimizer``, stepped after every optimiser step (so a
            schedule over the whole run spans ``epochs * ceil(len(x_train) / batch_size)`` steps).

    Raises:
        ValueError: ``epochs`` or ``batch_size`` is not positive, or the training set is empty.
        TypeError: ``scheduler`` is not a learning-rate scheduler of ``optimizer``.
    """
    _check_loop_arguments(epochs, batch_size, data)
    if scheduler is not None and getattr(scheduler, "optimizer", None) is not optimizer:
        raise TypeError("scheduler must be a torch.optim.lr_scheduler scheduler built on the optimizer passed to fit")
    device = data.x_train.device if device is None else resolve_device(device)
    model.to(device)
    if data.x_train.device != device:
        data = data.to(device)

    def step(x: Tensor, y: Tensor) -> tuple[float, Tensor]:
        optimizer.zero_grad(set_to_none=True)
        outputs = model(x)
        loss = loss_fn(outputs, y)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        return loss.item(), outputs.detach()

    def assess(x: Tensor, y: Tensor) -> tuple[float, float]:
        return evaluate(model, x, y, loss_fn=loss_fn)

    model.train()
    return train_epochs(step, assess, data, epochs, batch_size=batch_size, seed=seed, progress=progress)


def make_optimizer(name: str, parameters: Iterable[Tensor], learning_rate: float = 0.01) -> torch.optim.Optimizer:
    """``"sgd"`` (no state), ``"momentum"`` (SGD with momentum 0.9: one buffer per parameter) or ``"adam"``
    (two moments per parameter and a step count per parameter).

    Raises:
        ValueError: an unknown name (the message lists ``OPTIMIZERS``).
    """
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=learning_rate)
    if name == "momentum":
        return torch.optim.SGD(parameters, lr=learning_rate, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(parameters, lr=learning_rate)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def training_step(model: nn.Module, inputs: Tensor, targets: Tensor, optimizer: torch.optim.Optimizer, *,
                  micro_batches: int = 1) -> None:
    r"""One step of training: ``zero_grad``, cross-entropy of ``model(inputs)``, backward, ``optimizer.step()``.

    The gradients are released first (``set_to_none``), as a training loop's ``zero_grad()`` does, so a
    step allocates its gradients anew while its activations are freed. With ``micro_batches`` :math:`k > 1`
    the batch is split into :math:`k` parts :math:`B_j` (``tensor_split``), each run forward and backward
    on its own with its loss weighted by :math:`|B_j|/|B|`, the gradients accumulating:
    :math:`\sum_j \frac{|B_j|}{|B|} \nabla L_{B_j} = \nabla L_B` for a mean loss of per-example terms, so
    the step is the full batch's — unless the model couples the examples (BatchNorm normalises each part
    by its own statistics). Only one part's activations are alive at a time (chapter 07).

    Raises:
        ValueError: ``micro_batches`` not between 1 and the batch size.
    """
    if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or not 1 <= micro_batches <= len(inputs):
        raise ValueError(f"micro_batches must be an integer from 1 to the batch size {len(inputs)}, got {micro_batches!r}")
    optimizer.zero_grad(set_to_none=True)
    if micro_batches == 1:
        F.cross_entropy(model(inputs), targets).backward()
    else:
        for part, labels in zip(inputs.tensor_split(micro_batches), targets.tensor_split(micro_batches)):
            (F.cross_entropy(model(part), labels) * (len(part) / len(inputs))).backward()
    optimizer.step()


def gradient_descent_(model: nn.Module, inputs: Tensor, targets: Tensor, *, steps: int, learning_rate: float) -> list[float]:
    r"""Fit ``model(inputs)`` to ``targets`` by full-batch gradient descent, in place, and return the losses.

    The loss is :math:`\mathcal L = \frac1{2B} \sum_{b=1}^{B} \lVert \text{model}(x_b) - y_b \rVert^2` over the
    :math:`B` rows of ``inputs`` and ``targets``; each of the ``steps`` steps is
    :math:`\theta \leftarrow \theta - \eta\, \partial\mathcal L/\partial\theta` (``torch.optim.SGD`` without
    momentum or weight decay) on all parameters that require grad. This is the setting of Sander, Ablin
    and Peyré's theorem on linear ResNets (:func:`revlib.adjoint.linear_residuals`). It runs in one thread: for tensors
    of a few hundred numbers, threads only add synchronisation.

    Args:
        model: the network, e.g. an :class:`~revlib.adjoint.ODEResNet` (an adjoint one trains on its
            adjoint gradients).
        inputs: ``(B, ...)``.
        targets: ``(B, ...)``, the shape of ``model(inputs)``.
        steps: how many gradient steps.
        learning_rate: :math:`\eta`.

    Returns:
        ``steps + 1`` losses: before each step, and after the last.

    Raises:
        ValueError: ``steps`` is not a positive integer, ``learning_rate`` is not positive, or the model has
            no parameter that requires grad.
    """
    positive_integers(steps=steps)
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate!r}")
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError("the model has no parameter that requires grad")
    optimizer = torch.optim.SGD(parameters, lr=learning_rate)

    def loss() -> Tensor:
        return 0.5 * (model(inputs) - targets).pow(2).reshape(len(targets), -1).sum(dim=1).mean()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        losses = []
        for _ in range(steps):
            optimizer.zero_grad()
            value = loss()
            value.backward()
            optimizer.step()
            losses.append(value.item())
        with torch.no_grad():
            losses.append(loss().item())
    finally:
        torch.set_num_threads(threads)
    return losses
