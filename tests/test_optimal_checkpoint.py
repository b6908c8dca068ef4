"""Tests of schedule="optimal" in revlib.checkpoint: the unequal-block plans of revlib._rotor run by
CheckpointedSequence (gradients, the plans against exhaustive search and revolve, the memory they hold)."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from allocations import added_peak
from revlib._rotor import Simulation, checkpoint_plan_actions, exhaustive_fastest, simulate
from revlib.checkpoint import BlockCosts, CheckpointedSequence, check_plan, checkpoint_plan, measure_block_costs, optimal_recomputations
from revlib.measure import count_calls
from revlib.verify import relative_error
from test_rotor import random_chain


def gradients(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().requires_grad_(True)
    return list(torch.autograd.grad(model(x).pow(2).sum(), [x, *model.parameters()]))


def unequal_blocks(widths: list[int], dropout: float = 0.0) -> list[nn.Module]:
    """A chain whose blocks change width (a ResNet whose stages halve the resolution, flattened)."""
    return [nn.Sequential(nn.Linear(a, b), nn.Dropout(dropout), nn.Tanh()) for a, b in zip(widths, widths[1:])]


def flop_costs(widths: list[int], batch: int, graph: list[int] | None = None, element: int = 4) -> BlockCosts:
    """Deterministic costs: times proportional to the multiply-adds, sizes from the shapes."""
    steps = len(widths) - 1
    return BlockCosts(
        tuple(float(a * b) for a, b in zip(widths, widths[1:])),
        tuple(2.0 * a * b for a, b in zip(widths, widths[1:])),
        tuple(batch * w * element for w in widths),
        tuple(graph if graph is not None else [0] * steps),
    )


WIDTHS = [8, 12, 12, 6, 6, 3, 3, 5]


@pytest.mark.parametrize("scale", [0.0, 0.3, 0.6, 1.0])
def test_gradients_equal_plain_autograd(scale: float) -> None:
    """At budgets from the least (recomputing most) to plain backprop's (recording every block)."""
    torch.manual_seed(0)
    made = [block.double() for block in unequal_blocks(WIDTHS, dropout=0.2)]
    x = torch.randn(4, WIDTHS[0], dtype=torch.float64)
    costs = measure_block_costs(made, x, repeats=1, warmup=0)
    everything = sum(costs.input_bytes) * 3 + sum(costs.activation_bytes)
    budget = costs.least_budget + scale * (everything - costs.least_budget)
    sequence = CheckpointedSequence(*made, schedule="optimal", costs=costs, budget=budget)
    torch.manual_seed(1)
    found = gradients(sequence, x)
    torch.manual_seed(1)
    expected = gradients(nn.Sequential(*made), x)
    assert relative_error(found, expected) < 1e-13
    if scale == 1.0:
        assert all(action == "record" for action, _ in sequence.plan.forward), "plain backprop: every graph kept"


def test_gradcheck_in_float64() -> None:
    torch.manual_seed(0)
    made = [block.double() for block in unequal_blocks([3, 4, 2, 3])]
    costs = BlockCosts((1.0, 5.0, 1.0), (1.0, 1.0, 1.0), (4, 4, 4, 4), (8, 0, 8))
    sequence = CheckpointedSequence(*made, schedule="optimal", costs=costs, budget=32)
    plan = sequence.plan
    assert ("record", 1) in plan.forward and plan.evaluations == 4, "records blocks 1 and 2, runs block 0 again"
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(sequence, (x,))


@pytest.mark.parametrize("steps, seed", [(2, 0), (3, 1), (4, 2), (5, 0)])
def test_the_plan_is_the_exhaustive_optimum_and_executable(steps: int, seed: int) -> None:
    """checkpoint_plan(..., "optimal") is the dynamic programme's plan: the fastest of every persistent plan
    (tests/test_rotor.py's search), valid for check_plan and run by CheckpointedSequence block by block."""
    chain = random_chain(random.Random(1000 * steps + seed), steps)
    costs = BlockCosts(*chain)
    for budget in (costs.least_budget, costs.least_budget + 3, costs.least_budget + 9):
        plan = checkpoint_plan(steps, "optimal", costs=costs, budget=budget)
        check_plan(plan)
        assert plan.predicted_time == exhaustive_fastest(*chain, budget, persistent=True)
        assert plan.predicted_peak <= budget
        made = [nn.Linear(3, 3) for _ in range(steps)]
        sequence = CheckpointedSequence(*made, schedule="optimal", costs=costs, budget=budget)
        x = torch.randn(2, 3, requires_grad=True)
        assert count_calls(made, lambda: sequence(x).sum().backward()) == plan.evaluations


def test_recorded_blocks_are_run_once_and_turned_through_their_graph() -> None:
    """A slow block with a small graph is recorded in the forward pass: the step runs it once, not twice."""
    made = [nn.Linear(3, 3) for _ in range(3)]
    costs = BlockCosts((1.0, 20.0, 1.0), (1.0, 1.0, 1.0), (4, 4, 4, 4), (8, 0, 8))
    sequence = CheckpointedSequence(*made, schedule="optimal", costs=costs, budget=32)
    assert sequence.plan.forward == (("store", 0), ("advance", 0), ("record", 1), ("record", 2))
    x = torch.randn(2, 3, requires_grad=True)
    runs = [count_calls([block], lambda: sequence(x).sum().backward()) for block in made]
    assert runs == [2, 1, 1]


@pytest.mark.parametrize("slots", [1, 2, 3, 5])
def test_equal_blocks_recompute_no_more_than_revolve(slots: int) -> None:
    """Equal blocks at revolve's budget in bytes (s kept inputs besides a turn's input, output, two gradients
    and the graph): the optimal plan makes at most revolve's advances, measured by counting block runs."""
    steps, size, graph = 12, 64, 32
    costs = BlockCosts((1.0,) * steps, (2.0,) * steps, (size,) * (steps + 1), (graph,) * steps)
    budget = (slots + 4) * size + graph
    optimal = checkpoint_plan(steps, "optimal", costs=costs, budget=budget)
    revolve = checkpoint_plan(steps, "revolve", slots)
    assert simulate(*checkpoint_plan_actions(revolve), *map(list, (costs.forward_time, costs.backward_time, costs.input_bytes, costs.activation_bytes))).peak_bytes <= budget
    assert optimal.evaluations <= revolve.evaluations == 2 * steps + optimal_recomputations(steps, slots)
    made = [nn.Linear(4, 4) for _ in range(steps)]
    x = torch.randn(2, 4, requires_grad=True)
    runs = {name: count_calls(made, lambda: CheckpointedSequence(*made, **kwargs)(x).sum().backward())
            for name, kwargs in (("optimal", dict(schedule="optimal", costs=costs, budget=budget)), ("revolve", dict(schedule="revolve", slots=slots)))}
    assert runs["optimal"] <= runs["revolve"], runs


def frozen_linear_chain(widths: list[int]) -> list[nn.Module]:
    """Linear blocks without parameter gradients and without temporaries: a step holds what the model counts."""
    torch.manual_seed(0)
    return [nn.Linear(a, b).requires_grad_(False) for a, b in zip(widths, widths[1:])]


RESNET_WIDTHS = [64] * 5 + [32] * 4 + [16] * 4 + [8] * 4  # 16 blocks, the activations halving every 4


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 1.0])
def test_measured_peak_is_within_the_budget(fraction: float) -> None:
    """What the step really holds (PyTorch's profiler) stays within the memory model's budget."""
    made = frozen_linear_chain(RESNET_WIDTHS)
    x = torch.randn(256, RESNET_WIDTHS[0], requires_grad=True)
    costs = measure_block_costs(made, x, repeats=1, warmup=0)
    everything = 2 * sum(costs.input_bytes)
    budget = int(costs.least_budget + fraction * (everything - costs.least_budget))
    sequence = CheckpointedSequence(*made, schedule="optimal", costs=costs, budget=budget)
    measured = added_peak(lambda: sequence(x).sum().backward())
    assert measured <= budget, (measured, budget)


def test_unequal_chain_recomputes_less_than_revolve_at_the_same_measured_peak() -> None:
    """A chain whose activations halve every four blocks: at the peak the optimal plan is measured to hold,
    the best revolve plan that holds no more (over its slot counts) recomputes more, in block runs and in
    multiply-adds."""
    made = frozen_linear_chain(RESNET_WIDTHS)
    x = torch.randn(256, RESNET_WIDTHS[0], requires_grad=True)
    steps = len(made)
    costs = flop_costs(RESNET_WIDTHS, 256)
    budget = int(costs.least_budget + 0.25 * (2 * sum(costs.input_bytes) - costs.least_budget))

    def step(sequence: nn.Module) -> tuple[int, float]:
        peak = added_peak(lambda: sequence(x).sum().backward())
        calls = [count_calls([block], lambda: sequence(x).sum().backward()) for block in made]
        return peak, sum(n * f for n, f in zip(calls, costs.forward_time)), sum(calls)

    optimal_peak, optimal_work, optimal_runs = step(CheckpointedSequence(*made, schedule="optimal", costs=costs, budget=budget))
    revolve = [(step(CheckpointedSequence(*made, schedule="revolve", slots=slots)), slots) for slots in range(1, steps + 1)]
    fitting = [(work, runs, slots, peak) for (peak, work, runs), slots in revolve if peak <= optimal_peak]
    work, runs, slots, peak = min(fitting)
    assert optimal_work < work and optimal_runs < runs, (optimal_work, work, optimal_runs, runs, slots)


def test_bad_arguments_name_the_argument() -> None:
    costs = BlockCosts((1.0, 1.0), (1.0, 1.0), (4, 4, 4), (0, 0))
    with pytest.raises(ValueError, match="needs costs=BlockCosts"):
        checkpoint_plan(2, "optimal", budget=100)
    with pytest.raises(TypeError, match="costs must be a BlockCosts"):
        checkpoint_plan(2, "optimal", costs=[1, 2], budget=100)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="costs describe 2 blocks, but the plan is for steps=3"):
        checkpoint_plan(3, "optimal", costs=costs, budget=100)
    with pytest.raises(ValueError, match="no plan fits in budget=3 bytes.*least peak"):
        checkpoint_plan(2, "optimal", costs=costs, budget=3)
    with pytest.raises(ValueError, match="costs and budget are for schedule='optimal'"):
        checkpoint_plan(2, "revolve", 1, budget=100)
    with pytest.raises(ValueError, match="input_bytes must have 3 entries"):
        BlockCosts((1.0, 1.0), (1.0, 1.0), (4, 4), (0, 0))
    with pytest.raises(ValueError, match=r"forward_time\[1\] must be finite and non-negative"):
        BlockCosts((1.0, -1.0), (1.0, 1.0), (4, 4, 4), (0, 0))
    with pytest.raises(TypeError, match="example_input must be a tensor"):
        measure_block_costs([nn.Linear(2, 2)], [1.0, 2.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="blocks must hold at least one"):
        measure_block_costs([], torch.ones(2))
    sequence = CheckpointedSequence(nn.Linear(2, 2), nn.Linear(2, 2), schedule="optimal", costs=costs, budget=100)
    with pytest.raises(ValueError, match="cannot be sliced"):
        sequence[:1]  # noqa: B018
    sequence.append(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="costs describe 2 blocks"):
        sequence.plan  # noqa: B018


def test_measured_costs_follow_the_shapes() -> None:
    made = unequal_blocks([8, 16, 4])
    x = torch.randn(5, 8)
    costs = measure_block_costs(made, x, repeats=1, warmup=0)
    assert costs.input_bytes == (5 * 8 * 4, 5 * 16 * 4, 5 * 4 * 4)
    assert costs.activation_bytes == (0, 0), "Linear saves its input, Tanh its output: nothing besides"
    assert all(t > 0 for t in costs.forward_time) and all(t >= 0 for t in costs.backward_time)
    with_mask = unequal_blocks([8, 16], dropout=0.5)
    assert measure_block_costs(with_mask, x, repeats=1, warmup=0).activation_bytes[0] > 0, "dropout's mask is saved"


@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_simulate_prices_any_plan_and_revolve_is_never_faster_within_the_budget(fraction: float) -> None:
    costs = flop_costs(RESNET_WIDTHS, batch=4, graph=[3 * 4 * 4 * w for w in RESNET_WIDTHS[1:]])
    everything = sum(costs.input_bytes) + sum(costs.activation_bytes)
    budget = costs.least_budget + fraction * (everything - costs.least_budget)
    optimal = checkpoint_plan(costs.steps, "optimal", costs=costs, budget=budget)
    assert costs.simulate(optimal) == Simulation(optimal.predicted_time, optimal.predicted_peak)
    fitting = [costs.simulate(checkpoint_plan(costs.steps, "revolve", slots)) for slots in range(1, costs.steps)]
    fitting = [run for run in fitting if run.peak_bytes <= budget]
    assert all(run.time >= optimal.predicted_time for run in fitting)
    with pytest.raises(ValueError, match="plan is for 3 blocks"):
        costs.simulate(checkpoint_plan(3, "revolve", 1))


def test_staged_resnet_is_a_chain_of_unequal_blocks() -> None:
    from revlib.blocks import ResidualBlock, staged_resnet

    torch.manual_seed(0)
    network = staged_resnet((4, 8, 16), 2, device="cpu")
    assert len(network) == 1 + 3 * 2 + 2 + 1 and sum(isinstance(b, ResidualBlock) for b in network) == 6
    x = torch.randn(3, 1, 8, 8)
    sizes = []
    for block in network:
        x = block(x)
        sizes.append(x[0].numel())
    assert x.shape == (3, 10)
    assert sizes[:-1] == [4 * 64] * 3 + [8 * 16] * 3 + [16 * 4] * 3  # each stage half the previous one's
    with pytest.raises(ValueError, match="widths"):
        staged_resnet(())
    with pytest.raises(ValueError, match="blocks_per_stage"):
        staged_resnet((4,), 0)
