r"""Gradient checkpointing of a sequence of blocks, from every block to the optimal binomial schedule.

A network :math:`x_{i+1} = F_i(x_i)`, :math:`i = 0, \dots, N-1`, is run forward without keeping any block's
internal activations; only some block *inputs* :math:`x_i` are kept (the checkpoints). The backward pass
walks the blocks in reverse: to back-propagate through block :math:`i` it needs :math:`x_i`, which it
either has or rebuilds by running blocks forward from the nearest earlier checkpoint (an *advance*, one
block evaluation without a graph). Then it evaluates :math:`F_i` once more with its graph (the *turn*) and
takes the vector-Jacobian product. Every schedule therefore evaluates each block twice (forward and turn);
schedules differ in how many advances they add and how many inputs they hold:

* ``"every"`` keeps every block input: :math:`N` stored inputs, no advance (Chen et al. 2016's baseline,
  ``torch.utils.checkpoint`` on each block);
* ``"sqrt"`` keeps the inputs of :math:`k = \lceil\sqrt N\,\rceil` segments; the backward pass rebuilds one
  segment at a time and keeps its inputs while it reverses it: about :math:`2\sqrt N` stored inputs and
  :math:`N - k` advances (Chen et al. 2016);
* ``"revolve"`` keeps at most ``slots`` inputs at any time (the input :math:`x_0` among them) and makes the
  fewest advances any schedule can with that budget (Griewank 1992; Griewank and Walther 2000).

**The optimum.** Let :math:`t(l, s)` be the fewest forward steps that reverse :math:`l` steps with
:math:`s` checkpoints in Griewank's setting (the first sweep included, the state it ends on in hand). With
:math:`\beta(s, r) = \binom{s + r}{s}` and the repetition number :math:`r` defined by
:math:`\beta(s, r - 1) < l \le \beta(s, r)`,

.. math:: t(l, s) = r\,l - \beta(s + 1, r - 1).

Here the forward pass itself is the first sweep and places the checkpoints for free, but it leaves no state
in hand, and the fewest advances for :math:`N` blocks and ``slots`` :math:`= s` are

.. math:: A(N, s) = t(N + 1, s) - N ,

which :func:`optimal_recomputations` computes (``tests/test_checkpoint.py`` checks it against an exhaustive
search over all schedules). With :math:`s = 1` only :math:`x_0` is kept and :math:`A = N(N-1)/2`; with
:math:`s \ge N`, :math:`A = 0`; with :math:`s \approx \log_2 N` the advances grow like :math:`N \log N`.

:func:`checkpoint_plan` turns a schedule into the list of actions both passes perform, and
:class:`CheckpointedSequence` runs it, replaying each block's random state, autocast state and BatchNorm
statistics through the same mechanism as the reversible and adjoint networks (``revlib._recompute``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, checkpoint_sequential, create_selective_checkpoint_contexts

from revlib._recompute import ForwardState, check_parameters_unchanged

ScheduleName = Literal["every", "sqrt", "revolve"]
SCHEDULES = ("every", "sqrt", "revolve")


def _beta(s: int, r: int) -> int:
    """:math:`\\beta(s, r) = \\binom{s + r}{s}`: the most steps ``s`` checkpoints reverse with ``r`` repetitions."""
    return math.comb(s + r, s)


def griewank_steps(steps: int, checkpoints: int) -> int:
    r"""Griewank's :math:`t(l, s) = r\,l - \beta(s+1, r-1)`: the fewest forward steps that reverse ``steps``
    steps with ``checkpoints`` snapshots, counting the first sweep (which ends on the last state).

    Raises:
        ValueError: ``steps`` or ``checkpoints`` is not positive.
    """
    _check_positive(steps=steps, checkpoints=checkpoints)
    repetitions = 0
    while _beta(checkpoints, repetitions) < steps:  # the repetition number r: β(s, r−1) < l ≤ β(s, r)
        repetitions += 1
    if repetitions == 0:
        return 0  # a single step: nothing to advance
    return repetitions * steps - _beta(checkpoints + 1, repetitions - 1)


def optimal_recomputations(steps: int, slots: int) -> int:
    r"""The fewest block evaluations any schedule adds to the forward pass and the turns when back-propagating
    through ``steps`` blocks with at most ``slots`` stored block inputs: :math:`A(N, s) = t(N + 1, s) - N`.

    Raises:
        ValueError: ``steps`` or ``slots`` is not positive.
    """
    _check_positive(steps=steps, slots=slots)
    return griewank_steps(steps + 1, slots) - steps


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


@lru_cache(maxsize=None)
def _griewank_split(steps: int, checkpoints: int) -> int:
    """Where Griewank's optimal schedule places its next checkpoint: argmin_j j + t(l−j, s−1) + t(j, s)."""
    return min(range(1, steps), key=lambda j: j + griewank_steps(steps - j, checkpoints - 1) + griewank_steps(j, checkpoints))


@lru_cache(maxsize=None)
def _free_sweep_split(steps: int, slots: int) -> int:
    """Where the forward pass places its next checkpoint: argmin_j A(l−j, s−1) + t(j, s)."""
    return min(range(1, steps), key=lambda j: optimal_recomputations(steps - j, slots - 1) + griewank_steps(j, slots))


Action = tuple[str, int]  # ("store", i) keep x_i; ("advance", i) x_i → x_{i+1}; ("restore", i); ("drop", i); ("turn", i)


@dataclass(frozen=True)
class CheckpointPlan:
    """What a schedule does: the inputs the forward pass keeps, then the backward pass's actions in order.

    Attributes:
        steps: the number of blocks :math:`N`.
        schedule: its name.
        forward_checkpoints: the block indices :math:`i` whose inputs :math:`x_i` the forward pass keeps.
        backward: ``(action, i)`` pairs: ``"restore"`` makes the kept :math:`x_i` current, ``"advance"``
            runs block :math:`i` on the current :math:`x_i` without a graph, ``"store"`` keeps the current
            :math:`x_i`, ``"drop"`` releases a kept input, and ``"turn"`` evaluates block :math:`i` with its
            graph and back-propagates through it.
    """

    steps: int
    schedule: str
    forward_checkpoints: tuple[int, ...]
    backward: tuple[Action, ...]

    @property
    def advances(self) -> int:
        """Block evaluations the backward pass adds besides the turns."""
        return sum(action == "advance" for action, _ in self.backward)

    @property
    def evaluations(self) -> int:
        """Block evaluations in one forward and backward pass, :math:`2N` plus the advances (the forward
        pass and the turns evaluate every block once each)."""
        return 2 * self.steps + self.advances

    @property
    def most_stored(self) -> int:
        """The most block inputs kept at once (the current working input of the backward pass not counted)."""
        kept = set(self.forward_checkpoints)
        most = len(kept)
        for action, index in self.backward:
            if action == "store":
                kept.add(index)
            elif action == "drop":
                kept.discard(index)
            most = max(most, len(kept))
        return most


def checkpoint_plan(steps: int, schedule: ScheduleName = "revolve", slots: int | None = None) -> CheckpointPlan:
    """The plan of a schedule for ``steps`` blocks (``slots`` stored inputs at most, for ``"revolve"``).

    Raises:
        ValueError: an unknown schedule, ``steps`` not positive, ``slots`` missing or not positive for
            ``"revolve"``, or given for another schedule.
    """
    _check_positive(steps=steps)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "revolve":
        if slots is None:
            raise ValueError("schedule='revolve' needs a budget: slots=<the most block inputs to keep at once>")
        _check_positive(slots=slots)
    elif slots is not None:
        raise ValueError(f"slots is the budget of schedule='revolve'; schedule={schedule!r} sets its own, so leave slots out")
    if schedule == "every":
        backward = tuple(action for i in reversed(range(steps)) for action in (("restore", i), ("turn", i)))
        return CheckpointPlan(steps, schedule, tuple(range(steps)), backward)
    if schedule == "sqrt":
        return _sqrt_plan(steps)
    return _revolve_plan(steps, min(slots, steps))  # type: ignore[arg-type]


def _sqrt_plan(steps: int) -> CheckpointPlan:
    """⌈√N⌉ segments; each is rebuilt from its first input, its inputs kept while it is reversed."""
    length = math.ceil(steps / math.ceil(math.sqrt(steps)))
    starts = tuple(range(0, steps, length))
    actions: list[Action] = []
    for start in reversed(starts):
        end = min(start + length, steps)
        actions.append(("restore", start))
        for index in range(start, end - 1):
            actions += [("advance", index), ("store", index + 1)]
        for index in reversed(range(start, end)):
            actions += [("restore", index), ("turn", index)]
            if index != start:
                actions.append(("drop", index))
    return CheckpointPlan(steps, "sqrt", starts, tuple(actions))


def _revolve_plan(steps: int, slots: int) -> CheckpointPlan:
    """The optimal schedule: checkpoints placed by the forward pass, then Griewank's reversal of each segment."""
    checkpoints, segments = [0], []
    start, remaining, budget = 0, steps, slots
    while remaining > 1 and budget > 1:  # place checkpoints during the (free) forward sweep
        split = _free_sweep_split(remaining, budget)
        segments.append((start, split, budget))  # reversed later with the budget left at that point
        start, remaining, budget = start + split, remaining - split, budget - 1
        checkpoints.append(start)
    segments.append((start, remaining, budget))
    actions: list[Action] = []
    for first, length, budget in reversed(segments):
        actions += _griewank_reversal(first, length, budget)
        if first != 0:
            actions.append(("drop", first))
    return CheckpointPlan(steps, "revolve", tuple(checkpoints), tuple(actions))


def _griewank_reversal(start: int, steps: int, checkpoints: int) -> Iterator[Action]:
    """Reverse blocks ``start`` … ``start + steps − 1`` whose first input is kept, with ``checkpoints`` slots."""
    if steps == 1:
        yield from (("restore", start), ("turn", start))
        return
    if checkpoints == 1:
        for last in reversed(range(start, start + steps)):
            yield ("restore", start)
            yield from (("advance", index) for index in range(start, last))
            yield ("turn", last)
        return
    split = _griewank_split(steps, checkpoints)
    yield ("restore", start)
    yield from (("advance", index) for index in range(start, start + split))
    yield ("store", start + split)
    yield from _griewank_reversal(start + split, steps - split, checkpoints - 1)
    yield ("drop", start + split)
    yield from _griewank_reversal(start, split, checkpoints)


class _CheckpointFunction(torch.autograd.Function):
    """Run the blocks keeping only the plan's checkpoints; execute the plan's backward actions."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, sequence: CheckpointedSequence, plan: CheckpointPlan, *parameters: Tensor) -> Tensor:
        ctx.sequence, ctx.plan = sequence, plan  # the modules and the plan (not tensors): needed to recompute
        ctx.states = []  # per block, the random, autocast and buffer states: a few KiB, no activations
        kept = set(plan.forward_checkpoints)
        checkpoints: list[Tensor] = []
        state = None
        with torch.no_grad():
            for index, block in enumerate(sequence):
                if index in kept:
                    checkpoints.append(x)
                state = ForwardState.capture(x.device, sequence.preserve_rng_state, previous=state)
                with state.recording(block):
                    x = block(x)
                ctx.states.append(state)
        # the kept block inputs (x_0 is the caller's tensor: kept, not copied); the parameters, so that
        # autograd's version check catches an in-place change before backward
        ctx.save_for_backward(*checkpoints, *parameters)
        ctx.checkpoint_count = len(checkpoints)
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        parameters = saved[ctx.checkpoint_count :]
        check_parameters_unchanged(parameters, list(ctx.sequence.parameters()), "CheckpointedSequence")
        blocks, states = list(ctx.sequence), ctx.states
        kept = dict(zip(ctx.plan.forward_checkpoints, (t.detach() for t in saved[: ctx.checkpoint_count])))
        current: Tensor | None = None
        current_index = -1
        upstream = grad_output  # ∂L/∂x_{i+1} for the next block to turn
        parameter_gradients: dict[int, Tensor] = {}  # by id, summed: a block may appear twice
        for action, index in ctx.plan.backward:
            if action == "restore":
                current, current_index = kept[index], index
            elif action == "store":
                kept[index] = current  # type: ignore[assignment]
            elif action == "drop":
                del kept[index]
            elif action == "advance":  # x_{i+1} = F_i(x_i), no graph, as block i ran in forward
                with states[index].buffers_restored(), states[index].replayed(), torch.no_grad():
                    current = blocks[index](current)
                current_index = index + 1
            else:  # "turn": back-propagate through block i at x_i
                assert current_index == index, "the plan turns a block whose input is not current"
                needs_input = index > 0 or ctx.needs_input_grad[0]
                wanted = [p for p in blocks[index].parameters() if p.requires_grad]
                x = current.detach().requires_grad_(needs_input)  # type: ignore[union-attr]
                with states[index].buffers_restored():
                    with states[index].replayed(), torch.enable_grad():
                        out = blocks[index](x)
                    inputs = ([x] if needs_input else []) + wanted
                    found = torch.autograd.grad(out, inputs, upstream, allow_unused=True) if out.requires_grad and inputs else [None] * len(inputs)
                upstream = found[0] if needs_input else None  # ∂L/∂x_i = F_i'(x_i)ᵀ ∂L/∂x_{i+1}
                if needs_input and upstream is None:
                    upstream = torch.zeros_like(x)
                for p, gradient in zip(wanted, found[1:] if needs_input else found):
                    if gradient is not None:
                        parameter_gradients[id(p)] = parameter_gradients[id(p)] + gradient if id(p) in parameter_gradients else gradient
                current = None
        return (
            upstream if ctx.needs_input_grad[0] else None,  # x
            None,  # sequence
            None,  # plan
            *(parameter_gradients.get(id(p)) for p in parameters),  # every parameter, in the order given
        )


class CheckpointedSequence(nn.Sequential):
    r"""Blocks run in order, like ``nn.Sequential``, whose backward pass recomputes instead of storing.

    ``CheckpointedSequence(block1, block2, ..., schedule="revolve", slots=3)``. With gradients enabled the
    forward pass keeps only the block inputs that the schedule's :func:`checkpoint_plan` names, and none of
    the blocks' internal activations; the backward pass rebuilds what it needs (see the module
    documentation for the schedules and their costs). Gradients equal those of ``nn.Sequential`` over the
    same blocks: the recomputation replays each block's random state (dropout masks), autocast state and
    BatchNorm statistics (updated once per forward pass), as :class:`~revlib.reversible.ReversibleSequence`
    does. Blocks may change the shape of their input. Under ``torch.no_grad()``, or when neither the input
    nor any parameter requires grad, the blocks simply run one after another.

    The parameters are saved for backward (an in-place change between forward and backward fails with
    autograd's error; replaced parameters with a clear one). Tensors that a block captures by closure
    rather than holds as a parameter or buffer receive no gradient. A double backward raises an error.

    Args:
        *blocks: the blocks, ``nn.Module`` objects.
        schedule: ``"every"``, ``"sqrt"`` or ``"revolve"``.
        slots: for ``"revolve"``, the most block inputs kept at once (at least 1; the input among them).
        preserve_rng_state: replay each block's random state in the recomputation (needed for dropout).

    Raises:
        TypeError: a block is not an ``nn.Module``.
        ValueError: no block, an unknown schedule, or a missing or bad ``slots``.
    """

    def __init__(self, *blocks: nn.Module, schedule: ScheduleName = "every", slots: int | None = None, preserve_rng_state: bool = True) -> None:
        if not blocks:
            raise ValueError("CheckpointedSequence needs at least one block")
        for index, block in enumerate(blocks):
            if not isinstance(block, nn.Module):
                raise TypeError(f"block {index} must be an nn.Module, got {type(block).__name__}")
        super().__init__(*blocks)
        self.plan = checkpoint_plan(len(blocks), schedule, slots)
        self.slots = slots
        self.preserve_rng_state = preserve_rng_state

    def forward(self, x: Tensor) -> Tensor:
        parameters = list(self.parameters())
        if not torch.is_grad_enabled() or not (x.requires_grad or any(p.requires_grad for p in parameters)):
            return super().forward(x)
        return _CheckpointFunction.apply(x, self, self.plan, *parameters)

    def extra_repr(self) -> str:
        slots = f", slots={self.slots}" if self.slots is not None else ""
        return f"schedule={self.plan.schedule!r}{slots}"


class TorchSegmentCheckpointed(nn.Sequential):
    """PyTorch's own ``checkpoint_sequential`` over the blocks, in ``segments`` segments (default ⌈√N⌉), for
    comparison: it keeps each segment's input, and runs its last segment without checkpointing."""

    def __init__(self, *blocks: nn.Module, segments: int | None = None) -> None:
        super().__init__(*blocks)
        self.segments = segments if segments is not None else math.ceil(math.sqrt(len(blocks)))
        _check_positive(segments=self.segments)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return super().forward(x)
        return checkpoint_sequential(self, self.segments, x, use_reentrant=False)


def _keep_matrix_products(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Keep the outputs of convolutions and matrix products; recompute everything else (the cheap, pointwise ops)."""
    expensive = (torch.ops.aten.convolution.default, torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)
    return CheckpointPolicy.MUST_SAVE if op in expensive else CheckpointPolicy.PREFER_RECOMPUTE


class TorchSelectiveCheckpointed(nn.Sequential):
    """PyTorch's selective activation checkpointing on every block, for comparison: the outputs of
    convolutions and matrix products are kept, the pointwise operations (normalisation, activations,
    additions) recomputed in the backward pass."""

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return super().forward(x)
        context = functools.partial(create_selective_checkpoint_contexts, _keep_matrix_products)
        for block in self:
            x = checkpoint(block, x, use_reentrant=False, context_fn=context)
        return x


class Offloaded(nn.Sequential):
    """Ordinary autograd with every saved tensor moved to host memory until the backward pass needs it
    (``torch.autograd.graph.save_on_cpu``; pinned when CUDA is available). It frees device memory, not
    memory in total: on a CPU it only adds copies."""

    def forward(self, x: Tensor) -> Tensor:
        with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
            return super().forward(x)
