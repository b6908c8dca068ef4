r"""Every way of paying the memory bill, measured on one training step: the memory/compute frontier.

For one family of residual functions :math:`f_n` (``"mlp"``: Linear → tanh → Linear on ``width``
features; ``"conv"``: the pre-activation convolutions of :func:`revlib.reversible.conv_residual` on
``width`` channels of 8×8 images), :func:`frontier` builds one network per method, each a stem, a stack
of ``depth`` blocks and a linear head, and runs one training step (cross-entropy on the digits, then one
optimiser step) under each:

* ``backprop`` — residual blocks :math:`x + f_n(x)` with ordinary autograd;
* ``checkpoint every``, ``checkpoint sqrt``, ``revolve-s`` — the same blocks in a
  :class:`~revlib.checkpoint.CheckpointedSequence` (two budgets :math:`s`);
* ``offload`` — the same blocks, saved tensors in host memory (CUDA only);
* ``reversible`` — additive coupling of two functions on half the width each
  (:class:`~revlib.reversible.ReversibleSequence`);
* ``momentum`` — :class:`~revlib.momentum.MomentumSequence` over the functions;
* ``adjoint euler``, ``adjoint heun`` — :class:`~revlib.adjoint.ODEResNet` with the adjoint backward pass.

Each row splits the step's memory into parameters, gradients, optimiser state and the activations saved for
backward, and gives the measured peak (:func:`revlib.measure.peak_memory`), the median time of the step
(methods timed in turns), the relative gradient error against exact backprop through the *same* network,
and the evaluations of the residual functions per function beyond the forward pass (recomputation).

Command line: ``python -m revlib.frontier --family conv --depth 16 --width 32 --batch 64``.
"""

from __future__ import annotations

import argparse
import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from revlib.adjoint import ODEResNet
from revlib.checkpoint import CheckpointedSequence, Offloaded
from revlib.data import load_digits
from revlib.measure import compare_times, count_calls, peak_memory, saved_tensor_bytes
from revlib.momentum import MomentumSequence
from revlib.residual import SkipBlock
from revlib.reversible import ReversibleBlock, ReversibleSequence, conv_residual
from revlib.runtime import resolve_device
from revlib.verify import relative_error

FAMILIES = ("mlp", "conv")
OPTIMIZERS = ("sgd", "momentum", "adam")


@dataclass(frozen=True)
class FrontierRow:
    """One method's training step. Bytes are exact counts except ``peak``; ``seconds`` is a median.

    ``peak`` is :func:`revlib.measure.peak_memory` of the step: the most memory it held *beyond* what was
    resident before it (the parameters were). It is a maximum over time, not a sum: activations are freed
    during the backward pass while gradients appear, and the optimiser's state is created after that, so
    ``peak`` can be smaller than ``parts``. ``gradient_error`` is measured at the initial weights, before any
    step.
    """

    method: str
    parameters: int
    gradients: int
    optimizer_state: int
    activations: int
    peak: int
    seconds: float
    gradient_error: float
    recomputations: float

    @property
    def parts(self) -> int:
        """Parameters, gradients, optimiser state and saved activations together."""
        return self.parameters + self.gradients + self.optimizer_state + self.activations


@dataclass
class MethodNetwork:
    """One method's classifier, its exact twin and its residual functions.

    Attributes:
        model: stem → the method's stack → head.
        exact: the same modules (shared, so the same weights) differentiated by ordinary backprop: the
            reference of the gradient error.
        functions: the residual functions, whose evaluations count the recomputation.
    """

    model: nn.Module
    exact: nn.Module
    functions: list[nn.Module]

    def gradient_error(self, inputs: Tensor, targets: Tensor) -> float:
        r"""The relative error :math:`\lVert g - g^\star \rVert / \lVert g^\star \rVert` of the method's parameter
        gradient :math:`g` of the cross-entropy against :attr:`exact`'s :math:`g^\star`, at the current weights."""
        return relative_error(_gradients(self.model, inputs, targets), _gradients(self.exact, inputs, targets))


def residual_function(family: str, width: int) -> nn.Module:
    """One shape-preserving residual function of ``family`` on ``width`` features or channels.

    Raises:
        ValueError: an unknown family or a width below 2.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if not isinstance(width, int) or width < 2:
        raise ValueError(f"width must be an integer of at least 2, got {width!r}")
    if family == "mlp":
        return nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))
    return conv_residual(width)


def _classifier(family: str, width: int, stack: nn.Module) -> nn.Sequential:
    """stem → stack → head on the digits: 64 pixels (or 1×8×8 images) to 10 classes."""
    if family == "mlp":
        return nn.Sequential(nn.Linear(64, width), stack, nn.Linear(width, 10))
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), stack, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))


def methods(family: str, depth: int, width: int, device: torch.device | str | None = None) -> dict[str, Callable[[], MethodNetwork]]:
    """The methods, by name, each a builder of its :class:`MethodNetwork` (initialised from the current seed).

    ``offload`` is among them only on CUDA. ``device=None`` means :func:`revlib.runtime.default_device`.
    """
    device = resolve_device(device)

    def residual_blocks() -> tuple[list[nn.Module], list[nn.Module]]:
        functions = [residual_function(family, width) for _ in range(depth)]
        return [SkipBlock(f, residual=True) for f in functions], functions

    def blocks_in(wrap: Callable[[list[nn.Module]], nn.Module]) -> Callable[[], MethodNetwork]:
        def build() -> MethodNetwork:
            blocks, functions = residual_blocks()
            return MethodNetwork(wrap(blocks), nn.Sequential(*blocks), functions)
        return build

    def reversible() -> MethodNetwork:
        blocks = [ReversibleBlock(residual_function(family, width // 2), residual_function(family, width // 2)) for _ in range(depth)]
        return MethodNetwork(ReversibleSequence(*blocks), nn.Sequential(*blocks), [f for block in blocks for f in (block.f, block.g)])

    def momentum() -> MethodNetwork:
        functions = [residual_function(family, width) for _ in range(depth)]
        return MethodNetwork(MomentumSequence(*functions), MomentumSequence(*functions, memory_free=False), functions)

    def adjoint(scheme: str) -> Callable[[], MethodNetwork]:
        def build() -> MethodNetwork:
            functions = [residual_function(family, width) for _ in range(depth)]
            return MethodNetwork(ODEResNet(functions, scheme=scheme, gradient="adjoint"),  # type: ignore[arg-type]
                            ODEResNet(functions, scheme=scheme, gradient="backprop"), functions)  # type: ignore[arg-type]
        return build

    budgets = sorted({2, max(2, math.ceil(math.log2(depth)))})
    stacks: dict[str, Callable[[], MethodNetwork]] = {
        "backprop": blocks_in(lambda blocks: nn.Sequential(*blocks)),
        "checkpoint every": blocks_in(lambda blocks: CheckpointedSequence(*blocks, schedule="every")),
        "checkpoint sqrt": blocks_in(lambda blocks: CheckpointedSequence(*blocks, schedule="sqrt")),
        **{f"revolve-{s}": blocks_in(lambda blocks, s=s: CheckpointedSequence(*blocks, schedule="revolve", slots=s)) for s in budgets},
        "reversible": reversible,
        "momentum": momentum,
        "adjoint euler": adjoint("euler"),
        "adjoint heun": adjoint("heun"),
    }
    if device.type == "cuda":
        stacks["offload"] = blocks_in(lambda blocks: Offloaded(*blocks))

    def classified(build: Callable[[], MethodNetwork]) -> Callable[[], MethodNetwork]:
        def build_classifier() -> MethodNetwork:
            network = build()
            model = _classifier(family, width, network.model).to(device)
            exact = nn.Sequential(*(network.exact if module is network.model else module for module in model)).to(device)
            return MethodNetwork(model, exact, network.functions)
        return build_classifier

    return {name: classified(build) for name, build in stacks.items()}


def make_optimizer(name: str, parameters: Iterable[Tensor], learning_rate: float = 0.01) -> torch.optim.Optimizer:
    """``"sgd"`` (no state), ``"momentum"`` (SGD with momentum 0.9: one buffer per parameter) or ``"adam"`` (two).

    Raises:
        ValueError: an unknown name.
    """
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=learning_rate)
    if name == "momentum":
        return torch.optim.SGD(parameters, lr=learning_rate, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(parameters, lr=learning_rate)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def training_step(model: nn.Module, inputs: Tensor, targets: Tensor, optimizer: str) -> torch.optim.Optimizer:
    """One step: a fresh optimiser, cross-entropy, backward, the optimiser's update. Returns the optimiser."""
    step = make_optimizer(optimizer, model.parameters())
    step.zero_grad()
    F.cross_entropy(model(inputs), targets).backward()
    step.step()
    return step


def first_training_step(model: nn.Module, inputs: Tensor, targets: Tensor, optimizer: str) -> None:
    """:func:`training_step`, then the gradients released (``.grad`` set to ``None``), as a training loop's
    ``zero_grad()`` releases them before the next step: what the step allocates (its activations, its
    gradients, a fresh optimiser's state) is then allocated inside it every time it runs, and a
    measurement of its peak (:func:`revlib.measure.peak_memory` calls it twice) sees all of it."""
    training_step(model, inputs, targets, optimizer)
    model.zero_grad(set_to_none=True)


@dataclass(frozen=True)
class StepMemory:
    """The memory bill of one training step (:func:`training_step`), in bytes.

    ``parameters``, ``gradients``, ``optimizer_state`` (after the step) and ``activations`` (saved for
    backward by the forward pass and the loss, the batch and targets among them, the parameters not) are
    exact counts. ``peak`` is
    measured (:func:`revlib.measure.peak_memory` of :func:`first_training_step`): the most the step held
    beyond what was resident before it, the parameters and the batch, with its gradients and a fresh
    optimiser's state allocated inside it, as on a first step.
    """

    parameters: int
    gradients: int
    optimizer_state: int
    activations: int
    peak: int

    @property
    def parts(self) -> int:
        """The naive bill, parameters, gradients, optimiser state and saved activations together."""
        return self.parameters + self.gradients + self.optimizer_state + self.activations

    @property
    def floor(self) -> int:
        """What the step must hold at once at some moment beyond the parameters. That is all saved activations at the
        end of the forward pass, or the gradients and the optimiser state during the update. The activations
        are freed during the backward pass as the gradients appear, so the peak sits between ``floor`` and
        ``activations + gradients + optimizer_state`` (plus the backward pass's temporaries), not at their sum."""
        return max(self.activations, self.gradients + self.optimizer_state)


def step_memory(model: nn.Module, inputs: Tensor, targets: Tensor, optimizer: str = "adam") -> StepMemory:
    """The memory bill of one :func:`training_step` of ``model`` on a batch, counted and measured.

    The model is left as one step of ``optimizer`` left it (its ``.grad`` fields set).

    Raises:
        ValueError: an unknown optimiser.
    """
    make_optimizer(optimizer, [torch.zeros(1, requires_grad=True)])  # checks the name
    parameters = [p for p in model.parameters() if p.requires_grad]
    activations = saved_tensor_bytes(lambda: F.cross_entropy(model(inputs), targets), exclude=parameters)
    peak = peak_memory(first_training_step, model, inputs, targets, optimizer)
    state = training_step(model, inputs, targets, optimizer).state
    return StepMemory(
        parameters=_bytes(parameters),
        gradients=_bytes(p.grad for p in parameters if p.grad is not None),
        optimizer_state=_bytes(value for entry in state.values() for value in entry.values() if isinstance(value, Tensor) and value.dim() > 0),
        activations=activations,
        peak=peak,
    )


def _gradients(model: nn.Module, inputs: Tensor, targets: Tensor) -> list[Tensor]:
    model.zero_grad()
    F.cross_entropy(model(inputs), targets).backward()
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def _bytes(tensors: Iterable[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def frontier(family: str = "conv", depth: int = 16, width: int = 32, batch: int = 64, *, optimizer: str = "adam",
             device: torch.device | str | None = None, repeats: int = 3, seed: int = 0, progress: bool = True) -> list[FrontierRow]:
    """One training step of every method on ``batch`` digits; a :class:`FrontierRow` per method.

    The gradient error is measured first, at the weights every method starts from; the timing and the
    memory measurement then take optimiser steps, which move the weights (and, for the invertible networks,
    how much rounding the rebuilt activations carry), so their own errors would depend on ``repeats``.

    Args:
        family: ``"mlp"`` or ``"conv"`` residual functions.
        depth: blocks in the stack.
        width: features (mlp) or channels (conv) inside the stack; even, so that the reversible halves exist.
        batch: digits in the step.
        optimizer: ``"sgd"``, ``"momentum"`` or ``"adam"``.
        device: where to run (``None``: :func:`revlib.runtime.default_device`).
        repeats: rounds of the timing (methods timed in turns).
        seed: initialises every method's network alike.
        progress: show a progress bar over the methods.

    Raises:
        ValueError: an unknown family or optimiser, a size that is not positive, or an odd width.
    """
    for name, value in (("depth", depth), ("width", width), ("batch", batch), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if width % 2:
        raise ValueError(f"width must be even (the reversible blocks split it in halves), got {width}")
    make_optimizer(optimizer, [torch.zeros(1, requires_grad=True)])  # checks the name
    device = resolve_device(device)
    digits = load_digits(flat=family == "mlp", device=device)
    inputs, targets = digits.x_train[:batch].clone(), digits.y_train[:batch].clone()
    networks = {}
    with torch.random.fork_rng(devices=[]):  # the networks are built on the CPU; the caller's stream is left alone
        for name, build in methods(family, depth, width, device).items():
            torch.default_generator.manual_seed(seed)
            networks[name] = build()
    errors = {name: network.gradient_error(inputs, targets) for name, network in networks.items()}  # before the timed steps train them
    steps = {name: functools.partial(training_step, network.model, inputs, targets, optimizer) for name, network in networks.items()}
    times = {name: timing.median for name, timing in compare_times(steps, repeats=repeats, device=device).items()}
    rows = []
    for name, network in tqdm(networks.items(), desc="frontier", disable=not progress):
        model = network.model
        calls = count_calls(network.functions, _gradients, model, inputs, targets)
        memory = step_memory(model, inputs, targets, optimizer)
        rows.append(FrontierRow(
            method=name,
            parameters=memory.parameters,
            gradients=memory.gradients,
            optimizer_state=memory.optimizer_state,
            activations=memory.activations,
            peak=memory.peak,
            seconds=times[name],
            gradient_error=errors[name],
            recomputations=calls / len(network.functions) - 1,
        ))
    return rows


def format_table(rows: list[FrontierRow]) -> str:
    """The rows as a text table: MiB, milliseconds, errors and recomputations per function."""
    lines = [f"{'method':>16} {'params':>8} {'grads':>8} {'optim':>8} {'activ':>8} {'sum':>8} {'peak':>8} {'ms':>8} "
             f"{'grad err':>9} {'recomp':>7}"]
    for row in rows:
        mib = [value / 2**20 for value in (row.parameters, row.gradients, row.optimizer_state, row.activations, row.parts, row.peak)]
        lines.append(f"{row.method:>16} " + " ".join(f"{value:8.2f}" for value in mib)
                     + f" {row.seconds * 1e3:8.1f} {row.gradient_error:9.1e} {row.recomputations:7.2f}")
    return "\n".join(lines)


def main(arguments: list[str] | None = None) -> None:
    """``python -m revlib.frontier``: print the frontier table for one model family and size."""
    parser = argparse.ArgumentParser(description="One training step under every memory-saving method: memory, time, gradient error.")
    parser.add_argument("--family", choices=FAMILIES, default="conv")
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: revlib's default device)")
    parser.add_argument("--repeats", type=int, default=3)
    options = parser.parse_args(arguments)
    rows = frontier(options.family, options.depth, options.width, options.batch, optimizer=options.optimizer,
                    device=options.device, repeats=options.repeats)
    print(f"{options.family}, {options.depth} blocks, width {options.width}, batch {options.batch}, {options.optimizer}; MiB unless stated")
    print(format_table(rows))


if __name__ == "__main__":
    main()
