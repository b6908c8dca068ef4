r"""Fit a chain of blocks into a memory budget at the least predicted time: :func:`plan`, or a
:class:`Planner` that measures once and plans for many budgets, and :func:`budget_trials`, which checks the
plans by measurement against revolve.

A practitioner has a chain :math:`x_{i+1} = F_i(x_i)`, a batch and a number of bytes. :func:`plan` measures
what each block costs (:func:`revlib.checkpoint.measure_block_costs`, and what the code really holds while
a block runs: PyTorch's memory profiler on the CPU, the allocator's statistics on CUDA) and returns a module
over the same blocks that trains within the budget:

* plain backprop (an ``nn.Sequential``) when its measured step fits;
* otherwise the fastest plan of the unequal-block dynamic programme (``schedule="optimal"`` of
  :class:`~revlib.checkpoint.CheckpointedSequence`), which stores some block inputs, records some blocks'
  graphs and runs the others again in the backward pass.

**What the budget counts.** :math:`M` bounds what one forward and backward pass adds to what was allocated
before it (the model and the input :math:`x_0`), parameter gradients included, as the profiler counts it.
The dynamic programme's memory model (``revlib._rotor``) counts block inputs, recorded graphs and the one
output gradient alive, :math:`m`; what it leaves out is added as a reserve:

.. math:: M_{\text{chain}} = M + a_0 - P - T_{\max}, \qquad
    T_{\max} = \max_i \max\big(w^{\text{advance}}_i,\ w^{\text{record}}_i,\ w^{\text{turn}}_i\big),

where :math:`a_0` is given back because :math:`x_0` was allocated before the step (the model counts it
while it is needed), :math:`P` is the bytes of every parameter's gradient (held from its block's turn to the
end of the step), and :math:`w_i` are block :math:`i`'s measured temporaries beyond the model: what its
forward pass without a graph holds beyond its output, what its recording holds beyond its graph and output,
and what its backward pass holds beyond :math:`\delta_i` and its parameters' gradients. The bound is safe
when one block runs at a time (the plan's actions do); the module is then measured once, and where the
measurement exceeds :math:`M` after all (e.g. the random states the recomputation keeps, a few KiB), the
chain budget is lowered by the excess and the plan made again.

**Reversible couplings.** A maximal run of consecutive :class:`~revlib.reversible.ReversibleBlock` couplings
(splitting one dimension) can also run as one :class:`~revlib.reversible.ReversibleSequence`: its recorded
graph then keeps only its output, and its backward pass rebuilds the run's inputs by inversion, evaluating
each coupling's :math:`\mathcal F` and :math:`\mathcal G` once more. When plain backprop does not fit,
:func:`plan` measures the chain both ways, with each such run as one unit and block by block, plans each, and
returns the faster plan that fits; the gradients are backprop's up to the rounding of the rebuilt inputs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from revlib._checks import positive_integers
from revlib.checkpoint import BlockCosts, CheckpointedSequence, CheckpointPlan, _measuring, checkpoint_plan, measure_block_costs
from revlib.measure import compare_times
from revlib.reversible import ReversibleBlock, ReversibleSequence
from revlib.timeline import _segments, added_peak
from revlib.verify import relative_error

__all__ = ["BudgetTrial", "BudgetTrials", "PlanReport", "Planner", "budget_trials", "plan"]

_ATTEMPTS = 4  # plans made at most: each measured overshoot lowers the chain budget once


@dataclass(frozen=True)
class PlanReport:
    r"""What :func:`plan` chose, what it predicts and what it measured; ``str()`` gives a table.

    The plan is made over *units*: the blocks themselves, or, where :func:`plan` inverts reversible couplings,
    each maximal run of them as one :class:`~revlib.reversible.ReversibleSequence`; the per-unit attributes
    follow :attr:`units`.

    Attributes:
        strategy: ``"store everything"`` (plain backprop) or ``"optimal checkpointing"``, followed by
            ``", reversible runs inverted"`` when the units include inverted runs.
        budget: the budget given, in bytes.
        least_budget: the least budget any plan fits in (predicted), in bytes.
        predicted_peak: the most the step adds, predicted (bytes): measured for plain backprop; for
            checkpointing the plan's :math:`M` less :math:`a_0` plus the reserve :math:`P + T_{\max}`.
        measured_peak: the most the returned module's step added when measured once, in bytes.
        predicted_time: the step's predicted time in seconds (:math:`\\sum` of the plan's actions' costs).
        backprop_peak: plain backprop's step, measured, in bytes.
        backprop_time: plain backprop's step, predicted: :math:`\\sum_i f_i + b_i` seconds.
        kept: per unit, what the forward pass keeps for the backward pass: ``"graph"`` (recorded; for an
            inverted run, its output alone), ``"input"`` (its input stored) or ``"-"`` (nothing: rebuilt when
            needed).
        runs: per unit, how many times one step runs its forward pass (2 for a unit stored as an input and
            turned once; 1 for a recorded unit; an inverted run's backward pass evaluates its couplings once
            more on top).
        costs: the measured :class:`~revlib.checkpoint.BlockCosts` of the units (the activation bytes the
            larger of the saved-tensor count and the profiler's).
        reserve: :math:`P + T_{\max} - a_0`, the bytes added to the model's peak.
        plan: the :class:`~revlib.checkpoint.CheckpointPlan` when checkpointing, else ``None``.
        units: per unit, the indices ``(start, stop)`` of the blocks it runs and whether it is an inverted
            run of reversible couplings.
    """

    strategy: str
    budget: int
    least_budget: int
    predicted_peak: int
    measured_peak: int
    predicted_time: float
    backprop_peak: int
    backprop_time: float
    kept: tuple[str, ...]
    runs: tuple[int, ...]
    costs: BlockCosts
    reserve: int
    plan: CheckpointPlan | None
    units: tuple[tuple[int, int, bool], ...]

    def __str__(self) -> str:
        c = self.costs
        lines = [
            f"{self.strategy} within {_size(self.budget)} (least feasible {_size(self.least_budget)})",
            f"{'block':>9}  {'input':>10}  {'graph':>10}  {'forward':>10}  {'backward':>10}  {'kept':>5}  {'runs':>4}",
        ]
        for i, (start, stop, inverted) in enumerate(self.units):
            label = (f"{start}-{stop - 1}" if stop - start > 1 else f"{start}") + (" inv" if inverted else "")
            lines.append(
                f"{label:>9}  {_size(c.input_bytes[i]):>10}  {_size(c.activation_bytes[i]):>10}  {c.forward_time[i] * 1e3:>8.3f}ms"
                f"  {c.backward_time[i] * 1e3:>8.3f}ms  {self.kept[i]:>5}  {self.runs[i]:>4}"
            )
        lines += [
            f"peak:  predicted {_size(self.predicted_peak)}, measured {_size(self.measured_peak)}; "
            f"plain backprop {_size(self.backprop_peak)} ({self.measured_peak / self.backprop_peak:.2f}x)",
            f"time:  predicted {self.predicted_time * 1e3:.3f} ms; plain backprop {self.backprop_time * 1e3:.3f} ms "
            f"({self.predicted_time / self.backprop_time:.2f}x)",
        ]
        return "\n".join(lines)


def _size(value: float) -> str:
    return f"{value / 2**20:.2f} MiB" if value >= 2**20 else f"{value / 2**10:.1f} KiB"


def plan(blocks: Iterable[nn.Module], example: Tensor, *, budget: int, repeats: int = 5) -> nn.Module:
    r"""A module over ``blocks`` that trains within ``budget`` bytes at the least predicted time.

    Plain backprop when its measured step fits in the budget; otherwise the fastest plan of the unequal-block
    dynamic programme within :math:`M_{\text{chain}} = M + a_0 - P - T_{\max}` (module documentation):

    .. math:: \min_{\text{plans}} \sum_{\text{actions}} \text{cost} \quad\text{subject to}\quad
        \max_{\text{moments}} m + P + T_{\max} - a_0 \le M .

    Where the chain holds runs of reversible couplings, the plans over the blocks and over the chain with
    each run inverted as one unit (module documentation) compete, and the faster that fits is returned.

    The module holds the same block objects (the same parameters, nothing copied); its gradients equal plain
    backprop's (up to the rounding of the rebuilt inputs where runs are inverted). Measuring runs every block
    a few times: the caller's random stream and the blocks' buffers (BatchNorm's statistics) are left as they
    were, and no ``.grad`` is touched.

    Args:
        blocks: the chain's blocks, ``nn.Module`` objects in order (an ``nn.Sequential`` works).
        example: a batch :math:`x_0` of the size the module will train on, on the blocks' device; it
            requires grad if the input's gradient will be wanted.
        budget: :math:`M`, the most bytes one forward and backward pass (``module(x).sum().backward()`` or
            any loss) may add to what is allocated before it, the parameters' gradients included.
        repeats: timed runs per block measurement.

    Returns:
        An ``nn.Sequential`` (everything stored) or a :class:`~revlib.checkpoint.CheckpointedSequence`
        (``schedule="optimal"``) over the units — the blocks, or inverted runs of them as
        :class:`~revlib.reversible.ReversibleSequence` objects — with a :class:`PlanReport` as its ``report``
        attribute.

    Raises:
        TypeError: ``blocks`` is not an iterable of ``nn.Module`` objects, ``example`` is not a tensor, or
            ``budget`` is not a number.
        ValueError: ``blocks`` is empty, ``budget`` is not positive and finite, ``repeats`` is not positive,
            or no plan fits in the budget (the message gives the least budget that does).
    """
    _check_budget(budget)
    return Planner(blocks, example, repeats=repeats).plan(budget)


class Planner:
    r"""A chain measured once and planned for any budget; ``Planner(blocks, x).plan(B)`` is ``plan(blocks, x, budget=B)``.

    Measuring is the expensive part (every block timed and profiled, plain backprop's step profiled, and the
    chain measured a second time with its reversible runs inverted where it has any); a planner does it once
    and then fits the chain into as many budgets as asked. A measured overshoot (module documentation)
    raises the reserve for the later plans too.

    Args:
        blocks: the chain's blocks, ``nn.Module`` objects in order (an ``nn.Sequential`` works).
        example: a batch :math:`x_0` of the size the modules will train on, on the blocks' device; it
            requires grad if the input's gradient will be wanted.
        repeats: timed runs per block measurement.

    Raises:
        TypeError: ``blocks`` is not an iterable of ``nn.Module`` objects or ``example`` is not a tensor.
        ValueError: ``blocks`` is empty or ``repeats`` is not positive.
    """

    def __init__(self, blocks: Iterable[nn.Module], example: Tensor, *, repeats: int = 5) -> None:
        self.blocks = _checked_blocks(blocks)
        if not isinstance(example, Tensor):
            raise TypeError(f"example must be a tensor (a batch x_0), got {type(example).__name__}")
        positive_integers(repeats=repeats)
        self.example = example.detach().requires_grad_(example.requires_grad)
        self._repeats = repeats
        self._backprop = _measure_chain(self.blocks, self.example, repeats)  # the blocks as they are
        self._grouped = _inverted_runs(self.blocks)
        self._inverted: _Chain | None = None  # measured when first needed

    @property
    def backprop_peak(self) -> int:
        """Plain backprop's step over the blocks, measured, in bytes (the least budget that stores everything)."""
        return self._backprop.plain_peak

    @property
    def least_budget(self) -> int:
        """The least budget any plan fits in (predicted, raised by measured overshoots), in bytes."""
        return min(chain.least for chain in self._chains(everything=True))

    @property
    def backprop_time(self) -> float:
        r"""Plain backprop's step under the cost model, :math:`\sum_i f_i + b_i` seconds."""
        return self._backprop.plain_time

    @property
    def chain_reserve(self) -> int:
        r"""What a plan's memory model leaves out, :math:`P + T_{\max} - a_0` over the blocks as they are, in bytes."""
        return int(self._backprop.reserve)

    @property
    def costs(self) -> BlockCosts:
        """The blocks' measured :class:`~revlib.checkpoint.BlockCosts` (each block its own unit)."""
        return self._backprop.costs

    def _chains(self, *, everything: bool) -> list[_Chain]:
        if self._grouped is not None and self._inverted is None and everything:
            self._inverted = _measure_chain(self._grouped, self.example, self._repeats)
        return [self._backprop] + ([self._inverted] if self._inverted is not None else [])

    def plan(self, budget: int) -> nn.Module:
        """A module over the blocks that trains within ``budget`` bytes at the least predicted time, as
        :func:`plan` returns it (with its :class:`PlanReport` as ``report``).

        Raises:
            TypeError: ``budget`` is not a number.
            ValueError: ``budget`` is not positive and finite, or no plan fits in it (the message gives the
                least budget that does).
        """
        _check_budget(budget)
        x, backprop = self.example, self._backprop
        chains = self._chains(everything=backprop.plain_peak > budget)
        fits = [(chain, fit) for chain in chains if (fit := _fit(chain, x, int(budget))) is not None]
        least = min(chain.least for chain in chains)
        if not fits:
            lowest = min(chains, key=lambda chain: chain.least)
            raise ValueError(
                f"no plan fits in budget={budget!r} bytes: the least feasible budget is {least} bytes (the dynamic "
                f"programme's least peak {_size(lowest.costs.least_budget)} plus the reserve {_size(lowest.reserve)}: the "
                f"parameters' gradients and the largest temporaries, less the chain's input; plain backprop needs {backprop.plain_peak} bytes)"
            )
        chain, fit = min(fits, key=lambda pair: pair[1].predicted_time)  # a tie goes to the blocks as they are
        inverted = any(isinstance(unit, ReversibleSequence) for unit in chain.units)
        strategy = ("store everything" if fit.schedule is None else "optimal checkpointing") + (
            ", reversible runs inverted" if inverted else "")
        steps = chain.costs.steps
        fit.module.report = PlanReport(  # type: ignore[assignment]
            strategy=strategy, budget=int(budget), least_budget=least, predicted_peak=fit.predicted_peak,
            measured_peak=fit.measured_peak, predicted_time=fit.predicted_time, backprop_peak=backprop.plain_peak,
            backprop_time=backprop.plain_time, kept=fit.schedule.kept if fit.schedule else ("graph",) * steps,
            runs=fit.schedule.runs if fit.schedule else (1,) * steps, costs=chain.costs,
            reserve=int(chain.reserve) if fit.schedule else 0, plan=fit.schedule, units=chain.spans,
        )
        return fit.module


def _check_budget(budget: Any) -> None:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f"budget must be a number of bytes, got {type(budget).__name__}")
    if not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"budget must be a positive, finite number of bytes, got {budget!r}")


@dataclass(frozen=True)
class BudgetTrial:
    """One module's step under one budget, measured, as :func:`budget_trials` reports it per budget and method.

    Attributes:
        module: the module (a planned one, or revolve's :class:`~revlib.checkpoint.CheckpointedSequence`).
        kept: per unit what the plan keeps (``G`` its graph, ``I`` its input, ``.`` nothing, ``R`` an inverted
            run of reversible couplings, which keeps its output), or for revolve ``"s slots"``.
        peak: the most one step returning the parameters' gradients adds, measured
            (:func:`revlib.timeline.added_peak`), in bytes.
        predicted_peak: the same under the planner's cost model: the memory model's peak of the schedule
            plus the reserve (:attr:`PlanReport.predicted_peak` for a plan; for revolve its simulated peak
            plus :attr:`Planner.chain_reserve`), in bytes.
        error: relative error of those gradients against plain backprop's.
        seconds: the step's median time, timed in turns with plain backprop's.
        predicted_seconds: the step's time under the planner's cost model.
    """

    module: nn.Module
    kept: str
    peak: int
    predicted_peak: int
    error: float
    seconds: float
    predicted_seconds: float


@dataclass(frozen=True)
class BudgetTrials:
    """The plans (and revolve, where asked) for several budgets, measured; ``str()`` gives the table.

    Attributes:
        budgets: the budgets by name, in bytes.
        backprop_peak: plain backprop's step, measured, in bytes.
        least_budget: the least budget any plan fits in, in bytes.
        backprop_seconds: plain backprop's median step time, timed in the same turns as the trials.
        backprop_predicted: plain backprop's step time under the cost model.
        trials: ``(budget name, "plan" or "revolve")`` → :class:`BudgetTrial`; revolve appears where asked
            for and at least one slot fits the budget.
    """

    budgets: dict[str, int]
    backprop_peak: int
    least_budget: int
    backprop_seconds: float
    backprop_predicted: float
    trials: dict[tuple[str, str], BudgetTrial]

    def __str__(self) -> str:
        width = max(len("kept per block"), *(len(trial.kept) for trial in self.trials.values()))
        lines = [
            f"backprop's step adds {self.backprop_peak / 2**20:.2f} MiB; the least budget is "
            f"{self.least_budget / 2**20:.2f} MiB ({self.least_budget / self.backprop_peak:.2f} of it)",
            "MiB: the budget and the measured peak; peak ×, time × and pred × (the time the",
            "cost model predicts): multiples of backprop's; error: the gradients' relative error",
            f"{'budget':<15} {'MiB':>6} {'method':<7} {'kept per block':<{width}} {'peak':>6}"
            f" {'peak ×':>6} {'time ×':>6} {'pred ×':>6} {'error':>7}",
        ]
        for (name, method), trial in self.trials.items():
            lines.append(
                f"{name:<15} {self.budgets[name] / 2**20:6.2f} {method:<7} {trial.kept:<{width}} "
                f"{trial.peak / 2**20:6.2f} {trial.peak / self.backprop_peak:6.2f} "
                f"{trial.seconds / self.backprop_seconds:6.2f} "
                f"{trial.predicted_seconds / self.backprop_predicted:6.2f} {trial.error:7.1e}"
            )
        return "\n".join(lines)


def budget_trials(planner: Planner, budgets: dict[str, int] | None = None, *, revolve: bool = True,
                  repeats: int = 15, device: torch.device | str | None = None) -> BudgetTrials:
    r"""Plan the chain for each budget and measure what was promised, each module's peak (one step that
    returns the parameters' gradients, :func:`revlib.timeline.added_peak`), its gradients against plain
    backprop's and its time (all modules timed in turns with plain backprop, :func:`revlib.measure.compare_times`).

    With ``revolve``, each budget also gets Griewank's revolve over the same blocks with the most slots whose
    plan fits under the same cost model (:meth:`~revlib.checkpoint.BlockCosts.most_revolve_slots` of the
    budget less :attr:`Planner.chain_reserve`): the equal-block schedule on equal terms.

    Args:
        planner: the measured chain.
        budgets: budgets by name, in bytes (``None``: backprop's peak, halfway between it and the least
            budget, and 5 % above the least, named ``"backprop's peak"``, ``"halfway"``, ``"least + 5 %"``).
        revolve: add revolve's trial for each budget.
        repeats: timed rounds.
        device: the device to synchronise when timing (``None``: the example's).

    Raises:
        TypeError: ``planner`` is not a :class:`Planner`.
        ValueError: a budget no plan fits (as :meth:`Planner.plan`), or ``repeats`` is not positive.
    """
    if not isinstance(planner, Planner):
        raise TypeError(f"planner must be a revlib.planner.Planner, got {type(planner).__name__}")
    positive_integers(repeats=repeats)
    backprop_peak, least = planner.backprop_peak, planner.least_budget
    if budgets is None:
        budgets = {"backprop's peak": backprop_peak, "halfway": (backprop_peak + least) // 2,
                   "least + 5 %": int(1.05 * least)}
    x, blocks, costs = planner.example, planner.blocks, planner.costs
    plain = nn.Sequential(*blocks)
    exact = _parameter_gradients(plain, x)
    modules: dict[tuple[str, str], tuple[nn.Module, str, int, float]] = {}
    for name, budget in budgets.items():
        module = planner.plan(budget)
        report: PlanReport = module.report  # type: ignore[assignment]
        kept = "".join("R" if inverted else {"graph": "G", "input": "I", "-": "."}[what]
                       for what, (_, _, inverted) in zip(report.kept, report.units))
        modules[name, "plan"] = module, kept, report.predicted_peak, report.predicted_time
        room = budget - planner.chain_reserve  # the budget as the memory model counts it
        slots = costs.most_revolve_slots(room) if revolve and room > 0 else None
        if slots is not None:
            sequence = CheckpointedSequence(*blocks, schedule="revolve", slots=slots)
            simulation = costs.simulate(sequence.plan)
            modules[name, "revolve"] = (sequence, f"{slots} slot{'s' * (slots != 1)}",
                                        int(simulation.peak_bytes + planner.chain_reserve), simulation.time)
    measured = {key: (added_peak(_parameter_gradients, module, x), relative_error(_parameter_gradients(module, x), exact))
                for key, (module, _, _, _) in modules.items()}
    calls = {"backprop": functools.partial(_parameter_gradients, plain, x)}
    calls |= {f"{name}, {method}": functools.partial(_parameter_gradients, module, x)
              for (name, method), (module, _, _, _) in modules.items()}
    timings = compare_times(calls, warmup=2, repeats=repeats, device=device if device is not None else x.device)
    trials = {key: BudgetTrial(module, kept, measured[key][0], predicted_peak, measured[key][1],
                               timings[f"{key[0]}, {key[1]}"].median, predicted_time)
              for key, (module, kept, predicted_peak, predicted_time) in modules.items()}
    return BudgetTrials(dict(budgets), backprop_peak, planner.least_budget, timings["backprop"].median,
                        planner.backprop_time, trials)


def _parameter_gradients(module: nn.Module, x: Tensor) -> tuple[Tensor, ...]:
    """One step's parameter gradients, returned (they are part of what a budget counts); ``.grad`` untouched."""
    return torch.autograd.grad(module(x).sum(), [p for p in module.parameters() if p.requires_grad])


@dataclass
class _Chain:
    """The blocks cut into planning units (blocks, or inverted runs of couplings), measured."""

    units: list[nn.Module]
    spans: tuple[tuple[int, int, bool], ...]  # per unit: (first block, last block + 1, inverted)
    costs: BlockCosts
    reserve: float  # P + T_max − a_0, raised by each measured overshoot
    plain_peak: int  # nn.Sequential(*units), measured
    plain_time: float  # Σ φ_i + ψ_i
    least: int  # the least feasible budget, predicted, raised by each measured overshoot


@dataclass(frozen=True)
class _Fit:
    module: nn.Module
    schedule: CheckpointPlan | None  # None: every unit recorded, nothing recomputed
    predicted_peak: int
    measured_peak: int
    predicted_time: float


def _measure_chain(units: list[nn.Module], x: Tensor, repeats: int) -> _Chain:
    costs = measure_block_costs(units, x, repeats=repeats)
    temporaries, held_graphs = _block_temporaries(units, x)
    costs = BlockCosts(costs.forward_time, costs.backward_time, costs.input_bytes,
                       tuple(max(g, held) for g, held in zip(costs.activation_bytes, held_graphs)))
    parameters = {id(p): p for unit in units for p in unit.parameters()}.values()
    gradients = sum(p.numel() * p.element_size() for p in parameters if p.requires_grad)
    reserve = gradients + max(temporaries) - costs.input_bytes[0]
    plain_peak = _step_peak(nn.Sequential(*units), x)
    spans, start = [], 0
    for unit in units:
        size = len(unit) if isinstance(unit, ReversibleSequence) else 1
        spans.append((start, start + size, isinstance(unit, ReversibleSequence)))
        start += size
    least = int(math.ceil(min(costs.least_budget + reserve, plain_peak)))
    return _Chain(units, tuple(spans), costs, reserve, plain_peak, sum(costs.forward_time) + sum(costs.backward_time), least)


def _fit(chain: _Chain, x: Tensor, budget: int) -> _Fit | None:
    """The chain's fastest plan whose measured step fits in ``budget``, or ``None``."""
    if chain.plain_peak <= budget:
        return _Fit(nn.Sequential(*chain.units), None, chain.plain_peak, chain.plain_peak, chain.plain_time)
    chain_budget = budget - chain.reserve
    for _ in range(_ATTEMPTS):
        if chain_budget < chain.costs.least_budget:
            break
        schedule = checkpoint_plan(chain.costs.steps, "optimal", costs=chain.costs, budget=chain_budget)
        module = CheckpointedSequence(*chain.units, schedule="optimal", costs=chain.costs, budget=chain_budget)
        measured = _step_peak(module, x)
        if measured <= budget:
            return _Fit(module, schedule, int(schedule.predicted_peak + chain.reserve), measured,  # type: ignore[operator]
                        float(schedule.predicted_time))  # type: ignore[arg-type]
        excess = measured - budget  # what the reserve missed: lower the chain's budget by it, plan again
        chain.reserve += excess
        chain.least += excess
        chain_budget -= excess
    return None


def _inverted_runs(blocks: list[nn.Module]) -> list[nn.Module] | None:
    """``blocks`` with each maximal run of consecutive reversible couplings that split one dimension as one
    :class:`~revlib.reversible.ReversibleSequence`; ``None`` when there is none."""
    units: list[nn.Module] = []
    run: list[ReversibleBlock] = []
    for block in [*blocks, None]:
        if isinstance(block, ReversibleBlock) and (not run or block.dim == run[0].dim):
            run.append(block)
            continue
        if run:
            units.append(ReversibleSequence(*run))
            run = []
        if isinstance(block, ReversibleBlock):
            run.append(block)
        elif block is not None:
            units.append(block)
    return units if any(isinstance(unit, ReversibleSequence) for unit in units) else None


def _checked_blocks(blocks: Iterable[nn.Module]) -> list[nn.Module]:
    if isinstance(blocks, nn.Module) and not isinstance(blocks, nn.Sequential):
        raise TypeError(f"blocks must be an iterable of nn.Module blocks (a list or an nn.Sequential), got a single {type(blocks).__name__}")
    try:
        found = list(blocks)
    except TypeError:
        raise TypeError(f"blocks must be an iterable of nn.Module blocks, got {type(blocks).__name__}") from None
    if not found:
        raise ValueError("blocks must hold at least one nn.Module, got none")
    for index, block in enumerate(found):
        if not isinstance(block, nn.Module):
            raise TypeError(f"blocks[{index}] must be an nn.Module, got {type(block).__name__}")
    return found


def _block_temporaries(blocks: list[nn.Module], x: Tensor) -> tuple[list[int], list[int]]:
    """Per block, what it holds beyond the memory model while it runs (the largest of its three actions'
    excess: advance, record, turn), and what its recorded graph holds besides its output, as measured."""
    temporaries, graphs = [], []
    with _measuring(blocks, x.device):
        with torch.no_grad():
            inputs = [x.detach()]
            for block in blocks:
                inputs.append(block(inputs[-1]))
        for block, block_input, block_output in zip(blocks, inputs, inputs[1:]):
            point = block_input.detach().requires_grad_(block_input.is_floating_point() or block_input.is_complex())
            parameters = [p for p in block.parameters() if p.requires_grad]
            wrt = [point] * point.requires_grad + parameters
            state: dict[str, Any] = {}

            def advance(block: nn.Module = block, point: Tensor = point) -> None:
                with torch.no_grad():
                    state["output"] = block(point)

            def record(block: nn.Module = block, point: Tensor = point) -> None:
                state.clear()
                with torch.enable_grad():
                    state["output"] = block(point)
                state["upstream"] = torch.ones_like(state["output"])  # δ_{i+1}

            def turn(wrt: list[Tensor] = wrt) -> None:
                if state["output"].requires_grad and wrt:
                    state["found"] = torch.autograd.grad(state["output"], wrt, state["upstream"], allow_unused=True)
                state.clear()

            (advanced, _), (recorded, held), (turned, _) = _segments([advance, record, turn], x.device)
            output_bytes = block_output.untyped_storage().nbytes()
            graph = held - 2 * output_bytes  # the recording ends holding its graph, its output and δ_{i+1}
            made = point.untyped_storage().nbytes() * point.requires_grad + sum(p.numel() * p.element_size() for p in parameters)
            temporaries.append(max(advanced - output_bytes, recorded - held, turned - made, 0))
            graphs.append(max(graph, 0))
    return temporaries, graphs


def _step_peak(module: nn.Module, x: Tensor) -> int:
    """The most one step of ``module`` adds (its forward pass, the loss ``.sum()``, the backward pass to the
    parameters and to ``x`` when it requires grad), measured; ``.grad`` is not touched."""
    wanted = [p for p in module.parameters() if p.requires_grad] + [x] * x.requires_grad

    def step() -> None:
        loss = module(x).sum()  # the output is not held beyond the loss, as in training
        if loss.requires_grad and wanted:
            torch.autograd.grad(loss, wanted, allow_unused=True)

    with _measuring(list(module), x.device):
        ((peak, _),) = _segments([step], x.device)
    return peak
