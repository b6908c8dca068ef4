r"""Gradient checkpointing of a sequence of blocks, from every block to revolve and the optimal plan.

A network :math:`x_{i+1} = F_i(x_i)`, :math:`i = 0, \dots, N-1`, is run forward without keeping any block's
internal activations; only some block *inputs* :math:`x_i` are kept (the checkpoints). The backward pass
walks the blocks in reverse: to back-propagate through block :math:`i` it needs :math:`x_i`, which it
either has or rebuilds by running blocks forward from the nearest earlier checkpoint (an *advance*, one
block evaluation without a graph). Then it evaluates :math:`F_i` once more with its graph (the *turn*) and
takes the vector-Jacobian product. Every schedule therefore evaluates each block twice (forward and turn);
schedules differ in how many advances they add and how many inputs they hold:

* ``"every"`` keeps every block input: :math:`N` stored inputs, no advance (Chen et al. 2016's baseline,
  ``torch.utils.checkpoint`` on each block);
* ``"sqrt"`` keeps the inputs of :math:`q = \lceil\sqrt N\,\rceil` segments; the backward pass rebuilds one
  segment at a time and keeps its inputs while it reverses it: about :math:`2\sqrt N` stored inputs and
  :math:`N - q` advances (Chen et al. 2016);
* ``"revolve"`` keeps at most ``slots`` inputs at any time (the input :math:`x_0` among them) and makes the
  fewest advances any schedule can that holds that many block inputs (Griewank 1992; Griewank and Walther
  2000); in bytes, for unequal blocks, ``"optimal"`` can do better;
* ``"optimal"`` is the fastest plan within a budget in *bytes* for blocks of unequal costs and sizes
  (:class:`BlockCosts`, measured by :func:`measure_block_costs`): the dynamic programme of Beaumont et al.
  (2019) in ``revlib._rotor``, which may also *record* a block (keep its graph instead of running it again).

**Revolve's count.** Let :math:`t(l, s)` be the fewest forward steps that reverse :math:`l` steps with
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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from revlib._rotor import Simulation, checkpoint_plan_actions, least_peak_bytes, optimal_chain_plan, simulate
from revlib._checks import positive_integers
from revlib.measure import time_call
from revlib._recompute import (
    ForwardState,
    Stash,
    accumulate,
    check_parameters_unchanged,
    distinct_parameters,
    module_parameters,
    needs_graph,
    run_checked,
    vector_jacobian_products,
)

__all__ = [
    "SCHEDULES",
    "BlockCosts",
    "CheckpointPlan",
    "CheckpointedSequence",
    "check_plan",
    "checkpoint_plan",
    "griewank_steps",
    "measure_block_costs",
    "optimal_recomputations",
]

ScheduleName = Literal["every", "sqrt", "revolve", "optimal"]
SCHEDULES = ("every", "sqrt", "revolve", "optimal")


def _beta(s: int, r: int) -> int:
    """:math:`\\beta(s, r) = \\binom{s + r}{s}`: the most steps ``s`` checkpoints reverse with ``r`` repetitions."""
    return math.comb(s + r, s)


def griewank_steps(steps: int, checkpoints: int) -> int:
    r"""Griewank's :math:`t(l, s) = r\,l - \beta(s+1, r-1)`: the fewest forward steps that reverse ``steps``
    steps with ``checkpoints`` snapshots, counting the first sweep (which ends on the last state).

    Raises:
        ValueError: ``steps`` or ``checkpoints`` is not positive.
    """
    positive_integers(steps=steps, checkpoints=checkpoints)
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
    positive_integers(steps=steps, slots=slots)
    return griewank_steps(steps + 1, slots) - steps


@lru_cache(maxsize=None)
def _griewank_split(steps: int, checkpoints: int) -> int:
    """Where Griewank's schedule places its next checkpoint: argmin_k k + t(l−k, s−1) + t(k, s)."""
    return min(range(1, steps), key=lambda k: k + griewank_steps(steps - k, checkpoints - 1) + griewank_steps(k, checkpoints))


@lru_cache(maxsize=None)
def _free_sweep_split(steps: int, slots: int) -> int:
    """Where the forward pass places its next checkpoint: argmin_k A(l−k, s−1) + t(k, s)."""
    return min(range(1, steps), key=lambda k: optimal_recomputations(steps - k, slots - 1) + griewank_steps(k, slots))


Action = tuple[str, int]  # (name, block index i); the names are those of CheckpointPlan's docstring
_FORWARD_ACTIONS = ("store", "advance", "record")
_BACKWARD_ACTIONS = ("restore", "store", "drop", "advance", "record", "turn")


@dataclass(frozen=True)
class CheckpointPlan:
    """What a schedule does: the forward pass's actions, then the backward pass's, in order.

    Actions are ``(name, i)`` pairs about block :math:`i` and its input :math:`x_i`:

    * ``"store"`` keeps the current :math:`x_i` (a checkpoint); ``"drop"`` releases a kept one;
      ``"restore"`` makes a kept :math:`x_i` current;
    * ``"advance"`` runs block :math:`i` on the current :math:`x_i` without a graph, making
      :math:`x_{i+1}` current; ``"record"`` runs it *with* its graph and keeps that graph until its turn;
    * ``"turn"`` (backward only) back-propagates through block :math:`i`: through its recorded graph if it
      has one, else by evaluating it with its graph on the current :math:`x_i`.

    The forward pass starts with :math:`x_0` current and must run every block once, in order.

    Attributes:
        steps: the number of blocks :math:`N`.
        schedule: its name.
        forward: the forward pass's actions.
        backward: the backward pass's actions.
        predicted_time: for ``"optimal"``, the time the memory model predicts for both passes
            (:math:`\\sum` of the actions' costs, in the units of :class:`BlockCosts`); else ``None``.
        predicted_peak: for ``"optimal"``, the peak bytes the memory model predicts (at most the budget);
            else ``None``.
    """

    steps: int
    schedule: str
    forward: tuple[Action, ...]
    backward: tuple[Action, ...]
    predicted_time: float | None = None
    predicted_peak: float | None = None

    @property
    def forward_checkpoints(self) -> tuple[int, ...]:
        """The block indices :math:`i` whose inputs :math:`x_i` the forward pass keeps."""
        return tuple(index for action, index in self.forward if action == "store")

    @property
    def advances(self) -> int:
        """Block evaluations the backward pass adds besides the turns."""
        return sum(action in ("advance", "record") for action, _ in self.backward)

    @property
    def evaluations(self) -> int:
        """Block evaluations in one forward and backward pass, which is :math:`2N` plus the advances when
        nothing is recorded (the forward pass and the turns evaluate every block once each); a turn through a
        recorded graph evaluates nothing."""
        recorded = {index for action, index in (*self.forward, *self.backward) if action == "record"}
        unrecorded_turns = sum(action == "turn" and index not in recorded for action, index in self.backward)
        return self.steps + self.advances + unrecorded_turns

    def held_inputs(self) -> list[int]:
        """The number of block inputs kept after each backward action, starting with those the forward pass
        kept (the current working input not counted unless it is kept)."""
        kept = set(self.forward_checkpoints)
        held = [len(kept)]
        for action, index in self.backward:
            if action == "store":
                kept.add(index)
            elif action == "drop":
                kept.discard(index)
            held.append(len(kept))
        return held

    @property
    def most_stored(self) -> int:
        """The most block inputs kept at once (the current working input of the backward pass not counted)."""
        return max(self.held_inputs())

    @property
    def kept(self) -> tuple[str, ...]:
        """What the forward pass keeps of each block for the backward pass, one entry per block — ``"graph"``
        (recorded), ``"input"`` (:math:`x_i` stored) or ``"-"`` (nothing; rebuilt from an earlier input when
        needed)."""
        kept = ["-"] * self.steps
        for action, index in self.forward:
            if action == "record":
                kept[index] = "graph"
            elif action == "store":
                kept[index] = "input"
        return tuple(kept)

    @property
    def runs(self) -> tuple[int, ...]:
        """How many times one forward and backward pass evaluates each block, one entry per block — once in the
        forward pass, once per advance or record in the backward pass, and once more in its turn unless its
        graph is recorded.
        The entries sum to :attr:`evaluations`; a forward hook on each block counts the same
        (:func:`revlib.measure.count_calls_per_module`)."""
        runs = [0] * self.steps
        recorded: set[int] = set()
        for action, index in (*self.forward, *self.backward):
            if action in ("advance", "record"):
                runs[index] += 1
                if action == "record":
                    recorded.add(index)
            elif action == "turn":
                runs[index] += index not in recorded  # without a recorded graph the turn runs the block again
                recorded.discard(index)
        return tuple(runs)


def _forward_keeping(steps: int, checkpoints: Iterable[int]) -> tuple[Action, ...]:
    """A forward pass that keeps the inputs ``checkpoints`` and runs every block without a graph."""
    kept = set(checkpoints)
    return tuple(action for i in range(steps) for action in ((("store", i),) if i in kept else ()) + (("advance", i),))


@dataclass(frozen=True)
class BlockCosts:
    r"""What each block of a chain :math:`x_{i+1} = F_i(x_i)` costs: the data of the ``"optimal"`` schedule.

    Times are in any one unit (seconds when measured); sizes in bytes. :func:`measure_block_costs` measures
    them; they can also be written by hand (e.g. counted FLOPs and shapes).

    Attributes:
        forward_time: :math:`\phi_i`, block :math:`i`'s forward pass without a graph, :math:`N` entries.
        backward_time: :math:`\psi_i`, the backward pass through block :math:`i`'s recorded graph (the
            vector-Jacobian product alone), :math:`N` entries.
        input_bytes: :math:`a_i`, the bytes of :math:`x_i`, :math:`N + 1` entries (the last: the output
            :math:`x_N`).
        activation_bytes: :math:`g_i`, the bytes block :math:`i`'s recorded graph holds besides its input
            :math:`x_i`, its output :math:`x_{i+1}` and its parameters, :math:`N` entries.

    Raises:
        ValueError: lengths that disagree, or a time or size that is negative or not finite.
    """

    forward_time: tuple[float, ...]
    backward_time: tuple[float, ...]
    input_bytes: tuple[float, ...]
    activation_bytes: tuple[float, ...]

    def __post_init__(self) -> None:
        for name in ("forward_time", "backward_time", "input_bytes", "activation_bytes"):
            object.__setattr__(self, name, tuple(getattr(self, name)))  # lists accepted, kept hashable
        least_peak_bytes(self.forward_time, self.backward_time, self.input_bytes, self.activation_bytes)  # validates

    @property
    def steps(self) -> int:
        """The number of blocks :math:`N`."""
        return len(self.forward_time)

    @property
    def least_budget(self) -> float:
        """The least budget any ``"optimal"`` plan fits in (the least peak of the memory model)."""
        return least_peak_bytes(self.forward_time, self.backward_time, self.input_bytes, self.activation_bytes)

    @property
    def backprop(self) -> Simulation:
        r"""Plain backprop under the ``"optimal"`` schedule's model, every block recorded in the forward pass
        and turned through its graph (time :math:`\sum_i \phi_i + \psi_i`); its peak is the budget above which no
        block need be recomputed."""
        forward = tuple(("record", index) for index in range(self.steps))
        backward = tuple(("turn", index) for index in reversed(range(self.steps)))
        return simulate(forward, backward, self.forward_time, self.backward_time, self.input_bytes, self.activation_bytes)

    def most_revolve_slots(self, budget: float) -> int | None:
        r"""The most slots :math:`s \le N` whose revolve plan fits in ``budget`` bytes under this model
        (:meth:`simulate`), or ``None`` when not even one slot does: revolve's best within the budget that
        ``"optimal"`` is given, for comparing the two on equal terms.

        Raises:
            ValueError: ``budget`` is not a positive, finite number.
        """
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0:
            raise ValueError(f"budget must be a positive, finite number of bytes, got {budget!r}")
        fitting = [slots for slots in range(1, self.steps + 1)
                   if self.simulate(checkpoint_plan(self.steps, "revolve", slots)).peak_bytes <= budget]
        return max(fitting, default=None)

    def averaged(self) -> BlockCosts:
        r"""The same chain made of alike blocks: each takes the blocks' mean times (the means of :math:`\phi_i`
        and of :math:`\psi_i`),
        each input :math:`x_0, \dots, x_{N-1}` their mean size and each graph their mean graph size; the output
        :math:`x_N` keeps its size. The sums over the blocks stay the same, so a comparison made on both costs
        shows what the blocks' differences change, and nothing else (e.g. revolve against ``"optimal"``)."""
        steps = self.steps

        def alike(values: tuple[float, ...]) -> tuple[float, ...]:
            return (sum(values) / steps,) * steps

        return BlockCosts(alike(self.forward_time), alike(self.backward_time),
                          alike(self.input_bytes[:steps]) + self.input_bytes[steps:], alike(self.activation_bytes))

    def forward_work(self, plan: CheckpointPlan) -> float:
        r"""The forward work of one step under ``plan``, in forward passes of the chain:
        :math:`\sum_i \phi_i \,\text{runs}_i / \sum_i \phi_i` with :attr:`CheckpointPlan.runs` (plain backprop: 1;
        every block checkpointed: 2). Blocks without cost (all :math:`\phi_i = 0`) count by their evaluations.

        Raises:
            ValueError: the plan is for another number of blocks.
        """
        if plan.steps != self.steps:
            raise ValueError(f"plan is for {plan.steps} blocks, the costs for {self.steps}")
        weights = self.forward_time if sum(self.forward_time) > 0 else (1.0,) * self.steps
        return sum(weight * runs for weight, runs in zip(weights, plan.runs)) / sum(weights)

    def simulate(self, plan: CheckpointPlan) -> Simulation:
        """What any ``plan`` for these blocks costs under the ``"optimal"`` schedule's model: a record with
        ``time``, the :math:`\\sum` of its actions' costs, and ``peak_bytes``, its peak :math:`\\max H`
        (:func:`checkpoint_plan` gives the model).

        Compares schedules on equal terms, e.g. revolve's plan for unequal blocks against the optimal one.

        Raises:
            ValueError: the plan is for another number of blocks, or is invalid (the message names the action).
        """
        if plan.steps != self.steps:
            raise ValueError(f"plan is for {plan.steps} blocks, the costs for {self.steps}")
        forward, backward = (plan.forward, plan.backward) if plan.schedule == "optimal" else checkpoint_plan_actions(plan)
        return simulate(forward, backward, self.forward_time, self.backward_time, self.input_bytes, self.activation_bytes)


def measure_block_costs(blocks: Sequence[nn.Module], example_input: Tensor, *, repeats: int = 5, warmup: int = 1) -> BlockCosts:
    r"""Measure the :class:`BlockCosts` of a chain on an example input: each block is run on its own input
    :math:`x_i` (the chain run once on ``example_input``).

    * :math:`\phi_i`: the median time of ``block(x_i)`` without a graph (:func:`revlib.measure.time_call`);
    * :math:`\psi_i`: the median time of the block run with its graph and back-propagated (to its input when it
      is floating point, and to its parameters), less that of the run with its graph alone (at least 0);
    * :math:`a_i`: the bytes of the storage :math:`x_i` lives in;
    * :math:`g_i`: the bytes of the distinct storages autograd saves for block :math:`i`'s backward pass
      (seen through ``torch.autograd.graph.saved_tensors_hooks``, as
      :func:`revlib.measure.saved_tensor_bytes` counts them) other than its input's, its output's, its
      parameters' and its buffers'.

    The caller's random stream and the blocks' buffers (BatchNorm's statistics) are left as they were.

    Args:
        blocks: the chain's blocks, in order.
        example_input: a batch :math:`x_0` of the size the chain will train on.
        repeats: timed runs per measurement (the median is kept).
        warmup: untimed runs before them.

    Returns:
        The :class:`BlockCosts`, times in seconds.

    Raises:
        TypeError: ``blocks`` holds something other than ``nn.Module`` objects, or ``example_input`` is not
            a tensor.
        ValueError: ``blocks`` is empty, ``repeats`` is not positive or ``warmup`` negative.
    """
    blocks = list(blocks)
    if not blocks:
        raise ValueError("blocks must hold at least one nn.Module, got none")
    for index, block in enumerate(blocks):
        if not isinstance(block, nn.Module):
            raise TypeError(f"blocks[{index}] must be an nn.Module, got {type(block).__name__}")
    if not isinstance(example_input, Tensor):
        raise TypeError(f"example_input must be a tensor, got {type(example_input).__name__}")
    positive_integers(repeats=repeats)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative integer, got {warmup!r}")
    timed = functools.partial(time_call, warmup=warmup, repeats=repeats, device=example_input.device)
    forward_time, backward_time, activation_bytes = [], [], []
    with _measuring(blocks, example_input.device):
        inputs = [example_input.detach()]
        with torch.no_grad():
            for block in blocks:
                inputs.append(block(inputs[-1]))
        for block, x in zip(blocks, inputs):
            point = x.detach().requires_grad_(x.is_floating_point() or x.is_complex())
            wrt = [point] * point.requires_grad + [p for p in block.parameters() if p.requires_grad]

            def recorded(block: nn.Module = block, point: Tensor = point) -> Tensor:
                with torch.enable_grad():
                    return block(point)

            def turned(block: nn.Module = block, point: Tensor = point, wrt: list[Tensor] = wrt) -> None:
                output = recorded(block, point)
                if output.requires_grad and wrt:  # δ_i = F_i'(x_i)ᵀ δ_{i+1}, and the parameters' gradients
                    torch.autograd.grad(output, wrt, torch.ones_like(output), allow_unused=True)

            with torch.no_grad():
                forward_time.append(timed(block, x).median)
            backward_time.append(max(timed(turned).median - timed(recorded).median, 0.0))
            activation_bytes.append(_graph_bytes(block, point))
        input_bytes = [x.untyped_storage().nbytes() for x in inputs]
    return BlockCosts(tuple(forward_time), tuple(backward_time), tuple(input_bytes), tuple(activation_bytes))


def _storage_key(tensor: Tensor) -> tuple[str, int]:
    return str(tensor.device), tensor.untyped_storage().data_ptr()


def _graph_bytes(block: nn.Module, point: Tensor) -> int:
    """:math:`g_i`: bytes of the storages ``block``'s graph saves at ``point``, besides its input, output,
    parameters and buffers (each storage once, at its full size)."""
    sizes: dict[tuple[str, int], int] = {}

    def pack(tensor: Tensor) -> Tensor:
        sizes[_storage_key(tensor)] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = block(point)
    own = {_storage_key(t) for t in (point, output, *block.parameters(), *block.buffers())}
    return sum(size for key, size in sizes.items() if key not in own)


class _measuring:  # noqa: N801 (a context manager used like a function)
    """Leave the caller's random stream and the blocks' buffers (BatchNorm's statistics) as they were."""

    def __init__(self, blocks: Sequence[nn.Module], device: torch.device) -> None:
        self.buffers = list({id(b): b for block in blocks for b in block.buffers()}.values())
        self.devices = [device] if device.type != "cpu" else []
        self.fork = torch.random.fork_rng(devices=self.devices, device_type=device.type if self.devices else "cuda")

    def __enter__(self) -> None:
        self.saved = [buffer.clone() for buffer in self.buffers]
        self.fork.__enter__()

    def __exit__(self, *error: Any) -> None:
        self.fork.__exit__(*error)
        with torch.no_grad():
            for buffer, value in zip(self.buffers, self.saved):
                buffer.copy_(value)


def checkpoint_plan(
    steps: int,
    schedule: ScheduleName = "revolve",
    slots: int | None = None,
    *,
    costs: BlockCosts | None = None,
    budget: float | None = None,
) -> CheckpointPlan:
    r"""The plan of a schedule for ``steps`` blocks: ``slots`` stored inputs at most for ``"revolve"``;
    for ``"optimal"``, the fastest plan for the blocks' ``costs`` within ``budget`` bytes.

    Every plan releases each kept input once the backward pass has turned the last block that needs it.

    **The budget of** ``"optimal"`` bounds the memory model's held bytes :math:`H` (``revlib._rotor``): the block inputs
    :math:`x_i` kept or current, every recorded graph (:math:`g_i` with its input and output), the one
    output gradient :math:`\bar x_\nu` alive (:math:`\nu` blocks not yet turned), and what an action creates while it runs (an advance its output
    :math:`a_{i+1}`; a turn :math:`\bar x_i`, and without a recorded graph the graph and output as well):

    .. math:: \max_{\text{moments}} \Big(\sum_{i \in K \cup R \cup (R+1) \cup \{c\}} a_i + \sum_{i \in R} g_i
        + a_\nu + \text{the action's new tensors}\Big) \le M .

    It counts the input :math:`x_0` while it is needed, and not the parameters' gradients, nor the
    temporaries inside a block (a block's intermediate results while it runs, the gradients of its internal
    activations during its turn): :func:`revlib.planner.plan` adds those for a budget of everything a step adds.

    Args:
        steps: the number of blocks :math:`N`.
        schedule: ``"every"``, ``"sqrt"``, ``"revolve"`` or ``"optimal"``.
        slots: for ``"revolve"``, the most block inputs kept at once.
        costs: for ``"optimal"``, the :class:`BlockCosts` of the ``steps`` blocks.
        budget: for ``"optimal"``, :math:`M` in bytes (see above).

    Returns:
        The :class:`CheckpointPlan`, checked by :func:`check_plan`; for ``"optimal"`` with the model's
        ``predicted_time`` and ``predicted_peak``.

    Raises:
        TypeError: ``costs`` is not a :class:`BlockCosts`.
        ValueError: an unknown schedule, ``steps`` not positive, ``slots`` missing or not positive for
            ``"revolve"``, ``costs`` or ``budget`` missing for ``"optimal"``, costs for another number of
            blocks, a budget below the least any plan needs (the message gives it), or an argument given to a
            schedule that does not use it.
    """
    positive_integers(steps=steps)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "revolve":
        if slots is None:
            raise ValueError("schedule='revolve' needs a budget: slots=<the most block inputs to keep at once>")
        positive_integers(slots=slots)
    elif slots is not None:
        raise ValueError(f"slots is the budget of schedule='revolve'; schedule={schedule!r} sets its own, so leave slots out")
    if schedule == "optimal":
        if costs is None or budget is None:
            raise ValueError("schedule='optimal' needs costs=BlockCosts(...) (see measure_block_costs) and budget=<bytes>")
        if not isinstance(costs, BlockCosts):
            raise TypeError(f"costs must be a BlockCosts, got {type(costs).__name__}")
        if costs.steps != steps:
            raise ValueError(f"costs describe {costs.steps} blocks, but the plan is for steps={steps}")
        return _optimal_plan(costs, budget)
    if costs is not None or budget is not None:
        raise ValueError(f"costs and budget are for schedule='optimal', not schedule={schedule!r}")
    return _plan(steps, schedule, slots)


@lru_cache(maxsize=256)
def _optimal_plan(costs: BlockCosts, budget: float) -> CheckpointPlan:
    """:func:`revlib._rotor.optimal_chain_plan`'s actions as a :class:`CheckpointPlan` (the same action names)."""
    chain = optimal_chain_plan(costs.forward_time, costs.backward_time, costs.input_bytes, costs.activation_bytes, budget)
    plan = CheckpointPlan(costs.steps, "optimal", chain.forward, chain.backward, chain.time, chain.peak_bytes)
    check_plan(plan)
    return plan


@lru_cache(maxsize=256)
def _plan(steps: int, schedule: ScheduleName, slots: int | None) -> CheckpointPlan:
    if schedule == "every":
        backward = tuple(action for i in reversed(range(steps)) for action in (("restore", i), ("turn", i), ("drop", i)))
        return CheckpointPlan(steps, schedule, _forward_keeping(steps, range(steps)), backward)
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
            actions += [("restore", index), ("turn", index), ("drop", index)]
    return CheckpointPlan(steps, "sqrt", _forward_keeping(steps, starts), tuple(actions))


def _revolve_plan(steps: int, slots: int) -> CheckpointPlan:
    """Revolve's schedule: checkpoints placed by the forward pass, then Griewank's reversal of each segment."""
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
        actions.append(("drop", first))
    return CheckpointPlan(steps, "revolve", _forward_keeping(steps, checkpoints), tuple(actions))


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


def check_plan(plan: CheckpointPlan) -> None:
    """Check that ``plan`` can be executed and back-propagates through every block exactly once.

    The forward pass must run blocks 0 … N−1 in order, storing only the current input; the backward pass
    must turn blocks N−1 … 0 in that order, each with its input current (or its graph recorded), restore
    and drop only kept inputs, and advance or record only from the current input.

    Raises:
        ValueError: the plan breaks one of these rules (the message names the action).
    """
    kept: set[int] = set()
    recorded: set[int] = set()
    current = 0
    for position, (action, index) in enumerate(plan.forward):
        where = f"forward action {position} {(action, index)}"
        if action not in _FORWARD_ACTIONS:
            raise ValueError(f"{where}: the forward pass may only {_FORWARD_ACTIONS}")
        if index != current:
            raise ValueError(f"{where}: the current input is x_{current}")
        if action == "store":
            kept.add(index)
        else:
            recorded |= {index} if action == "record" else set()
            current += 1
    if current != plan.steps:
        raise ValueError(f"the forward pass runs {current} of {plan.steps} blocks")
    current_index: int | None = None
    next_turn = plan.steps - 1
    for position, (action, index) in enumerate(plan.backward):
        where = f"backward action {position} {(action, index)}"
        if action not in _BACKWARD_ACTIONS:
            raise ValueError(f"{where}: the backward pass may only {_BACKWARD_ACTIONS}")
        if action in ("restore", "drop") and index not in kept:
            raise ValueError(f"{where}: x_{index} is not kept")
        if action in ("store", "advance", "record") and current_index != index:
            raise ValueError(f"{where}: the current input is {'none' if current_index is None else f'x_{current_index}'}")
        if action == "turn":
            if index != next_turn:
                raise ValueError(f"{where}: the next block to turn is {next_turn}")
            if index not in recorded and current_index != index:
                raise ValueError(f"{where}: block {index} has neither its input current nor its graph recorded")
            recorded.discard(index)
            next_turn -= 1
            current_index = None
        elif action == "restore":
            current_index = index
        elif action == "store":
            kept.add(index)
        elif action == "drop":
            kept.discard(index)
        else:  # advance, record
            recorded |= {index} if action == "record" else set()
            current_index = index + 1
    if next_turn != -1:
        raise ValueError(f"the backward pass turns {plan.steps - 1 - next_turn} of {plan.steps} blocks")


class _CheckpointFunction(torch.autograd.Function):
    """Run the blocks as the plan's forward actions say; execute its backward actions."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, blocks: list[nn.Module], plan: CheckpointPlan, preserve_rng: bool, *parameters: Tensor) -> Tensor:
        ctx.blocks, ctx.plan = blocks, plan  # the modules (not tensors) and the plan: needed to recompute
        ctx.states = []  # per block, the random, autocast and buffer states: a few KiB, no activations
        ctx.kept = Stash()  # the checkpoints x_i, i > 0, released as the plan drops them (not save_for_backward)
        ctx.recorded = {}  # block index → (its input, its output with the graph kept for its turn)
        ctx.backward_runs = 0
        x_0, state = x, None
        for action, index in plan.forward:
            if action == "store":
                if index:  # x_0 is saved below, for every plan
                    ctx.kept.keep(index, x)
                continue
            state = ForwardState.capture(x.device, preserve_rng, previous=state)
            with state.recording(blocks[index]):
                x = _run(blocks[index], x, index, record=action == "record", recorded=ctx.recorded)
            ctx.states.append(state)
        if state is not None:
            state.finish()
        # x_0 (the caller's tensor: kept, not copied; a second backward pass rebuilds the checkpoints from it);
        # the parameters, so that autograd's version check catches an in-place change before backward
        ctx.save_for_backward(x_0, *parameters)
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        x_0, *parameters = ctx.saved_tensors
        check_parameters_unchanged(parameters, distinct_parameters(ctx.blocks), "CheckpointedSequence")
        blocks, states, plan = ctx.blocks, ctx.states, ctx.plan
        if ctx.backward_runs:  # backward again (retain_graph=True): the first pass released the checkpoints
            ctx.kept, ctx.recorded = _replay_forward(blocks, states, plan, x_0)
        ctx.backward_runs += 1
        kept, recorded = ctx.kept, ctx.recorded
        if 0 in plan.forward_checkpoints:
            kept.keep(0, x_0, from_forward=False)
        current: Tensor | None = None
        upstream: Tensor | None = grad_output  # ∂L/∂x_{i+1} for the next block to turn
        snapshots: dict[int, list[Tensor]] = {}  # buffers to put back once a recomputed block has turned
        parameter_gradients: dict[int, Tensor] = {}  # by id, summed: a block may appear twice
        for action, index in plan.backward:
            if action == "restore":
                current = kept.get(index, f"block {index}")
            elif action == "store":
                kept.keep(index, current, from_forward=False)  # type: ignore[arg-type]
            elif action == "drop":
                kept.release(index)
            elif action in ("advance", "record"):  # x_{i+1} = F_i(x_i), as block i ran in forward
                snapshots[index] = states[index].snapshot_buffers()
                with states[index].replayed():
                    current = _run(blocks[index], current, index, record=action == "record", recorded=recorded)  # type: ignore[arg-type]
                if action == "advance":
                    states[index].restore_buffers(snapshots.pop(index))
            else:  # "turn": back-propagate through block i
                needs_input = index > 0 or ctx.needs_input_grad[0]
                if index not in recorded:  # evaluate it at x_i with its graph
                    snapshots[index] = states[index].snapshot_buffers()
                    with states[index].replayed():
                        _run(blocks[index], current, index, record=True, recorded=recorded)  # type: ignore[arg-type]
                block_input, block_output = recorded.pop(index)
                # ∂L/∂x_i = F_i'(x_i)ᵀ ∂L/∂x_{i+1}; the block's parameters as its forward run listed them (the
                # check above has made sure they are still the modules' own): no module walk per turn
                upstream, found = vector_jacobian_products(
                    block_output, block_input if needs_input else None, states[index].parameters, upstream)  # type: ignore[arg-type]
                accumulate(parameter_gradients, states[index].parameters, found)
                del block_input, block_output
                if index in snapshots:  # the recomputation updated BatchNorm's statistics again: undo it
                    states[index].restore_buffers(snapshots.pop(index))
                current = None
        return (
            upstream if ctx.needs_input_grad[0] else None,  # x
            None,  # blocks
            None,  # plan
            None,  # preserve_rng
            *(parameter_gradients.get(id(p)) for p in parameters),  # every parameter, in the order given
        )


def _replay_forward(blocks: list[nn.Module], states: list[ForwardState], plan: CheckpointPlan, x: Tensor) -> tuple[Stash, dict[int, tuple[Tensor, Tensor]]]:
    """The forward pass's checkpoints and recorded graphs, rebuilt from ``x`` = :math:`x_0` as they were."""
    kept, recorded = Stash(), {}
    for action, index in plan.forward:
        if action == "store":
            if index:
                kept.keep(index, x, from_forward=False)
            continue
        with states[index].buffers_restored(), states[index].replayed():
            x = _run(blocks[index], x, index, record=action == "record", recorded=recorded)
    return kept, recorded


def _run(block: nn.Module, x: Tensor, index: int, *, record: bool, recorded: dict[int, tuple[Tensor, Tensor]]) -> Tensor:
    """Block ``index`` on ``x``: without a graph, or (``record``) with one, kept in ``recorded`` for its turn."""
    if not record:
        with torch.no_grad():
            return run_checked(block, x, f"block {index}", same_shape=False)
    block_input = x.detach().requires_grad_(x.is_floating_point() or x.is_complex())
    with torch.enable_grad():
        block_output = run_checked(block, block_input, f"block {index}", same_shape=False)
    recorded[index] = (block_input, block_output)
    return block_output.detach()


@torch.compiler.disable  # run eagerly under torch.compile (the plan is Python control flow), its blocks compiled
def _checkpointed(x: Tensor, sequence: CheckpointedSequence) -> Tensor:
    blocks = list(sequence)  # in order, a repeated block once per use
    # sequence.parameters() at half the cost (no generators or name prefixes): one walk per call, not per block
    parameters = module_parameters(sequence)
    return _CheckpointFunction.apply(x, blocks, sequence.plan, sequence.preserve_rng_state, *parameters)


class CheckpointedSequence(nn.Sequential):
    r"""Blocks run in order, like ``nn.Sequential``, whose backward pass recomputes instead of storing.

    ``CheckpointedSequence(block1, block2, ..., schedule="revolve", slots=3)``. With gradients enabled the
    forward pass keeps only the block inputs that the schedule's :func:`checkpoint_plan` names, and none of
    the blocks' internal activations; the backward pass rebuilds what it needs, and releases each kept input
    as soon as the plan has no more use for it, so that at no moment more inputs are held than the plan says
    (see the module documentation for the schedules and their costs). Gradients equal those of
    ``nn.Sequential`` over the same blocks: the recomputation replays each block's random state (dropout
    masks), autocast state and BatchNorm statistics (updated once per forward pass), as
    :class:`~revlib.reversible.ReversibleSequence` does. Blocks may change the shape of their input, and a
    block may appear more than once (it then runs each time, and its parameters receive the sum of the
    gradients, as in ``nn.Sequential``). Under ``torch.no_grad()``, or when neither the input nor any
    parameter requires grad, the blocks simply run one after another.

    It is an ``nn.Sequential``: indexing, iteration, ``len``, ``append``, ``insert``, ``extend``, ``del``,
    ``+`` and slicing work as there, and the plan follows the blocks (it is made for the current number of
    blocks at every call); slices and sums are ``CheckpointedSequence`` objects with the same schedule.

    The parameters are saved for backward (an in-place change between forward and backward fails with
    autograd's error; replaced parameters with a clear one), and so are the kept inputs (a kept input
    changed in place fails with a clear error). A block must not change its own input in place (an in-place
    first operation such as ``nn.ReLU(inplace=True)``): that raises a ``ValueError`` naming the block.
    Tensors that a block captures by closure rather than holds as a parameter or buffer receive no gradient.
    A double backward raises an error.

    With ``schedule="optimal"`` the plan is the fastest one for the blocks' :class:`BlockCosts` within
    ``budget`` bytes (:func:`checkpoint_plan` states what the budget counts); it may record blocks (keep
    their graphs from the forward pass) as well as store their inputs. The costs describe the blocks given
    here: a sequence whose number of blocks changes needs new costs (its plan raises until it has them).

    Args:
        *blocks: the blocks, ``nn.Module`` objects.
        schedule: ``"every"``, ``"sqrt"``, ``"revolve"`` or ``"optimal"``.
        slots: for ``"revolve"``, the most block inputs kept at once (at least 1; the input among them).
        costs: for ``"optimal"``, the blocks' :class:`BlockCosts` (e.g. from :func:`measure_block_costs`).
        budget: for ``"optimal"``, the bytes the plan may hold (the memory model's, see :func:`checkpoint_plan`).
        memory_saving: recompute in the backward pass (the default); ``False`` runs the blocks with
            ordinary autograd, as ``nn.Sequential`` does.
        preserve_rng_state: replay each block's random state in the recomputation (needed for dropout).

    Raises:
        TypeError: a block is not an ``nn.Module``, or ``costs`` not a :class:`BlockCosts`.
        ValueError: an unknown schedule, a missing or bad ``slots``, or for ``"optimal"`` missing costs or
            budget, costs for another number of blocks, or a budget no plan fits (the message gives the least).
    """

    def __init__(
        self,
        *blocks: nn.Module,
        schedule: ScheduleName = "every",
        slots: int | None = None,
        costs: BlockCosts | None = None,
        budget: float | None = None,
        memory_saving: bool = True,
        preserve_rng_state: bool = True,
    ) -> None:
        for index, block in enumerate(blocks):
            if not isinstance(block, nn.Module):
                raise TypeError(f"block {index} must be an nn.Module, got {type(block).__name__}")
        checkpoint_plan(max(len(blocks), 1), schedule, slots, costs=costs, budget=budget)  # checks the schedule and its budget now
        super().__init__(*blocks)
        self.schedule = schedule
        self.slots = slots
        self.costs = costs
        self.budget = budget
        self.memory_saving = memory_saving
        self.preserve_rng_state = preserve_rng_state

    @property
    def plan(self) -> CheckpointPlan:
        """The schedule's plan for the blocks the sequence holds now."""
        if not len(self):
            raise ValueError("an empty CheckpointedSequence has no plan")
        return checkpoint_plan(len(self), self.schedule, self.slots, costs=self.costs, budget=self.budget)

    def _like(self, blocks: Iterable[nn.Module]) -> CheckpointedSequence:
        blocks = list(blocks)
        if self.schedule == "optimal":  # the costs are the original blocks': a new chain runs as "every" would not keep the budget
            raise ValueError("a CheckpointedSequence with schedule='optimal' cannot be sliced, added or repeated: its costs "
                             "describe its own blocks; build a new one with the new blocks' BlockCosts")
        return CheckpointedSequence(*blocks, schedule=self.schedule, slots=self.slots, memory_saving=self.memory_saving,
                                    preserve_rng_state=self.preserve_rng_state)

    def __getitem__(self, index: int | slice) -> nn.Module:  # type: ignore[override]
        if isinstance(index, slice):
            return self._like(list(self._modules.values())[index])  # type: ignore[misc]
        return super().__getitem__(index)

    def __add__(self, other: nn.Sequential) -> CheckpointedSequence:  # type: ignore[override]
        if not isinstance(other, nn.Sequential):
            return NotImplemented
        return self._like([*self, *other])

    def __mul__(self, count: int) -> CheckpointedSequence:  # type: ignore[override]
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"a sequence can be repeated a positive integer number of times, got {count!r}")
        return self._like(list(self) * count)

    __rmul__ = __mul__

    def forward(self, x: Tensor) -> Tensor:
        if not self.memory_saving or not len(self) or not needs_graph([x], self.parameters()):
            return super().forward(x)
        return _checkpointed(x, self)

    def extra_repr(self) -> str:
        slots = f", slots={self.slots}" if self.slots is not None else ""
        slots += f", budget={self.budget!r}" if self.budget is not None else ""
        return f"schedule={self.schedule!r}{slots}" + ("" if self.memory_saving else ", memory_saving=False")

