r"""Every way of paying the memory bill, measured on one training step: the memory/compute frontier.

For one family of residual functions :math:`f_n` (``"mlp"``: Linear → tanh → Linear on ``width``
features; ``"conv"``: the pre-activation convolutions of :func:`revlib.blocks.conv_residual` on
``width`` channels of 8×8 images; ``"transformer"``: a GPT-2 block, :func:`revlib.blocks.transformer_residual`,
on the digits' eight rows as a sequence of eight tokens of ``width`` features, heads of 16 features),
:func:`frontier` builds one network per method, each a stem, a stack of ``depth`` blocks and a linear head, and runs one training step (cross-entropy on the digits, then one
optimiser step) under each:

* ``backprop`` — residual blocks :math:`x + f_n(x)` with ordinary autograd;
* ``checkpoint every``, ``checkpoint sqrt``, ``revolve-s`` — the same blocks in a
  :class:`~revlib.checkpoint.CheckpointedSequence` (two budgets :math:`s`);
* ``offload`` — the same blocks, saved tensors in host memory (CUDA only);
* ``reversible`` — additive coupling of two functions on half the width each, widening to ``width``
  inside (:class:`~revlib.reversible.ReversibleSequence`), so that a block has the weights and
  multiply-adds of one residual function (its hidden biases aside; for the transformer, the two attention
  halves hold half the weights of one on the whole width, and the feed-forward halves widen to
  ``5 * width`` to make up for it: :math:`12 d^2` weights per block, as GPT-2's);
* ``momentum`` — :class:`~revlib.momentum.MomentumSequence` over the functions;
* ``adjoint euler``, ``adjoint heun`` — :class:`~revlib.adjoint.ODEResNet` with the adjoint backward pass;
* ``reversible heun`` — :class:`~revlib.reversible_heun.ReversibleHeunResNet` over the same ``depth``
  functions (``depth − 1`` steps), exact gradients from the final states.

With ``pytorch=True``, PyTorch's own tools (:mod:`revlib.pytorch_tools`) on the same residual blocks:

* ``torch every`` — ``torch.utils.checkpoint.checkpoint`` around every block;
* ``torch sequential`` — ``checkpoint_sequential`` with as many segments as the ``sqrt`` schedule has
  (:math:`\lceil\sqrt N\,\rceil`), its last segment not checkpointed, as PyTorch runs it;
* ``SAC matmuls``, ``SAC matmul+norm`` — selective activation checkpointing of every block, keeping the
  convolutions' (matrix products') outputs, and the normalisations' too;
* ``compile b`` for each ``b`` in ``budgets`` — the plain classifier under ``torch.compile`` with the
  partitioner's activation memory budget ``b`` (:class:`~revlib.pytorch_tools.BudgetCompiled`);
* ``bf16 autocast`` — the plain classifier under bfloat16 autocast;
* ``micro-batch 4`` — the plain classifier, the batch in four parts with the gradients accumulated.

With ``combined=True``, the two that change the step rather than the stack on top of three of revlib's
methods: ``checkpoint every + bf16``, ``checkpoint sqrt + bf16``, ``reversible + bf16`` (the method's
classifier under bfloat16 autocast) and the same three ``+ micro-batch 4``.

Each row gives the memory of a steady-state step by category, measured by PyTorch's memory profiler
(:func:`revlib.measure.step_memory`: parameters, gradients, optimiser state, activations, the temporaries
at the peak, and the peak), the median time of the step
(methods timed in turns), the relative gradient error against exact backprop through the *same* network,
and the evaluations of the residual functions per function beyond the forward pass (recomputation).

This module is the capstone: it imports every idea and nothing imports it. ``benchmarks/frontier.py`` prints
its table from the command line.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from revlib._checks import positive_integers
from revlib.adjoint import ODEResNet
from revlib.blocks import ResidualBlock, conv_residual, mlp_residual, transformer_residual
from revlib.checkpoint import CheckpointedSequence
from revlib.data import load_digits
from revlib.measure import StepMemory, compare_times, count_calls, step_memory
from revlib.momentum import MomentumSequence
from revlib.pytorch_tools import Autocast, BudgetCompiled, Offloaded, SelectiveCheckpointed, TorchCheckpointed
from revlib.reversible import ReversibleBlock, ReversibleSequence
from revlib.reversible_heun import ReversibleHeunResNet
from revlib.runtime import resolve_device
from revlib.training import make_optimizer, training_step
from revlib.verify import relative_error

__all__ = ["FAMILIES", "FrontierRow", "MethodNetwork", "format_ratios", "format_table", "frontier", "methods", "residual_function"]

FAMILIES = ("mlp", "conv", "transformer")


@dataclass(frozen=True)
class FrontierRow:
    """One method's training step: its memory bill (:class:`revlib.measure.StepMemory`, measured by category on
    a steady-state step), the median time of the step, the relative gradient error against exact backprop
    through the same network (at the initial weights, before any step) and the evaluations of each residual
    function beyond the forward pass."""

    method: str
    memory: StepMemory
    seconds: float
    gradient_error: float
    recomputations: float


@dataclass
class MethodNetwork:
    """One method's classifier, its exact twin and its residual functions.

    Attributes:
        model: stem → the method's stack → head.
        exact: the same modules (shared, so the same weights) differentiated by ordinary backprop: the
            reference of the gradient error.
        functions: the residual functions, whose evaluations count the recomputation (empty where a
            compiled graph runs them, out of reach of module hooks).
        micro_batches: the parts of the batch whose gradients a training step accumulates (1: the whole).
    """

    model: nn.Module
    exact: nn.Module
    functions: list[nn.Module]
    micro_batches: int = 1

    def gradient_error(self, inputs: Tensor, targets: Tensor) -> float:
        r"""The relative error :math:`\lVert g - g^\star \rVert / \lVert g^\star \rVert` of the method's parameter
        gradient :math:`g` of the cross-entropy (accumulated over :attr:`micro_batches` parts) against
        :attr:`exact`'s :math:`g^\star` on the whole batch, at the current weights."""
        return relative_error(_gradients(self.model, inputs, targets, self.micro_batches), _gradients(self.exact, inputs, targets))


def _check_norm(family: str, norm: str | None) -> None:
    if family == "conv" and norm not in (None, "batch", "group"):
        raise ValueError(f"norm must be None, 'batch' or 'group' for the conv family, got {norm!r}")
    if family != "conv" and norm is not None:
        raise ValueError(f"norm chooses the conv family's normalisation; the {family} family's residual "
                         f"functions have none to choose, so norm must be None, got {norm!r}")


def residual_function(family: str, width: int, hidden: int | None = None, *, norm: str | None = None) -> nn.Module:
    """One shape-preserving residual function of ``family`` on ``width`` features or channels, with ``hidden``
    features or channels between its two layers (``width`` when ``None``; for ``"transformer"`` the
    feed-forward sublayer's, ``4 * width`` when ``None``, with one attention head per 16 features).
    ``norm`` chooses the ``"conv"`` family's normalisation, ``"batch"`` (``None``: the default) or
    ``"group"`` (:func:`~revlib.blocks.conv_residual`); the other families have none to choose (``"mlp"``: no
    normalisation; ``"transformer"``: LayerNorm), so ``norm`` must be ``None`` for them.

    Raises:
        ValueError: an unknown family, a width that is not a positive integer, or a ``norm`` other than
            those.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    _check_norm(family, norm)
    if family == "transformer":
        return transformer_residual(width, max(1, width // 16), hidden)
    return mlp_residual(width, hidden) if family == "mlp" else conv_residual(width, hidden, norm=norm or "batch")


class _RowTokens(nn.Module):
    """Images ``(B, 1, H, W)`` as sequences of ``H`` tokens, one row of ``W`` pixels each: ``(B, H, W)``."""

    def forward(self, images: Tensor) -> Tensor:
        return images.flatten(1, 2)


class _TokenMean(nn.Module):
    """The mean over the tokens of ``(B, T, D)``: ``(B, D)``."""

    def forward(self, tokens: Tensor) -> Tensor:
        return tokens.mean(dim=1)


def _classifier(family: str, width: int, stack: nn.Module, inputs: int, classes: int) -> nn.Sequential:
    """stem → stack → head: ``inputs`` features (image channels for ``"conv"``, pixels per row for
    ``"transformer"``) to ``classes``."""
    if family == "mlp":
        return nn.Sequential(nn.Linear(inputs, width), stack, nn.Linear(width, classes))
    if family == "transformer":
        return nn.Sequential(_RowTokens(), nn.Linear(inputs, width), stack, nn.LayerNorm(width), _TokenMean(), nn.Linear(width, classes))
    return nn.Sequential(nn.Conv2d(inputs, width, 3, padding=1), stack, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes))


def methods(family: str, depth: int, width: int, device: torch.device | str | None = None, *, inputs: int | None = None,
            classes: int = 10, pytorch: bool = False, combined: bool = False,
            budgets: Sequence[float] = (), norm: str | None = None,
            compile_backend: str = "aot_eager_decomp_partition") -> dict[str, Callable[[], MethodNetwork]]:
    """The methods, by name, each a builder of its :class:`MethodNetwork` (initialised from the current seed).

    The classifiers take ``inputs`` features (``"mlp"``; 64 by default, the flat digits), image channels
    (``"conv"``; 1 by default) or pixels per row (``"transformer"``; 8 by default) and give ``classes``
    scores. ``offload`` is among them only on CUDA.
    ``device=None`` means :func:`revlib.runtime.default_device`. ``pytorch=True`` adds PyTorch's tools
    (the module's docstring lists them), ``combined=True`` bfloat16 autocast and micro-batching on top of
    revlib's checkpointing and reversible stacks, ``budgets`` the compiled classifiers, one per activation
    memory budget in [0, 1], compiled with ``compile_backend`` (:class:`~revlib.pytorch_tools.BudgetCompiled`;
    ``"inductor"`` where a C++ compiler is at hand). ``norm`` chooses the ``"conv"`` family's normalisation
    in every residual function (:func:`residual_function`; ``"SAC matmul+norm"`` keeps the outputs of either
    kind).

    Raises:
        ValueError: an unknown family or norm, or a budget outside [0, 1].
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    for budget in budgets:
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 <= budget <= 1:
            raise ValueError(f"every budget must be a number in [0, 1], got {budget!r}")
    inputs = {"mlp": 64, "conv": 1, "transformer": 8}[family] if inputs is None else inputs
    device = resolve_device(device)
    _check_norm(family, norm)

    def function(width: int = width, hidden: int | None = None) -> nn.Module:
        return residual_function(family, width, hidden, norm=norm)

    def residual_blocks() -> tuple[list[nn.Module], list[nn.Module]]:
        functions = [function() for _ in range(depth)]
        return [ResidualBlock(f) for f in functions], functions

    def blocks_in(wrap: Callable[[list[nn.Module]], nn.Module]) -> Callable[[], MethodNetwork]:
        def build() -> MethodNetwork:
            blocks, functions = residual_blocks()
            return MethodNetwork(wrap(blocks), nn.Sequential(*blocks), functions)
        return build

    def reversible() -> MethodNetwork:
        # F and G on the halves, widening inside: together the weights and multiply-adds of one residual
        # function on the whole width (the biases of the hidden layer aside). For the transformer two
        # half-width attentions hold 2 (d/2)^2 · 4 = 2d^2 weights against one's 4d^2, so the feed-forward
        # halves widen to 5d (2 · d · 5d = 10d^2) for GPT-2's 12d^2 per block
        hidden = 5 * width if family == "transformer" else width
        dim = -1 if family == "transformer" else 1  # the features of (B, T, D) tokens, the channels or features else
        blocks = [ReversibleBlock(function(width // 2, hidden), function(width // 2, hidden), dim=dim)
                  for _ in range(depth)]
        return MethodNetwork(ReversibleSequence(*blocks), nn.Sequential(*blocks), [f for block in blocks for f in (block.f, block.g)])

    def momentum() -> MethodNetwork:
        functions = [function() for _ in range(depth)]
        return MethodNetwork(MomentumSequence(*functions), MomentumSequence(*functions, memory_saving=False), functions)

    def reversible_heun() -> MethodNetwork:
        functions = [function() for _ in range(depth)]  # N + 1 functions: depth − 1 steps
        return MethodNetwork(ReversibleHeunResNet(*functions), ReversibleHeunResNet(*functions, memory_saving=False), functions)

    def adjoint(scheme: str) -> Callable[[], MethodNetwork]:
        def build() -> MethodNetwork:
            functions = [function() for _ in range(depth)]
            return MethodNetwork(ODEResNet(*functions, scheme=scheme),  # type: ignore[arg-type]
                                 ODEResNet(*functions, scheme=scheme, memory_saving=False), functions)  # type: ignore[arg-type]
        return build

    slots = sorted({2, max(2, math.ceil(math.log2(depth)))})
    stacks: dict[str, Callable[[], MethodNetwork]] = {
        "backprop": blocks_in(lambda blocks: nn.Sequential(*blocks)),
        "checkpoint every": blocks_in(lambda blocks: CheckpointedSequence(*blocks, schedule="every")),
        "checkpoint sqrt": blocks_in(lambda blocks: CheckpointedSequence(*blocks, schedule="sqrt")),
        **{f"revolve-{s}": blocks_in(lambda blocks, s=s: CheckpointedSequence(*blocks, schedule="revolve", slots=s)) for s in slots},
        "reversible": reversible,
        "momentum": momentum,
        "adjoint euler": adjoint("euler"),
        "adjoint heun": adjoint("heun"),
        "reversible heun": reversible_heun,
    }
    if device.type == "cuda":
        stacks["offload"] = blocks_in(lambda blocks: Offloaded(*blocks))
    if pytorch:
        segments = math.ceil(depth / math.ceil(depth / math.ceil(math.sqrt(depth))))  # the sqrt schedule's
        stacks["torch every"] = blocks_in(lambda blocks: TorchCheckpointed(*blocks))
        stacks["torch sequential"] = blocks_in(lambda blocks: TorchCheckpointed(*blocks, segments=segments))
        stacks["SAC matmuls"] = blocks_in(lambda blocks: SelectiveCheckpointed(*blocks, policy="matmuls"))
        stacks["SAC matmul+norm"] = blocks_in(lambda blocks: SelectiveCheckpointed(*blocks, policy="matmuls and norms"))

    def classified(build: Callable[[], MethodNetwork]) -> Callable[[], MethodNetwork]:
        def build_classifier() -> MethodNetwork:
            network = build()
            model = _classifier(family, width, network.model, inputs, classes).to(device)
            exact = nn.Sequential(*(network.exact if module is network.model else module for module in model)).to(device)
            return MethodNetwork(model, exact, network.functions)
        return build_classifier

    def whole(wrap: Callable[[nn.Module], nn.Module], micro_batches: int = 1, counted: bool = True) -> Callable[[], MethodNetwork]:
        def build_wrapped() -> MethodNetwork:  # the plain classifier, wrapped whole
            network = classified(stacks["backprop"])()
            return MethodNetwork(wrap(network.exact), network.exact, network.functions if counted else [], micro_batches)
        return build_wrapped

    built = {name: classified(build) for name, build in stacks.items()}
    if pytorch:
        built["bf16 autocast"] = whole(Autocast)
        built["micro-batch 4"] = whole(lambda model: model, micro_batches=4)
    for budget in budgets:
        built[f"compile {budget:g}"] = whole(lambda model, budget=budget: BudgetCompiled(model, budget, compile_backend), counted=False)

    def on_top(name: str, *, autocast: bool = False, micro_batches: int = 1) -> Callable[[], MethodNetwork]:
        def build_combined() -> MethodNetwork:
            network = built[name]()
            model = Autocast(network.model) if autocast else network.model
            return MethodNetwork(model, network.exact, network.functions, micro_batches)
        return build_combined

    if combined:
        for name in ("checkpoint every", "checkpoint sqrt", "reversible"):
            built[f"{name} + bf16"] = on_top(name, autocast=True)
            built[f"{name} + micro-batch 4"] = on_top(name, micro_batches=4)
    return built


def _gradients(model: nn.Module, inputs: Tensor, targets: Tensor, micro_batches: int = 1) -> list[Tensor]:
    model.zero_grad()
    for part, labels in zip(inputs.tensor_split(micro_batches), targets.tensor_split(micro_batches)):
        (F.cross_entropy(model(part), labels) * (len(part) / len(inputs))).backward()
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def frontier(family: str = "conv", depth: int = 16, width: int = 32, batch: int = 64, *, optimizer: str = "adam",
             device: torch.device | str | None = None, repeats: int = 3, seed: int = 0, progress: bool = True,
             pytorch: bool = False, combined: bool = False, budgets: Sequence[float] = (),
             only: Sequence[str] | None = None, compile_backend: str = "aot_eager_decomp_partition") -> list[FrontierRow]:
    """One training step of every method on ``batch`` digits; a :class:`FrontierRow` per method.

    The gradient error is measured first, at the weights every method starts from; the timing and the
    memory measurement then take optimiser steps, which move the weights (and, for the invertible networks,
    how much rounding the rebuilt activations carry), so their own errors would depend on ``repeats``.

    Args:
        family: ``"mlp"``, ``"conv"`` or ``"transformer"`` residual functions.
        depth: blocks in the stack.
        width: features (mlp, transformer) or channels (conv) inside the stack; even, so that the reversible
            halves exist.
        batch: digits in the step.
        optimizer: ``"sgd"``, ``"momentum"`` or ``"adam"``.
        device: where to run (``None``: :func:`revlib.runtime.default_device`).
        repeats: rounds of the timing (methods timed in turns).
        seed: initialises every method's network alike.
        progress: show a progress bar over the methods.
        pytorch: add PyTorch's tools on the same blocks (:func:`methods`).
        combined: add bfloat16 autocast and micro-batching on top of revlib's stacks (:func:`methods`).
        budgets: activation memory budgets of ``torch.compile``'s partitioner, one compiled row each (its
            recomputation is not counted: ``nan``).
        only: the methods to measure, by name and in this order (``None``: all that the options above
            build); the rows then hold only these.
        compile_backend: the ``torch.compile`` backend of the compiled rows (:func:`methods`).

    Raises:
        ValueError: an unknown family or optimiser, a size that is not positive, an odd width, a budget
            outside [0, 1], or a name in ``only`` that the options do not build (the message lists those
            they do).
    """
    positive_integers(depth=depth, width=width, batch=batch, repeats=repeats)
    if width % 2:
        raise ValueError(f"width must be even (the reversible blocks split it in halves), got {width}")
    make_optimizer(optimizer, [torch.zeros(1, requires_grad=True)])  # checks the name
    device = resolve_device(device)
    builders = methods(family, depth, width, device, pytorch=pytorch, combined=combined, budgets=budgets,
                       compile_backend=compile_backend)
    if only is not None:
        unknown = [name for name in only if name not in builders]
        if unknown or isinstance(only, str):
            raise ValueError(f"only must name methods among {list(builders)}, got {only!r}")
        builders = {name: builders[name] for name in only}
    digits = load_digits(flat=family == "mlp", device=device)
    inputs, targets = digits.x_train[:batch].clone(), digits.y_train[:batch].clone()
    networks = {}
    with torch.random.fork_rng(devices=[]):  # the networks are built on the CPU; the caller's stream is left alone
        for name, build in builders.items():
            torch.default_generator.manual_seed(seed)
            networks[name] = build()
    errors = {name: network.gradient_error(inputs, targets) for name, network in networks.items()}  # before the timed steps train them
    steps = {name: functools.partial(training_step, network.model, inputs, targets, make_optimizer(optimizer, network.model.parameters()),
                                     micro_batches=network.micro_batches) for name, network in networks.items()}
    times = {name: timing.median for name, timing in compare_times(steps, repeats=repeats, device=device).items()}
    rows = []
    for name, network in tqdm(networks.items(), desc="frontier", disable=not progress):
        model = network.model
        recomputations = math.nan  # a compiled graph's evaluations are out of the hooks' reach
        if network.functions:
            calls = count_calls(network.functions, _gradients, model, inputs, targets, network.micro_batches)
            recomputations = calls / (len(network.functions) * network.micro_batches) - 1
        memory = step_memory(model, inputs, targets, optimizer, micro_batches=network.micro_batches)  # a steady-state step
        rows.append(FrontierRow(name, memory, times[name], errors[name], recomputations))
    return rows


def format_table(rows: list[FrontierRow]) -> str:
    """The rows as a text table: MiB (each category at its most; temporaries at the peak), milliseconds,
    errors and recomputations per function."""
    width = max([16, *(len(row.method) for row in rows)])  # the longest method's name
    lines = ["MiB: each category at its largest in the step, temporaries at the peak; time in ms",
             f"{'method':>{width}} {'params':>6} {'grads':>6} {'optim':>6} {'activ':>6} {'temps':>6} {'peak':>6} {'ms':>6} "
             f"{'grad err':>8} {'recomp':>6}"]
    for row in rows:
        memory = row.memory
        categories = (memory.parameters, memory.gradients, memory.optimizer_state, memory.activations, memory.at_peak["temporaries"], memory.peak)
        mib = [value / 2**20 for value in categories]
        lines.append(f"{row.method:>{width}} " + " ".join(f"{value:6.2f}" for value in mib)
                     + f" {row.seconds * 1e3:6.1f} {row.gradient_error:8.1e} {row.recomputations:6.2f}")
    return "\n".join(lines)


def format_ratios(rows: list[FrontierRow], reference: str = "backprop") -> str:
    """The rows as ratios to the ``reference`` row of the same run: peak and time (each method's over the
    reference's), with the gradient error and the recomputations per function.

    Raises:
        ValueError: no row named ``reference``.
    """
    found = {row.method: row for row in rows}
    if reference not in found:
        raise ValueError(f"reference must name one of the rows {sorted(found)}, got {reference!r}")
    base = found[reference]
    width = max([16, *(len(row.method) for row in rows)])
    lines = [f"{'method':>{width}} {'peak MiB':>9} {'peak ×':>7} {'time ×':>7} {'grad err':>9} {'recomp':>7}"]
    for row in rows:
        lines.append(f"{row.method:>{width}} {row.memory.peak / 2**20:9.2f} {row.memory.peak / base.memory.peak:7.2f} "
                     f"{row.seconds / base.seconds:7.2f} {row.gradient_error:9.1e} {row.recomputations:7.2f}")
    return "\n".join(lines)
