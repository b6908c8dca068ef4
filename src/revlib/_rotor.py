r"""Optimal checkpointing of a chain of *unequal* blocks: the "rotor" dynamic programme.

Griewank's revolve (:mod:`revlib.checkpoint`) makes the fewest advances for a number of stored block
inputs, which is the right count when every block costs the same and every block input has the same size.
Real networks are not like that: a ResNet halves its activations at each stage, a Transformer alternates
attention and MLP sub-blocks. Beaumont, Eyraud-Dubois, Herrmann, Joly and Shilova
(2019, "Optimal checkpointing for heterogeneous chains: how to train deep neural networks with limited
memory", arXiv:1911.13214) solve the unequal chain by a dynamic programme over segments of the chain and a
memory budget; this module writes it for revlib's execution model. It needs no torch.

**The chain and its plan.** :math:`x_{i+1} = F_i(x_i)`, :math:`i = 0, \dots, N-1` (the notation of the
book's checkpointing chapter). Block :math:`i` costs :math:`\phi_i` to run without a graph and
:math:`\psi_i` to back-propagate through its recorded graph; its input :math:`x_i` has :math:`a_i` bytes
(:math:`a_N`: the chain's output) and its recorded graph holds :math:`g_i` bytes besides its input
:math:`x_i` and its output :math:`x_{i+1}` (which it keeps alive: the backward through it starts from the
output tensor). A plan is two lists of ``(action, i)`` pairs:

* the forward pass, from :math:`x_0` to :math:`x_N`: ``("store", i)`` keeps the current :math:`x_i`;
  ``("advance", i)`` runs block :math:`i` without a graph (:math:`x_i \to x_{i+1}`, cost :math:`\phi_i`);
  ``("record", i)`` runs it with its graph and keeps the graph (cost :math:`\phi_i`);
* the backward pass, from the loss's gradient :math:`\bar x_N`: the same three and ``("restore", i)``
  (make a kept :math:`x_i` current), ``("drop", i)`` (release a kept :math:`x_i`) and ``("turn", i)``,
  which turns :math:`\bar x_{i+1}` into :math:`\bar x_i`: through the recorded graph (cost
  :math:`\psi_i`) or by running block :math:`i` with its graph on the current :math:`x_i` and
  back-propagating at once (cost :math:`\phi_i + \psi_i`). Blocks are turned once each, from the last: the loss (block :math:`N`, below) first, then
  :math:`N-1`.

**The memory model.** The loss is appended as block :math:`N` (:math:`\phi_N = \psi_N = g_N = 0`, its
output gradient of size :math:`a_{N+1} = 0`): turning it needs :math:`x_N` current and creates
:math:`\bar x_N`; it is the moment between the two passes. A state is the set :math:`K` of kept inputs, the
set :math:`R` of recorded blocks, the current input :math:`x_c` (or none: a turn consumes it) and the
number :math:`\nu` of blocks not yet turned (:math:`N+1` during the forward pass). An input is counted once
however many roles it has (kept, current, input or output of recorded graphs: making :math:`x_{i+1}`
while it is held replaces the held copy), and the one gradient alive is :math:`\bar x_\nu`:

.. math:: H(K, R, c, \nu) = \sum_{i \in K \cup R \cup (R + 1) \cup \{c\}} a_i + \sum_{i \in R} g_i + a_\nu ,
    \qquad R + 1 = \{ i + 1 : i \in R \} .

During an action the new tensors add to it:

.. math::
    \text{advance } i:\ H + a_{i+1}, \qquad \text{record } i:\ H + g_i + a_{i+1}, \qquad
    \text{turn } i:\ \begin{cases} H + a_i & \text{recorded,} \\ H + g_i + a_{i+1} + a_i & \text{not} \end{cases}

(a turn holds :math:`\bar x_{i+1}` and makes :math:`\bar x_i`; without a recorded graph it also makes the
graph and the output :math:`x_{i+1}`, just as recording block :math:`i` and turning it at once would). A
plan's peak is the largest of these over its actions, :math:`H` before the first one (:math:`a_0`)
included; it fits a budget :math:`M` when the peak is at most :math:`M`. :func:`simulate` computes the
peak and the time of any plan under this model, the dynamic programme optimises over it, and
``tests/test_rotor.py`` searches every plan built from the same transitions (``_step``).

**The dynamic programme.** Let :math:`\tau(i, j, m)` be the least time to turn blocks
:math:`j-1, \dots, i` starting from :math:`x_i` current (and kept) and :math:`\bar x_j`, within :math:`m`
bytes that include :math:`x_i` and :math:`\bar x_j` (whatever enclosing segments hold is already
subtracted). One block is one turn:

.. math:: \tau(i, i+1, m) = \phi_i + \psi_i \quad\text{if } m \ge 2a_i + g_i + 2a_{i+1}.

A longer segment either *records* block :math:`i` and keeps its graph while it solves the rest, or keeps
:math:`x_i`, *advances* to some :math:`x_k`, solves :math:`[k, j)` while :math:`x_i` is kept, then
restores :math:`x_i` and solves :math:`[i, k)` with the memory :math:`[k, j)` gave back:

.. math::
    \tau(i, j, m) = \min\Big( \phi_i + \tau(i+1, j, m - a_i - g_i) + \psi_i ,\;
        \min_{i < k < j} \sum_{p=i}^{k-1} \phi_p + \tau(k, j, m - a_i) + \tau(i, k, m) \Big)

where the first term needs :math:`m \ge a_i + g_i + a_{i+1} + \max(a_j, a_i + a_{i+1})` (the record,
and the final turn of block :math:`i` beside its graph's output and :math:`\bar x_{i+1}`), the
:math:`k`-th needs :math:`m \ge a_i + a_j + \max_{i \le p < k} ([p > i]\,a_p + a_{p+1})` (the
advances), and an infeasible term is :math:`+\infty`. The answer is :math:`\tau(0, N+1, M)`; its forward
pass is everything before the loss's turn.

**Which plans it optimises over.** A segment's input stays kept until the segment's first block is
turned: the paper's *persistent* plans, and the recurrence finds the fastest of them (``tests/test_rotor.py``
checks it against a search over every persistent plan of small chains, at every budget). Plans that drop a
kept input *before* its block is turned and rebuild it later can be faster when memory is tighter at some
turns than at others (unequal turns and gradients make it so): an input kept while memory is plentiful
(the forward pass) is used once and dropped to make room for a large turn. The tests give a four-block
chain where such a plan takes 53 and the best persistent one 57, and ``benchmarks/persistent_plans.py``
counts how often it happens on random small chains.

**Discretisation and cost.** The memory axis is discretised into at most ``units`` units of
``unit_bytes`` :math:`= \max(M / \text{units}, 1)` bytes: every size is rounded *up* to whole units and the budget
*down*, so a plan that fits in units fits in bytes. The plan is optimal for the discretised problem (for
the real one when the sizes are whole multiples of ``unit_bytes``, e.g. integers with :math:`M \le`
``units``), and plain backprop, the fastest of all plans, is returned whenever it fits the budget in bytes.
With :math:`U` = ``units``, the table has :math:`O(N^2 U)` entries and costs :math:`O(N^3 U)` operations, vectorised over
the split :math:`k` and the memory :math:`m` with NumPy (N = 64 blocks and 500 units: about a tenth of a
second). The least budget any plan fits is found exactly in bytes by the same recursion with the peak as
its objective (:math:`O(N^3)`).

**Revolve as a special case.** With equal blocks (:math:`a_i = a`, :math:`g_i = g`), no records and
:math:`M = (s + 4)\,a + g` (a turn holds its input, its output, two gradients and the graph), every turn
allows :math:`s` kept inputs besides the current one, as revolve with ``slots`` :math:`= s` does. The one
difference is the moment between the passes, which holds no graph and one gradient: there the forward
pass can keep :math:`x_{N-1}` as well and turn block :math:`N-1` without rebuilding its input. The plan
then makes :math:`t(N, s) - (N - 1)` advances, Griewank's count for :math:`N` steps whose first sweep ends
with its last state in hand, which is :func:`~revlib.checkpoint.optimal_recomputations`
:math:`(N-1, s)`: fewer than revolve's :math:`(N, s)` by the rebuild of :math:`x_{N-1}`.

Reference: O. Beaumont, L. Eyraud-Dubois, J. Herrmann, A. Joly, A. Shilova, "Optimal checkpointing for
heterogeneous chains: how to train deep neural networks with limited memory", arXiv:1911.13214 (2019).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

Action = tuple[str, int]  # (name, block index): see the module documentation
FORWARD_ACTIONS = ("store", "advance", "record")
BACKWARD_ACTIONS = ("restore", "advance", "record", "store", "drop", "turn")
_RECORD = -1  # in the choice tables: block s is recorded (a split is stored as its j > s)


@dataclass(frozen=True)
class ChainPlan:
    """A plan for a chain of unequal blocks and what the memory model predicts for it.

    Attributes:
        forward: the forward pass's actions, ``("store" | "advance" | "record", i)``.
        backward: the backward pass's actions, from :math:`\\bar x_N` to :math:`\\bar x_0`.
        time: the predicted time of both passes, :math:`\\sum` of the actions' costs.
        peak_bytes: the predicted peak (the module documentation's :math:`H` and its transients).
        budget: the budget the plan was made for (``peak_bytes <= budget``).
        unit_bytes: the size of one memory unit of the dynamic programme.
    """

    forward: tuple[Action, ...]
    backward: tuple[Action, ...]
    time: float
    peak_bytes: float
    budget: float
    unit_bytes: float

    @property
    def steps(self) -> int:
        """The number of blocks :math:`N`."""
        return sum(name in ("advance", "record") for name, _ in self.forward)

    @property
    def advances(self) -> int:
        """Blocks run again without a graph in the backward pass (recomputations besides the turns)."""
        return sum(name == "advance" for name, _ in self.backward)

    @property
    def records(self) -> int:
        """Blocks run with their graph kept for later, in either pass."""
        return sum(name == "record" for name, _ in (*self.forward, *self.backward))


@dataclass(frozen=True)
class Simulation:
    """What :func:`simulate` predicts for a plan: its time and its peak bytes."""

    time: float
    peak_bytes: float


# ---------------------------------------------------------------------------------------------------------
# The model: the chain with the loss appended, a state, and one action's effect (shared by the simulator,
# the dynamic programme's checks and the tests' exhaustive search).


@dataclass(frozen=True)
class _Chain:
    """The validated chain, extended by the loss as block N: f, b, g have N + 1 entries, a has N + 2."""

    f: tuple[float, ...]  # forward times φ_0 … φ_N (φ_N = 0)
    b: tuple[float, ...]  # backward times ψ_0 … ψ_N (ψ_N = 0)
    a: tuple[int | Fraction, ...]  # input sizes a_0 … a_N, then a_{N+1} = 0 (the loss's output gradient), exact
    g: tuple[int | Fraction, ...]  # graph sizes g_0 … g_N (g_N = 0), exact

    @property
    def steps(self) -> int:
        return len(self.f) - 1


@dataclass(frozen=True)
class _State:
    """Kept inputs K, recorded blocks R, the current input c (None after a turn), blocks left to turn ν."""

    kept: frozenset[int]
    recorded: frozenset[int]
    current: int | None
    left: int


def _start(chain: _Chain) -> _State:
    """Before the forward pass: x_0 current, nothing kept or recorded, every block (the loss too) to turn."""
    return _State(frozenset(), frozenset(), 0, chain.steps + 1)


def _held(state: _State, chain: _Chain) -> int | Fraction:
    """H(K, R, c, ν) = Σ_{i ∈ K ∪ R ∪ (R+1) ∪ {c}} a_i + Σ_{i ∈ R} g_i + a_ν."""
    outputs = frozenset(i + 1 for i in state.recorded)  # a recorded graph holds its output as well as its input
    live = state.kept | state.recorded | outputs | ({state.current} if state.current is not None else frozenset())
    return sum(chain.a[i] for i in live) + sum(chain.g[i] for i in state.recorded) + chain.a[state.left]


class _InvalidAction(ValueError):
    """An action the state does not allow."""


def _step(state: _State, action: Action, chain: _Chain) -> tuple[_State, float, int | Fraction]:
    """One action: the state after it, its time, and the most bytes held while it runs."""
    name, i = action
    kept, recorded, current, left = state.kept, state.recorded, state.current, state.left
    held = _held(state, chain)
    if name == "store":
        if current != i:
            raise _InvalidAction(f"store {i}: x_{i} is not current (current: {_name(current)})")
        after, time, during = _State(kept | {i}, recorded, current, left), 0.0, held
    elif name == "drop":
        if i not in kept:
            raise _InvalidAction(f"drop {i}: x_{i} is not kept")
        after, time, during = _State(kept - {i}, recorded, current, left), 0.0, held
    elif name == "restore":
        if i not in kept:
            raise _InvalidAction(f"restore {i}: x_{i} is not kept")
        after, time, during = _State(kept, recorded, i, left), 0.0, held
    elif name in ("advance", "record"):
        if current != i:
            raise _InvalidAction(f"{name} {i}: x_{i} is not current (current: {_name(current)})")
        if i >= chain.steps:
            raise _InvalidAction(f"{name} {i}: the chain has blocks 0 … {chain.steps - 1}")
        if name == "record" and i in recorded:
            raise _InvalidAction(f"record {i}: block {i} is already recorded")
        if name == "advance":  # x_{i+1} is made while x_i is held
            after, during = _State(kept, recorded, i + 1, left), held + chain.a[i + 1]
        else:  # and the graph with it
            after, during = _State(kept, recorded | {i}, i + 1, left), held + chain.g[i] + chain.a[i + 1]
        time = chain.f[i]
    elif name == "turn":
        if i != left - 1:
            expected = f"block {left - 1}" if left > 0 else "no block: every block is turned"
            raise _InvalidAction(f"turn {i}: blocks turn once each, last first; the next is {expected}")
        if i in recorded:  # δ_i made from δ_{i+1} through the kept graph
            time, during = chain.b[i], held + chain.a[i]
        elif current == i:  # the graph and x_{i+1} rebuilt from x_i, then δ_i
            time, during = chain.f[i] + chain.b[i], held + chain.g[i] + chain.a[i + 1] + chain.a[i]
        else:
            raise _InvalidAction(f"turn {i}: block {i} has no recorded graph and x_{i} is not current (current: {_name(current)})")
        after = _State(kept, recorded - {i}, None, i)
    else:
        raise _InvalidAction(f"unknown action {name!r}; the actions are {BACKWARD_ACTIONS}")
    return after, time, max(during, held, _held(after, chain))


def _name(current: int | None) -> str:
    return "none" if current is None else f"x_{current}"


# ---------------------------------------------------------------------------------------------------------
# The simulator


def simulate(
    forward: Iterable[Action],
    backward: Iterable[Action],
    forward_time: Sequence[float],
    backward_time: Sequence[float],
    input_bytes: Sequence[float],
    activation_bytes: Sequence[float],
) -> Simulation:
    r"""The time :math:`\sum` of the actions' costs and the peak :math:`\max H` of any plan under the
    memory model of this module, and a check that the plan is valid.

    Args:
        forward: the forward pass's actions (``"store"``, ``"advance"``, ``"record"``), ending with
            :math:`x_N` current.
        backward: the backward pass's actions, starting from :math:`\bar x_N` with nothing current.
        forward_time: :math:`\phi_i`, the time of block :math:`i` without its graph, :math:`N` entries.
        backward_time: :math:`\psi_i`, the time of the backward through block :math:`i`'s graph, :math:`N`.
        input_bytes: :math:`a_i`, the size of :math:`x_i`, :math:`N + 1` entries (:math:`x_N` the output).
        activation_bytes: :math:`g_i`, what block :math:`i`'s recorded graph holds besides its input and
            output, :math:`N` entries.

    Returns:
        :class:`Simulation` with ``time`` and ``peak_bytes``.

    Raises:
        ValueError: bad sizes or times (see :func:`optimal_chain_plan`), or an invalid plan: an action
            that is not allowed where it stands (a turn out of order or without its input or graph, a
            restore or drop of an input not kept, an advance or record of a block whose input is not
            current, a backward action in the forward pass), a forward pass that does not end at
            :math:`x_N`, or a block never turned. The message names the action and its position.
    """
    chain = _validated_chain(forward_time, backward_time, input_bytes, activation_bytes)
    state = _start(chain)
    time, peak = 0.0, _held(state, chain)
    for position, action in enumerate(forward):
        if action[0] not in FORWARD_ACTIONS:
            raise ValueError(f"forward action {position} {action}: the forward pass only stores, advances and records")
        state, cost, during = _checked_step(state, action, chain, f"forward action {position}")
        time, peak = time + cost, max(peak, during)
    if state.current != chain.steps:
        raise ValueError(f"the forward pass ends with {_name(state.current)} current, not the output x_{chain.steps}")
    state, _, during = _step(state, ("turn", chain.steps), chain)  # the loss: δ_N made, x_N consumed
    peak = max(peak, during)
    for position, action in enumerate(backward):
        state, cost, during = _checked_step(state, action, chain, f"backward action {position}")
        time, peak = time + cost, max(peak, during)
    if state.left:
        raise ValueError(f"the backward pass ends before turning blocks {list(range(state.left))}")
    return Simulation(time, _plain(peak))


def _checked_step(state: _State, action: Action, chain: _Chain, where: str) -> tuple[_State, float, int | Fraction]:
    if not (isinstance(action, tuple) and len(action) == 2 and isinstance(action[0], str) and isinstance(action[1], int)):
        raise ValueError(f"{where}: an action is a pair (name, block index), got {action!r}")
    try:
        return _step(state, action, chain)
    except _InvalidAction as error:
        raise ValueError(f"{where}: {error}") from None


# ---------------------------------------------------------------------------------------------------------
# The dynamic programme


def optimal_chain_plan(
    forward_time: Sequence[float],
    backward_time: Sequence[float],
    input_bytes: Sequence[float],
    activation_bytes: Sequence[float],
    budget: float,
    *,
    allow_record: bool = True,
    units: int = 500,
) -> ChainPlan:
    r"""The fastest plan within ``budget`` bytes for a chain of unequal blocks:
    :math:`\tau(0, N+1, M)` of the module's recurrence.

    .. math:: \tau(i, j, m) = \min\Big( \phi_i + \tau(i+1, j, m - a_i - g_i) + \psi_i ,\;
        \min_{i < k < j} \sum_{p=i}^{k-1} \phi_p + \tau(k, j, m - a_i) + \tau(i, k, m) \Big)

    Args:
        forward_time: :math:`\phi_i`, block :math:`i`'s time without a graph, :math:`N \ge 1` entries.
        backward_time: :math:`\psi_i`, the backward through block :math:`i`'s recorded graph, :math:`N`.
        input_bytes: :math:`a_i`, the bytes of :math:`x_i`, :math:`N + 1` entries (:math:`a_N`: the output).
        activation_bytes: :math:`g_i`, what block :math:`i`'s recorded graph holds besides its input
            :math:`x_i` and its output :math:`x_{i+1}` (the model counts those as kept by the graph), :math:`N`.
        budget: :math:`M`, the most bytes the plan may hold at once.
        allow_record: whether blocks may be recorded; ``False`` gives pure checkpointing (revolve's actions).
        units: the number of memory units the budget is divided into (sizes rounded up to whole units of
            :math:`\max(M/\text{units}, 1)` bytes); more is finer and slower, :math:`O(N^3\,\text{units})`.

    Returns:
        :class:`ChainPlan`: the two passes' actions, the predicted time, the predicted peak (at most
        ``budget``, measured on the real sizes), the budget and the unit. Where plain backprop fits the
        budget (every block recorded; without records, every input stored) it is the plan: no plan is
        faster. When the rounding leaves no plan at a budget just above the least feasible one, a plan of
        least peak is returned: it fits, but may not be the fastest at this budget; more ``units`` finds
        the fastest.

    Raises:
        ValueError: lengths that disagree, a negative or non-finite time or size, a budget that is not
            positive or below the least peak any plan reaches (the message gives it), or ``units`` not a
            positive integer.
    """
    chain = _validated_chain(forward_time, backward_time, input_bytes, activation_bytes)
    if isinstance(budget, (bool, np.bool_)) or not isinstance(budget, (int, float, np.integer, np.floating)) or not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"budget must be a positive number of bytes, got {budget!r}")
    if isinstance(units, bool) or not isinstance(units, int) or units < 1:
        raise ValueError(f"units must be a positive integer, got {units!r}")
    if not isinstance(allow_record, bool):
        raise ValueError(f"allow_record must be True or False, got {allow_record!r}")
    least, least_choice = _least_peak(chain, allow_record)
    if least > budget:
        raise ValueError(
            f"no plan fits in budget={budget!r} bytes: the least peak of any plan{'' if allow_record else ' without records'} "
            f"is {least!r} bytes"
        )
    unit = max(Fraction(budget) / units, Fraction(1))
    sizes = _in_units(chain.a, unit), _in_units(chain.g, unit)
    memory = math.floor(Fraction(budget) / unit)
    # Every block runs at least once and is turned once, so the plan that runs nothing again (recording every
    # block; without records, storing every input) is the fastest of all: where it fits, it is the answer,
    # whatever the rounding would have made of its sizes.
    actions = _emit(chain, sizes, lambda s, t, m: _RECORD if allow_record else s + 1, memory)
    predicted = None
    forward, backward = _passes(actions, chain)
    simulated = simulate(forward, backward, forward_time, backward_time, input_bytes, activation_bytes)
    if simulated.peak_bytes > budget:
        cost, choice = _time_table(chain, *sizes, memory, allow_record)
        if math.isfinite(cost[0, chain.steps + 1, memory]):
            actions = _emit(chain, sizes, lambda s, t, m: int(choice[s, t, m]), memory)
            predicted = float(cost[0, chain.steps + 1, memory])
        else:  # the rounding cost the last units: fall back to the least peak, which fits by the check above
            actions = _emit(chain, sizes, lambda s, t, m: least_choice[s, t], memory)
        forward, backward = _passes(actions, chain)
        simulated = simulate(forward, backward, forward_time, backward_time, input_bytes, activation_bytes)
    assert simulated.peak_bytes <= budget, "the plan exceeds its budget: the rounding should prevent this"
    assert predicted is None or math.isclose(simulated.time, predicted, rel_tol=1e-9, abs_tol=1e-12), "the table and the plan disagree"
    return ChainPlan(forward, backward, simulated.time, simulated.peak_bytes, float(budget), float(unit))


def _passes(actions: list[Action], chain: _Chain) -> tuple[tuple[Action, ...], tuple[Action, ...]]:
    """The actions before the loss's turn (the forward pass) and after it (the backward pass)."""
    loss_turn = actions.index(("turn", chain.steps))
    return tuple(actions[:loss_turn]), tuple(actions[loss_turn + 1 :])


def least_peak_bytes(
    forward_time: Sequence[float],
    backward_time: Sequence[float],
    input_bytes: Sequence[float],
    activation_bytes: Sequence[float],
    *,
    allow_record: bool = True,
) -> float:
    """The least budget :func:`optimal_chain_plan` accepts: the least peak of any plan of the recurrence's
    family, in bytes, exactly (the recurrence with the peak as its objective, :math:`O(N^3)`).

    Raises:
        ValueError: bad sizes or times, as :func:`optimal_chain_plan` says.
    """
    chain = _validated_chain(forward_time, backward_time, input_bytes, activation_bytes)
    return _least_peak(chain, allow_record)[0]


def _time_table(chain: _Chain, a: list[int], g: list[int], memory: int, allow_record: bool) -> tuple[np.ndarray, np.ndarray]:
    """τ(s, t, m) for 0 ≤ s < t ≤ N + 1 and m = 0 … memory units, and the choice that reaches it
    (_RECORD, or the split j); sizes in units. (The module documentation's τ(i, j, m), split at k: here s, t
    and j, the code's names.) Segments by increasing length: both sides of a split and
    the rest after a record are shorter."""
    positions = chain.steps + 2
    m = np.arange(memory + 1)  # (U,)
    cost = np.full((positions, positions, memory + 1), np.inf)  # (N+2, N+2, U)
    choice = np.zeros((positions, positions, memory + 1), dtype=np.int16)
    elapsed = np.concatenate([[0.0], np.cumsum(chain.f)])  # elapsed[j] − elapsed[s] = Σ_{k=s}^{j−1} f_k
    for s in range(chain.steps + 1):  # one block: its turn
        cost[s, s + 1, m >= 2 * a[s] + g[s] + 2 * a[s + 1]] = chain.f[s] + chain.b[s]
    for length in range(2, chain.steps + 2):
        for s in range(chain.steps + 2 - length):
            t = s + length
            splits = np.arange(s + 1, t)  # j, (J,)
            # the advances s … j−1 from x_s (kept) with δ_t alive: x_k and x_{k+1} held besides
            during = np.maximum.accumulate([(a[k] if k > s else 0) + a[k + 1] for k in range(s, t - 1)])
            total = (elapsed[splits] - elapsed[s])[:, None] + _less_memory(cost[s + 1 : t, t], a[s]) + cost[s, s + 1 : t]  # (J, U)
            total[m[None, :] < (a[s] + a[t] + during)[:, None]] = np.inf
            best = total.argmin(axis=0)  # (U,)
            value, chosen = total[best, m], splits[best]
            if allow_record:  # record block s, solve the rest beside its graph, turn it through the graph
                recorded = _less_memory(cost[s + 1, t], a[s] + g[s]) + chain.f[s] + chain.b[s]
                recorded[m < a[s] + g[s] + a[s + 1] + max(a[t], a[s] + a[s + 1])] = np.inf
                use = recorded <= value
                value, chosen = np.where(use, recorded, value), np.where(use, _RECORD, chosen)
            cost[s, t], choice[s, t] = value, chosen
    return cost, choice


def _less_memory(row: np.ndarray, held: int) -> np.ndarray:
    """row[..., m − held]: the table at ``held`` units fewer (infinite where that is negative)."""
    shifted = np.full_like(row, np.inf)
    if held < row.shape[-1]:
        shifted[..., held:] = row[..., : row.shape[-1] - held]
    return shifted


def _emit(chain: _Chain, sizes: tuple[list[int], list[int]], decide: Callable[[int, int, int], int], memory: int) -> list[Action]:
    """The actions of the choices, from τ(0, N+1, memory) down: both passes, the loss's turn between them."""
    a, g = sizes
    actions: list[Action] = []

    def solve(s: int, t: int, m: int, kept: bool) -> None:  # x_s current; kept: an enclosing segment keeps it
        if t == s + 1:
            actions.append(("turn", s))
            return
        j = decide(s, t, m)
        if j == _RECORD:
            actions.append(("record", s))
            solve(s + 1, t, m - a[s] - g[s], kept=False)
            actions.append(("turn", s))
            return
        if not kept:
            actions.append(("store", s))
        actions.extend(("advance", k) for k in range(s, j))
        solve(j, t, m - a[s], kept=False)
        actions.append(("restore", s))
        solve(s, j, m, kept=True)
        if not kept:
            actions.append(("drop", s))

    solve(0, chain.steps + 1, memory, kept=False)
    return actions


def _least_peak(chain: _Chain, allow_record: bool) -> tuple[float, dict[tuple[int, int], int]]:
    """The least peak of any plan of the recurrence's family, in bytes, exactly: the recurrence with
    max(peak) in place of the sum of times (ties broken by time), and the choices that reach it."""
    a, g, f, b = chain.a, chain.g, chain.f, chain.b
    best: dict[tuple[int, int], tuple[int | Fraction, float]] = {}  # (s, t) → (peak, time)
    choice: dict[tuple[int, int], int] = {}
    for s in range(chain.steps + 1):
        best[s, s + 1] = (2 * a[s] + g[s] + 2 * a[s + 1], f[s] + b[s])
    for length in range(2, chain.steps + 2):
        for s in range(chain.steps + 2 - length):
            t = s + length
            options: list[tuple[tuple[int | Fraction, float], int]] = []
            advances: int | Fraction = 0
            elapsed = 0.0
            for j in range(s + 1, t):
                advances = max(advances, (a[j - 1] if j - 1 > s else 0) + a[j])
                elapsed += f[j - 1]
                right, left = best[j, t], best[s, j]
                peak = max(a[s] + a[t] + advances, a[s] + right[0], left[0])
                options.append(((peak, elapsed + right[1] + left[1]), j))
            if allow_record:
                rest = best[s + 1, t]
                peak = max(a[s] + g[s] + a[s + 1] + max(a[t], a[s] + a[s + 1]), a[s] + g[s] + rest[0])
                options.append(((peak, f[s] + rest[1] + b[s]), _RECORD))
            best[s, t], choice[s, t] = min(options)
    return _plain(best[0, chain.steps + 1][0]), choice


def _in_units(sizes: Sequence[float], unit: Fraction) -> list[int]:
    """Each size rounded up to whole units, exactly (Fractions: no floating-point rounding at the edge)."""
    return [math.ceil(Fraction(size) / unit) for size in sizes]


# ---------------------------------------------------------------------------------------------------------
# The check: a search over every plan


def exhaustive_fastest(
    forward_time: Sequence[float],
    backward_time: Sequence[float],
    input_bytes: Sequence[float],
    activation_bytes: Sequence[float],
    budget: float,
    allow_record: bool = True,
    persistent: bool = False,
) -> float:
    """The least time over *all* plans within ``budget``: a shortest path over every state of the model, the
    check of :func:`optimal_chain_plan` on small chains (exponential in :math:`N`).

    A state is (kept inputs, recorded blocks, current input, blocks left to turn); the moves are every
    action of the module's ``_step`` (the simulator's own transitions) whose peak fits the budget. Two
    reductions lose nothing: a kept input no remaining turn needs is dropped at once (it only holds memory),
    and no action makes an input that no remaining turn needs (advancing or recording past the next turn's
    input; recording the next block to turn is its turn, which is offered as such). ``persistent``: only
    the plans that keep every stored input until its block is turned (no other drop).
    """
    chain = _validated_chain(forward_time, backward_time, input_bytes, activation_bytes)
    start = _start(chain)
    if _held(start, chain) > budget:
        return math.inf
    queue, counter, seen = [(0.0, 0, start)], itertools.count(1), set()
    while queue:
        time, _, state = heapq.heappop(queue)
        if state.left == 0:
            return time
        if state in seen:
            continue
        seen.add(state)
        for action in _moves(state, allow_record, persistent):
            try:
                after, cost, peak = _step(state, action, chain)
            except ValueError:
                continue
            if peak <= budget:
                after = _State(frozenset(i for i in after.kept if i < after.left), after.recorded, after.current, after.left)
                heapq.heappush(queue, (time + cost, next(counter), after))
    return math.inf


def _moves(state: _State, allow_record: bool, persistent: bool = False) -> list[Action]:
    """The actions worth trying in ``state`` (the reductions of :func:`exhaustive_fastest`)."""
    current, left = state.current, state.left
    found = [("turn", left - 1)] + [("restore", i) for i in state.kept if i != current]
    if not persistent:
        found += [("drop", i) for i in state.kept]
    if current is not None and current not in state.kept:
        found.append(("store", current))
    if current is not None and current + 1 < left:
        found.append(("advance", current))
        if allow_record and current not in state.recorded:
            found.append(("record", current))
    return found


# ---------------------------------------------------------------------------------------------------------
# Validation and conversion


def _validated_chain(forward_time: Sequence[float], backward_time: Sequence[float], input_bytes: Sequence[float], activation_bytes: Sequence[float]) -> _Chain:
    values = {"forward_time": forward_time, "backward_time": backward_time, "input_bytes": input_bytes, "activation_bytes": activation_bytes}
    checked: dict[str, tuple[float, ...]] = {}
    for name, given in values.items():
        try:
            numbers = tuple(given)
        except TypeError:
            raise ValueError(f"{name} must be a sequence of numbers, got {type(given).__name__}") from None
        for index, value in enumerate(numbers):
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise ValueError(f"{name}[{index}] must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}[{index}] must be finite and non-negative, got {value!r}")
        checked[name] = tuple(v.item() if isinstance(v, np.generic) else v for v in numbers)
    steps = len(checked["forward_time"])
    if steps < 1:
        raise ValueError("forward_time must have one entry per block, and the chain at least one block")
    for name, expected in (("backward_time", steps), ("activation_bytes", steps), ("input_bytes", steps + 1)):
        if len(checked[name]) != expected:
            raise ValueError(
                f"{name} must have {expected} entries for {steps} blocks (forward_time has {steps}), got {len(checked[name])}"
                + ("; input_bytes also needs the output's size" if name == "input_bytes" else "")
            )
    return _Chain(
        f=checked["forward_time"] + (0,),
        b=checked["backward_time"] + (0,),
        a=tuple(map(_exact, checked["input_bytes"])) + (0,),
        g=tuple(map(_exact, checked["activation_bytes"])) + (0,),
    )


def _exact(size: float) -> int | Fraction:
    """A size as an exact number (an int when whole), so that a peak, a sum of sizes, does not depend on the
    order of its terms: the least peak and a plan's simulated peak then agree to the byte, and a plan at the
    least budget fits it, whatever fractions of a byte the sizes have."""
    return int(size) if float(size).is_integer() else Fraction(size)


def _plain(size: int | Fraction) -> float:
    """An exact size as the library reports it: an int when whole, else the nearest float. Rounding is monotone,
    so comparing reported sizes orders them as the exact ones (ties aside)."""
    return size if isinstance(size, int) else float(size)


def checkpoint_plan_actions(plan: object) -> tuple[tuple[Action, ...], tuple[Action, ...]]:
    """A :class:`revlib.checkpoint.CheckpointPlan` (``"every"``, ``"sqrt"``, ``"revolve"``) as this module's two
    passes: its forward pass stores its checkpoints and advances every block; its backward pass is unchanged
    (its turns run their block with the graph: no block is recorded)."""
    kept = set(plan.forward_checkpoints)  # type: ignore[attr-defined]
    forward: list[Action] = []
    for index in range(plan.steps):  # type: ignore[attr-defined]
        if index in kept:
            forward.append(("store", index))
        forward.append(("advance", index))
    return tuple(forward), tuple(plan.backward)  # type: ignore[attr-defined]
