r"""Reversible residual networks: the chapter "Reversible residual networks".

A reversible block splits its input in two halves :math:`x = (x_1, x_2)` and couples them additively
(Gomez et al. 2017, RevNet; Kitaev et al. 2020, Reformer):

.. math::

    y_1 = x_1 + \mathcal F(x_2), \qquad y_2 = x_2 + \mathcal G(y_1).

Its inverse needs no inverse of :math:`\mathcal F` or :math:`\mathcal G`:

.. math::

    x_2 = y_2 - \mathcal G(y_1), \qquad x_1 = y_1 - \mathcal F(x_2).

So a stack of blocks can rebuild every block's input from its output during the backward pass, and
only the stack's output has to be kept: the memory for activations no longer grows with depth.

The mathematics lives in :class:`ReversibleBlock` (``forward`` and ``inverse``); the memory mechanism
lives in :class:`ReversibleSequence`, whose custom ``torch.autograd.Function`` (one node per block, keeping
no activation but the last block's output) walks the blocks backwards, rebuilding and back-propagating
through one block at a time.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch._C._functorch import unwrap_if_dead
from torch.autograd.function import once_differentiable

from revlib._checks import positive_integers
from revlib._recompute import (
    BlockSequence,
    ForwardState,
    ModuleTree,
    accumulate,
    check_parameters_unchanged,
    module_parameters,
    needs_graph,
    run_checked,
)
from revlib.blocks import ResidualBlock, attention_residual, conv_residual, feedforward_residual
from revlib.runtime import resolve_device
from revlib.verify import relative_error

__all__ = [
    "FeedForward",
    "ResNet",
    "RevNet",
    "ReversibleBlock",
    "ReversibleSequence",
    "ReversibleTransformer",
    "SelfAttention",
    "activation_norms",
    "backprop_gradient_error",
    "gradient_error_during_training",
    "inverse_amplification",
    "reformer_chain",
    "replace_modules",
]

Stage = Callable[..., nn.Module]  # builds one stage from its blocks: stage(*blocks)


class ReversibleBlock(nn.Module):
    r"""Additive coupling :math:`y_1 = x_1 + \mathcal F(x_2)`, :math:`y_2 = x_2 + \mathcal G(y_1)`.

    Args:
        f: a module that preserves the shape of one half, :math:`\mathcal F`.
        g: a module that preserves the shape of one half, :math:`\mathcal G`.
        dim: the dimension split in two halves (1 for channels of ``(B, C, H, W)`` images or features of
            ``(B, D)`` vectors; ``-1`` for the features of ``(B, T, D)`` sequences).

    Raises:
        TypeError: ``f`` or ``g`` is not an ``nn.Module``.
    """

    def __init__(self, f: nn.Module, g: nn.Module, dim: int = 1) -> None:
        super().__init__()
        for name, module in (("f", f), ("g", g)):
            if not isinstance(module, nn.Module):
                raise TypeError(f"{name} must be an nn.Module, got {type(module).__name__}")
        self.f, self.g, self.dim = f, g, dim

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The two halves of ``x`` along ``dim`` (views, no copy).

        Raises:
            ValueError: that dimension is missing or has an odd size.
        """
        if x.dim() == 0 or not -x.dim() <= self.dim < x.dim():
            raise ValueError(f"input of shape {tuple(x.shape)} has no dimension {self.dim} to split")
        if x.shape[self.dim] % 2:
            raise ValueError(
                f"a reversible block splits dimension {self.dim} in two equal halves, but the input of shape "
                f"{tuple(x.shape)} has an odd size {x.shape[self.dim]} there"
            )
        x1, x2 = x.chunk(2, dim=self.dim)
        return x1, x2

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.split(x)
        y1 = x1 + run_checked(self.f, x2, "f")
        y2 = x2 + run_checked(self.g, y1, "g")
        return torch.cat((y1, y2), dim=self.dim)

    def inverse(self, y: Tensor) -> Tensor:
        r"""Rebuild the input from the output: :math:`x_2 = y_2 - \mathcal G(y_1)`, :math:`x_1 = y_1 - \mathcal F(x_2)`."""
        y1, y2 = self.split(y)
        x2 = y2 - run_checked(self.g, y1, "g")
        x1 = y1 - run_checked(self.f, x2, "f")
        return torch.cat((x1, x2), dim=self.dim)


class _Chain:
    """What the Functions of one reversible forward pass share: the blocks, their halves' submodules and
    parameters (walked once per pass), their states, and the input that the backward pass of one block
    rebuilds for the block below it (one at a time: no activation is stored)."""

    __slots__ = ("blocks", "trees", "states", "rebuilt")

    def __init__(self, blocks: Sequence[ReversibleBlock]) -> None:
        self.blocks = blocks
        self.trees: list[tuple[ModuleTree, ModuleTree]] = []  # per block, f's and g's as the forward pass ran them
        self.states: list[tuple[ForwardState, ForwardState]] = []  # per block, the (f, g) random, autocast and buffer states
        self.rebuilt: tuple[Tensor, Tensor] | None = None  # the halves of the next block's input, rebuilt in backward


class _ReversibleFunction(torch.autograd.Function):
    """One block of a reversible sequence, keeping no activation; its backward rebuilds the block's input from
    its output and back-propagates through the block.

    One Function per block rather than one for the whole sequence: each block's parameter gradients leave
    backward as soon as the block is done, and autograd adds them to ``.grad`` at once (its gradient
    accumulators run before the next block), where one Function would hold the whole sequence's parameter
    gradients until its last block is done. The halves pass from block to block as two tensors, never
    concatenated; the first block takes the sequence's input, the last returns its output, which it keeps.
    """

    @staticmethod
    def forward(ctx: Any, chain: _Chain, index: int, preserve_rng: bool, *tensors: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        block = chain.blocks[index]
        if index == 0:  # the sequence's input, then the block's parameters
            x, *parameters = tensors
            x1, x2 = block.split(x)
        else:  # the halves of the block below's output, then the parameters
            x1, x2, *parameters = tensors
        previous = chain.states[-1][1] if chain.states else None
        tree_f, tree_g = chain.trees[index]
        # (autograd runs a Function's forward without recording a graph)
        state_f = ForwardState.capture(x1.device, preserve_rng, previous=previous)
        with state_f.recording(block.f, tree_f):
            y1 = x1 + run_checked(block.f, x2, f"block {index}'s f")
        state_g = ForwardState.capture(x1.device, preserve_rng, previous=state_f)
        with state_g.recording(block.g, tree_g):
            y2 = x2 + run_checked(block.g, y1, f"block {index}'s g")
        last = index == len(chain.blocks) - 1
        if last:
            state_g.finish()
        chain.states.append((state_f, state_g))
        ctx.chain, ctx.index = chain, index  # the shared blocks and states (no tensors), and which block this is
        ctx.states = chain.states  # every block's states so far (the last block's ctx lists them all)
        # the parameters are saved so that autograd's version check catches an in-place change to one of them
        # before backward; the only activation kept is the last block's output
        if last:
            y = torch.cat((y1, y2), dim=block.dim)
            ctx.save_for_backward(y, *parameters)
            return y
        ctx.save_for_backward(*parameters)
        return y1, y2

    @staticmethod
    def backward(ctx: Any, *output_grads: Tensor) -> tuple[Tensor | None, ...]:
        # grad mode is on only in a backward pass with create_graph=True: then once_differentiable's wrapper,
        # which costs a few microseconds per block in every ordinary backward pass
        if torch.is_grad_enabled():
            return _block_backward_once_differentiable(ctx, *output_grads)
        return _block_backward(ctx, *output_grads)


def _block_backward(ctx: Any, *output_grads: Tensor) -> tuple[Tensor | None, ...]:
    """:class:`_ReversibleFunction`'s backward pass, run without recording a graph."""
    chain, index = ctx.chain, ctx.index
    block = chain.blocks[index]
    state_f, state_g = chain.states[index]
    if index == len(chain.blocks) - 1:
        y, *parameters = ctx.saved_tensors  # unpacking checks that no parameter was changed in place
        y1, y2 = block.split(y.detach())
        dy1, dy2 = block.split(output_grads[0])
    else:
        parameters = list(ctx.saved_tensors)
        y1, y2 = chain.rebuilt  # this block's output, rebuilt by the block above
        dy1, dy2 = output_grads
    chain.rebuilt = None
    # (the recomputations enable the graph for themselves)
    # z1 = y1: G(z1) with the graph of g only, G'(z1)ᵀ dy2 and g's parameter gradients
    z1, g_out, dz1, g_parameters, g_parameter_grads = _half_backward(block.g, state_g, y1, dy2)
    dz1 = dy1 + dz1  # dz1 = dy1 + G'(z1)ᵀ dy2
    # x2 = y2 − G(z1): F(x2) with the graph of f only, F'(x2)ᵀ dz1 and f's parameter gradients
    x2, f_out, dx2, f_parameters, f_parameter_grads = _half_backward(block.f, state_f, y2 - g_out, dz1)
    del g_out
    dx2 = dy2 + dx2  # dx2 = dy2 + F'(x2)ᵀ dz1
    if index:  # this block's input, x1 = z1 − F(x2), is the block below's output (the first block's is not needed)
        chain.rebuilt = (z1 - f_out, x2.detach())
    del f_out
    # this block's parameter gradients in the order of its parameters (f's, then g's that are not f's)
    if len(parameters) == len(f_parameters) + len(g_parameters):  # f and g share none
        parameter_gradients = [*f_parameter_grads, *g_parameter_grads]
    else:  # summed where they share one
        found: dict[int, Tensor] = {}
        accumulate(found, f_parameters, f_parameter_grads)
        accumulate(found, g_parameters, g_parameter_grads)
        parameter_gradients = [found.get(id(p)) for p in parameters]
    if index == 0:
        dx = torch.cat((dz1, dx2), dim=block.dim) if ctx.needs_input_grad[3] else None  # dx1 = dz1
        return None, None, None, dx, *parameter_gradients  # chain, index, preserve_rng, x, parameters
    return None, None, None, dz1, dx2, *parameter_gradients  # chain, index, preserve_rng, x1, x2, parameters


_block_backward_once_differentiable = once_differentiable(_block_backward)


def _half_backward(
    module: nn.Module, state: ForwardState, value: Tensor, grad_output: Tensor
) -> tuple[Tensor, Tensor, Tensor | None, list[Tensor], list[Tensor | None]]:
    """One half of a block recomputed at ``value`` as its forward pass ran it, and back-propagated: the point
    (``value`` as a new leaf), the half's output there, the gradient at the point, the half's parameters
    (which must be those it ran with in forward, else a clear error) and their gradients."""
    tree = state.tree
    if tree is None or tree.root is not module or not tree.unchanged():  # walk again, and say what changed
        check_parameters_unchanged(state.parameters, module_parameters(module), "ReversibleSequence")
    point = value.detach().requires_grad_(True)
    output, grad_point, parameter_grads = state.pull_back(module, point, grad_output)
    return point, output, grad_point, state.parameters, parameter_grads


# autograd's C entry for a Function, under the Python wrapper Function.apply: with no torch.func transform active,
# the wrapper only unwraps every argument that is a tensor a finished transform left wrapped, and that costs
# some 9 µs a block on a CPU (12 arguments: 27 µs a call against 18). The sequence's input is unwrapped here
# instead; the halves passed on are the blocks' own outputs, and the other tensors the blocks' parameters.
_apply_function = super(torch.autograd.Function, _ReversibleFunction).apply


def _reversible(x: Tensor, blocks: Sequence[ReversibleBlock], preserve_rng: bool) -> Tensor:
    """The blocks applied to ``x``, each through a :class:`_ReversibleFunction` that keeps no activation."""
    if torch._C._are_functorch_transforms_active():  # Function.apply's error, which names what is missing
        apply = _ReversibleFunction.apply
    else:
        apply, x = _apply_function, unwrap_if_dead(x)
    chain = _Chain(blocks)
    halves: tuple[Tensor, ...] = (x,)
    for index, block in enumerate(blocks):
        tree_f, tree_g = ModuleTree(block.f), ModuleTree(block.g)
        chain.trees.append((tree_f, tree_g))
        parameters = list(dict.fromkeys((*tree_f.parameters, *tree_g.parameters)))  # the block's, each once
        out = apply(chain, index, preserve_rng, *halves, *parameters)
        halves = out if isinstance(out, tuple) else (out,)
    return halves[0]


class ReversibleSequence(BlockSequence):
    r"""A stack of :class:`ReversibleBlock` whose backward pass stores no intermediate activation.

    Built like ``nn.Sequential``: ``ReversibleSequence(block1, block2, ...)``. With gradients enabled the
    forward pass keeps only the final output; the backward pass walks the blocks in reverse, rebuilding
    each block's input from its output — the arithmetic of :meth:`ReversibleBlock.inverse`, interleaved with the
    recomputation of :math:`\mathcal G` and :math:`\mathcal F` that the gradients need anyway — and back-propagating through that one block
    (Gomez et al. 2017, Algorithm 1). Memory for activations is therefore constant in the number of
    blocks, at the price of recomputing :math:`\mathcal F` and :math:`\mathcal G` once more each (about
    4 instead of 3 forward-pass equivalents of compute). Each block is its own autograd node, so its
    parameters' gradients reach ``.grad`` (and their hooks run, once) as soon as the block is done: the
    backward pass never holds more than one block's parameter gradients.

    Gradients equal those of running the same blocks as a plain sequence up to rounding (the rebuilt
    inputs differ from the originals by floating-point error, which grows with depth; see the chapter).
    Randomness inside ``f`` and ``g`` is replayed (``preserve_rng_state``), buffers updated in the
    forward pass (BatchNorm running statistics) are updated once, and ``torch.autocast`` settings are
    replayed (one mechanism, shared with the adjoint ODE-ResNet). Under ``torch.no_grad()``, or when
    neither the input nor any parameter requires grad, the blocks simply run one after another.

    The parameters are saved for backward, so an in-place change to one of them between forward and
    backward (an optimiser step, say) fails with autograd's usual error; the backward pass recomputes with
    the blocks' own parameters and raises a clear error if they were replaced in between, so ``torch.func``
    transforms that swap them temporarily (``functional_call``, ``vmap``) are not supported. Tensors that
    ``f`` or ``g`` capture by closure rather than hold as parameters or buffers receive no gradient: make
    them parameters. ``f`` and ``g`` must not change their input in place (an in-place first operation
    such as ``nn.ReLU(inplace=True)``): the backward pass runs them on rebuilt inputs, so that raises a
    ``ValueError`` naming the block. A double backward (``create_graph=True``) raises an error.

    Indexing gives a block, slicing a ``ReversibleSequence`` of those blocks, and iteration and ``len`` go
    over the blocks in order; the sequence cannot be changed in place. A block may appear more than once
    (tied weights): it then runs each time and its parameters receive the sum of the gradients, as in
    ``nn.Sequential``. No block at all is the identity.

    Args:
        *blocks: the reversible blocks, all splitting the same dimension.
        memory_saving: rebuild the activations in the backward pass (the default); ``False`` runs the
            same blocks with ordinary autograd, storing every activation.
        preserve_rng_state: replay the random state for ``f`` and ``g`` (needed for dropout; one copy of the
            generator state, a few KiB, for each ``f`` or ``g`` that drew random numbers in the forward pass).

    Raises:
        TypeError: a block is not a :class:`ReversibleBlock`.
        ValueError: blocks split different dimensions.
    """

    def __init__(self, *blocks: ReversibleBlock, memory_saving: bool = True, preserve_rng_state: bool = True) -> None:
        for index, block in enumerate(blocks):
            if not isinstance(block, ReversibleBlock):
                raise TypeError(f"block {index} must be a ReversibleBlock, got {type(block).__name__}")
            if block.dim != blocks[0].dim:
                raise ValueError(f"all blocks must split the same dimension: block 0 splits {blocks[0].dim}, block {index} splits {block.dim}")
        super().__init__(blocks)
        self.memory_saving = memory_saving
        self.preserve_rng_state = preserve_rng_state

    def _like(self, blocks: list[nn.Module]) -> ReversibleSequence:
        return ReversibleSequence(*blocks, memory_saving=self.memory_saving, preserve_rng_state=self.preserve_rng_state)  # type: ignore[arg-type]

    def forward(self, x: Tensor) -> Tensor:
        blocks = self.blocks
        if not self.memory_saving or not blocks or not needs_graph([x], self.parameters()):
            for block in blocks:
                x = block(x)
            return x
        return _reversible(x, blocks, self.preserve_rng_state)

    def inverse(self, y: Tensor) -> Tensor:
        """Rebuild the input of the whole stack from its output (blocks inverted in reverse order)."""
        for block in reversed(self.blocks):
            y = block.inverse(y)
        return y


def backprop_gradient_error(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    loss: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> float:
    r"""How far the gradients that ``model``'s reversible sequences compute from rebuilt activations are from
    ordinary backprop's through the same blocks, the same weights and the same batch:

    .. math:: \frac{\lVert g_{\text{rev}} - g_{\text{bp}} \rVert}{\lVert g_{\text{bp}} \rVert},
              \qquad g = \nabla_\theta\, \ell\big(\text{model}(x), t\big),

    over all parameters :math:`\theta` that require grad, flattened into one vector (Frobenius norm).
    :math:`g_{\text{rev}}` runs every :class:`ReversibleSequence` inside ``model`` with
    ``memory_saving=True`` (activations rebuilt by :meth:`ReversibleBlock.inverse` in the backward pass), :math:`g_{\text{bp}}`
    with ``memory_saving=False`` (every activation stored). In exact arithmetic the two are equal; the
    difference is the rounding error of the rebuilt activations carried into the gradient. Both passes start
    from the same random state (dropout masks alike) and the same buffers, and the model is left as it was
    found: its options, its buffers (BatchNorm running statistics) and the caller's random state.

    Args:
        model: a module holding at least one :class:`ReversibleSequence`, in the mode (train or eval) to
            measure.
        inputs: a batch for ``model``.
        targets: what ``loss`` compares the output with.
        loss: ``loss(output, targets)``, a scalar; cross-entropy when ``None``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``inputs``/``targets`` are not tensors.
        ValueError: ``model`` holds no :class:`ReversibleSequence` or no parameter that requires grad.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
        raise TypeError("inputs and targets must be tensors")
    sequences = [m for m in model.modules() if isinstance(m, ReversibleSequence)]
    if not sequences:
        raise ValueError("model holds no ReversibleSequence: there is nothing to compare with backprop")
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError("model has no parameter that requires grad")
    loss = nn.functional.cross_entropy if loss is None else loss
    options = [s.memory_saving for s in sequences]
    buffers = [b.detach().clone() for b in model.buffers()]
    devices = [inputs.device] if inputs.device.type == "cuda" else []
    gradients: list[Tensor] = []
    try:
        with torch.random.fork_rng(devices=devices):
            cpu_state = torch.get_rng_state()
            cuda_state = torch.cuda.get_rng_state(inputs.device) if devices else None
            for memory_saving in (True, False):
                torch.set_rng_state(cpu_state)
                if cuda_state is not None:
                    torch.cuda.set_rng_state(cuda_state, inputs.device)
                with torch.no_grad():
                    for buffer, saved in zip(model.buffers(), buffers):
                        buffer.copy_(saved)
                for sequence in sequences:
                    sequence.memory_saving = memory_saving
                value = loss(model(inputs), targets)
                grads = torch.autograd.grad(value, parameters, allow_unused=True)
                gradients.append(torch.cat([
                    (torch.zeros_like(p) if g is None else g).flatten()
                    for p, g in zip(parameters, grads)
                ]))
    finally:
        for sequence, option in zip(sequences, options):
            sequence.memory_saving = option
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), buffers):
                buffer.copy_(saved)
    return relative_error(gradients[0], gradients[1])


def activation_norms(sequence: ReversibleSequence, x: Tensor) -> list[float]:
    r"""The sizes :math:`\lVert x_n \rVert` of the activations of ``sequence`` on the batch ``x``, for
    :math:`n = 0, \dots, N` (:math:`x_0 = x`, :math:`x_n` the output of block :math:`n`; Frobenius norms over the batch).

    A rounding error is a fraction of the number it rounds, so these sizes set how large the rounding errors of
    each block are; their sum over the blocks is what errors of that size add up to when nothing magnifies them.

    Raises:
        TypeError: ``sequence`` is not a :class:`ReversibleSequence`.
    """
    if not isinstance(sequence, ReversibleSequence):
        raise TypeError(f"sequence must be a ReversibleSequence, got {type(sequence).__name__}")
    norms = [float(x.norm())]
    with torch.no_grad():
        for block in sequence.blocks:
            x = block(x)
            norms.append(float(x.norm()))
    return norms


def inverse_amplification(sequence: ReversibleSequence, x: Tensor, *, size: float = 1e-8, seed: int = 0) -> float:
    r"""How much :meth:`ReversibleSequence.inverse` magnifies an error in the output it starts from:

    .. math:: \frac{\lVert \operatorname{inverse}(y + \delta) - \operatorname{inverse}(y) \rVert}{\lVert \delta \rVert},
              \qquad y = \text{sequence}(x),

    for a random :math:`\delta` (Gaussian, drawn from ``seed``) with :math:`\lVert\delta\rVert = \text{size}\cdot
    \lVert y\rVert`, computed on a float64 copy of the sequence so that its own rounding does not enter. For a small
    ``size`` this is the growth of an error made at the top of the stack on its way down to the input, the
    quantity that the Lipschitz bound :math:`\prod_n (1 + \mathrm{Lip}\,\mathcal G_n)(1 + \mathrm{Lip}\,\mathcal F_n)`
    bounds from above. The sequence itself is not changed.

    Raises:
        TypeError: ``sequence`` is not a :class:`ReversibleSequence`.
        ValueError: ``size`` is not positive.
    """
    if not isinstance(sequence, ReversibleSequence):
        raise TypeError(f"sequence must be a ReversibleSequence, got {type(sequence).__name__}")
    if not size > 0:
        raise ValueError(f"size must be positive, got {size}")
    exact = copy.deepcopy(sequence).double()
    with torch.no_grad():
        y = exact(x.double())
        generator = torch.Generator(device="cpu").manual_seed(seed)
        delta = torch.randn(y.shape, generator=generator, dtype=torch.float64).to(y.device)
        delta *= size * y.norm() / delta.norm()
        moved = exact.inverse(y + delta) - exact.inverse(y)
    return float(moved.norm() / delta.norm())


def replace_modules(module: nn.Module, kind: type[nn.Module], make: Callable[[], nn.Module]) -> nn.Module:
    """``module`` with every submodule of type ``kind`` replaced, in place, by a fresh ``make()``; returned for
    chaining. ``replace_modules(model, nn.ReLU, nn.GELU)`` gives the same network with the smooth GELU in place
    of every ReLU, the other weights untouched.

    Raises:
        TypeError: ``module`` is not an ``nn.Module`` or ``make()`` does not return one.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    for name, child in module.named_children():
        if isinstance(child, kind):
            replacement = make()
            if not isinstance(replacement, nn.Module):
                raise TypeError(f"make() must return an nn.Module, got {type(replacement).__name__}")
            setattr(module, name, replacement)
        else:
            replace_modules(child, kind, make)
    return module


def gradient_error_during_training(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    train_inputs: Tensor,
    train_targets: Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    steps: int = 60,
    every: int = 10,
    batch_size: int = 64,
    seed: int = 0,
) -> list[float]:
    """:func:`backprop_gradient_error` on the fixed batch ``(inputs, targets)`` before training and after every
    ``every`` of ``steps`` optimiser steps of cross-entropy training on batches of ``batch_size`` rows drawn
    with replacement from ``(train_inputs, train_targets)`` (drawn from ``seed``); ``steps // every + 1`` values.
    The model is trained in place.

    Raises:
        ValueError: ``steps``, ``every`` or ``batch_size`` is not a positive integer.
    """
    positive_integers(steps=steps, every=every, batch_size=batch_size)
    generator = torch.Generator().manual_seed(seed)
    errors = []
    for step in range(steps + 1):
        if step % every == 0:
            errors.append(backprop_gradient_error(model, inputs, targets))
        if step == steps:
            break
        rows = torch.randint(len(train_inputs), (batch_size,), generator=generator).to(train_inputs.device)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(train_inputs[rows]), train_targets[rows]).backward()
        optimizer.step()
    return errors


def _downsample(in_channels: int, out_channels: int) -> nn.Sequential:
    """Non-reversible transition between stages: BatchNorm → ReLU → 3×3 conv with stride 2."""
    return nn.Sequential(nn.BatchNorm2d(in_channels), nn.ReLU(), nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False))


def _check_widths(widths: Sequence[int], blocks_per_stage: int) -> None:
    if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w < 2 or w % 2 for w in widths):
        raise ValueError(f"widths must be a non-empty list of even channel counts, got {list(widths)}")
    positive_integers(blocks_per_stage=blocks_per_stage)


class _StagedClassifier(nn.Module):
    """stem conv → stage 1 → downsample → stage 2 → … → BatchNorm → ReLU → global average pool → linear,
    each stage ``stage(*blocks)`` over ``blocks_per_stage`` blocks ``make_block(width)``; the modules are
    created in that order, so seeded initialisations are reproducible."""

    def __init__(
        self,
        widths: Sequence[int],
        blocks_per_stage: int,
        make_block: Callable[[int], nn.Module],
        stage: Stage,
        in_channels: int,
        classes: int,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        super().__init__()
        _check_widths(widths, blocks_per_stage)
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        stages: list[nn.Module] = []
        for index, width in enumerate(widths):
            if index:
                stages.append(_downsample(widths[index - 1], width))
            stages.append(stage(*[make_block(width) for _ in range(blocks_per_stage)]))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.BatchNorm2d(widths[-1]), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], classes))
        self.to(device=resolve_device(device), dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stages(self.stem(x)))  # (B, classes)


class RevNet(_StagedClassifier):
    r"""A convolutional RevNet classifier in the style of Gomez et al. (2017).

    stem conv → stage 1 → downsample → stage 2 → … → BatchNorm → ReLU → global average pool → linear.
    Each stage holds ``blocks_per_stage`` :class:`ReversibleBlock` objects whose :math:`\mathcal F` and
    :math:`\mathcal G` are :func:`~revlib.blocks.conv_residual` on half the stage's channels, run by
    ``stage(*blocks)``: a :class:`ReversibleSequence` by default. The transitions change the shape, so they
    are ordinary layers: their inputs are the only activations autograd stores.

    Other stages run the same blocks — the same function and parameters — another way:
    ``stage=nn.Sequential`` with ordinary autograd (the ordinary memory bill), or
    ``stage=functools.partial(CheckpointedSequence, schedule="every")`` recomputing each block in the
    backward pass (Chen et al. 2016; :mod:`revlib.checkpoint`).

    Args:
        widths: channels of each stage (even numbers), e.g. ``(32, 64)``.
        blocks_per_stage: reversible blocks in each stage.
        stage: builds a stage from its blocks, ``stage(*blocks)``.
        in_channels: channels of the input images.
        classes: number of output classes.
        device: where the parameters live (``None``: :func:`revlib.runtime.default_device`).
        dtype: their dtype.

    Raises:
        ValueError: a width that is not an even positive integer, or ``blocks_per_stage`` not positive.
    """

    def __init__(
        self,
        widths: Sequence[int] = (32, 64),
        blocks_per_stage: int = 2,
        *,
        stage: Stage = ReversibleSequence,
        in_channels: int = 1,
        classes: int = 10,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        def coupling(width: int) -> nn.Module:
            return ReversibleBlock(conv_residual(width // 2), conv_residual(width // 2))

        super().__init__(widths, blocks_per_stage, coupling, stage, in_channels, classes, device, dtype)


class ResNet(_StagedClassifier):
    r"""The ResNet that a :class:`RevNet` is compared with: same stem, transitions and head, and stages of
    ordinary residual blocks :math:`y = x + \mathcal F(x)` (:class:`~revlib.blocks.ResidualBlock`) with
    :math:`\mathcal F` = :func:`~revlib.blocks.conv_residual` on all of the stage's channels.

    A residual function on :math:`C` channels has twice the weights of a reversible block's
    :math:`\mathcal F` and :math:`\mathcal G` on :math:`C/2` channels together (:math:`2\cdot 9C^2` against
    :math:`4\cdot 9C^2/4`), so ``ResNet(widths, k)`` has about the parameters of ``RevNet(widths, 2k)``
    and the same number of convolutions along its depth as ``RevNet(widths, k)``.

    Args:
        widths: channels of each stage (even numbers).
        blocks_per_stage: residual blocks in each stage.
        stage: builds a stage from its blocks, ``stage(*blocks)`` (``nn.Sequential`` by default).
        in_channels: channels of the input images.
        classes: number of output classes.
        device: where the parameters live (``None``: :func:`revlib.runtime.default_device`).
        dtype: their dtype.

    Raises:
        ValueError: a width that is not an even positive integer, or ``blocks_per_stage`` not positive.
    """

    def __init__(
        self,
        widths: Sequence[int] = (32, 64),
        blocks_per_stage: int = 1,
        *,
        stage: Stage = nn.Sequential,
        in_channels: int = 1,
        classes: int = 10,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(widths, blocks_per_stage, lambda width: ResidualBlock(conv_residual(width)), stage, in_channels, classes, device, dtype)


class SelfAttention(nn.Module):
    r"""The attention sub-layer :math:`\mathcal F(x) = \operatorname{MultiHeadAttention}(\operatorname{LayerNorm}(x))`
    on ``(B, T, D)`` sequences (pre-norm, no residual: the coupling adds it)."""

    def __init__(self, features: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(features)
        self.attention = nn.MultiheadAttention(features, heads, dropout=dropout, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)  # (B, T, D)
        return self.attention(h, h, h, need_weights=False)[0]


class FeedForward(nn.Module):
    r"""The feed-forward sub-layer :math:`\mathcal G(x) = W_2\,\operatorname{GELU}(W_1 \operatorname{LayerNorm}(x))`."""

    def __init__(self, features: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(features), nn.Linear(features, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, features))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ReversibleTransformer(nn.Module):
    r"""A reversible Transformer encoder for sequence classification, as in the Reformer (Kitaev et al. 2020).

    Tokens ``(B, T, n_in)`` are embedded to ``(B, T, D)`` (plus a learned position embedding) and
    duplicated into the two halves :math:`x_1 = x_2`; each layer is a :class:`ReversibleBlock` splitting the
    last dimension, with :math:`\mathcal F` = :class:`SelfAttention` and :math:`\mathcal G` =
    :class:`FeedForward`, so :math:`y_1 = x_1 + \operatorname{Attention}(x_2)`,
    :math:`y_2 = x_2 + \operatorname{FeedForward}(y_1)`. The output halves are averaged, pooled over the
    sequence and classified. ``memory_saving=False`` runs the same layers with ordinary autograd.

    Args:
        token_features: features per input token.
        length: the sequence length :math:`T`.
        features: the model width :math:`D` (of each half).
        heads: attention heads (must divide ``features``).
        layers: number of reversible layers.
        classes: number of output classes.
        dropout: dropout inside attention and feed-forward.
        memory_saving: run the layers as a memory-saving :class:`ReversibleSequence` (the default) or
            with ordinary autograd.
        device: where the parameters live (``None``: :func:`revlib.runtime.default_device`).
        dtype: their dtype.
    """

    def __init__(
        self,
        token_features: int,
        length: int,
        *,
        features: int = 32,
        heads: int = 4,
        layers: int = 2,
        classes: int = 10,
        dropout: float = 0.0,
        memory_saving: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if features % heads:
            raise ValueError(f"heads must divide features, got features={features}, heads={heads}")
        positive_integers(layers=layers)
        self.embed = nn.Linear(token_features, features)
        self.position = nn.Parameter(torch.randn(1, length, features) / math.sqrt(features))
        blocks = [
            ReversibleBlock(SelfAttention(features, heads, dropout), FeedForward(features, 4 * features, dropout), dim=-1)
            for _ in range(layers)
        ]
        self.layers = ReversibleSequence(*blocks, memory_saving=memory_saving)
        self.head = nn.Sequential(nn.LayerNorm(features), nn.Linear(features, classes))
        self.to(device=resolve_device(device), dtype=dtype)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) + self.position  # (B, T, D)
        y = self.layers(torch.cat((x, x), dim=-1))  # (B, T, 2D)
        y1, y2 = y.chunk(2, dim=-1)
        return self.head(((y1 + y2) / 2).mean(dim=1))  # (B, classes)


def reformer_chain(width: int, depth: int, *, tokens: int = 8, token_features: int = 8, classes: int = 10,
                   device: torch.device | str | None = None) -> nn.Sequential:
    r"""The reversible counterpart of :func:`revlib.blocks.gpt2_chain`: Reformer-style couplings (Kitaev et al.
    2020) on two streams of ``width`` features, as a chain of blocks.

    The blocks, in order: a linear embedding of each token to ``2 * width`` features, the two streams
    :math:`(x_1, x_2)`; ``depth`` :class:`ReversibleBlock` s, each :math:`y_1 = x_1 + \mathcal F(x_2)`,
    :math:`y_2 = x_2 + \mathcal G(y_1)` with :math:`\mathcal F` GPT-2's attention sublayer
    (:func:`~revlib.blocks.attention_residual`, one head per 16 features) and :math:`\mathcal G` its
    feed-forward sublayer (:func:`~revlib.blocks.feedforward_residual`); the head on both streams (LayerNorm → flatten → linear
    to ``classes``). Each coupling holds one GPT-2 block's weights; unlike
    :class:`ReversibleTransformer`, the streams are embedded apart and nothing is shared. The module's
    children are the ``depth + 2`` blocks, on ``device`` (``None``: :func:`revlib.runtime.default_device`);
    their parameters are drawn couplings first, then embedding and head.

    Raises:
        ValueError: a size is not a positive integer.
    """
    positive_integers(width=width, depth=depth, tokens=tokens, token_features=token_features, classes=classes)
    couplings = [
        ReversibleBlock(attention_residual(width, max(1, width // 16)), feedforward_residual(width), dim=-1)
        for _ in range(depth)
    ]
    embedding = nn.Linear(token_features, 2 * width)
    head = nn.Sequential(nn.LayerNorm(2 * width), nn.Flatten(), nn.Linear(tokens * 2 * width, classes))
    return nn.Sequential(embedding, *couplings, head).to(resolve_device(device))
